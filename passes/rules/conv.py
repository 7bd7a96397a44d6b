"""Convolutions: weight and bias gradients of `convolution_backward` (Conv1d/2d/3d, any stride,
padding, dilation, groups; transposed convolutions instantiate).

Per sample i and group g, the weight gradient is G_ig^T A_ig, with A_ig (T, Cin/g * K) the
unfolded input (T = output positions; rows of several images when the batch has `inner` > 1)
and G_ig (T, Cout/g) the output gradient, so
- ghost:        ||grad_i||^2 = sum_g <A_ig A_ig^T, G_ig G_ig^T>   (T x T Grams per group)
- instantiate:  one convolution_backward over the whole batch under vmap (a grouped
                convolution with groups = B * groups): the (B, *weight.shape) per-sample grads.

Strategy: rules/cost.py prices both per weight (per group: m = p = Cout/g output channels,
k = d = Cin/g * K, T output positions), as extra work over the plain backward: the instantiated
per-sample gradients replace the weight gradient, the Grams come on top of it.
Reweighting in ghost mode is one convolution_backward on R-scaled output gradients (the cost of
the original weight gradient); instantiated, a weighted sum of the per-sample gradients.
Bias: per-sample gradient = output gradient summed over positions, always instantiated (small).
"""
from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F

from ..layout import Layout, size_hint
from ..numerics import upcast
from . import cost
from .base import (
    Decline,
    InstantiatedRoute,
    norm_sq_of,
    normalized,
    replay,
    scale_by_sample,
    weighted_sum,
    zero_dropped,
)

aten = torch.ops.aten


def _conv_args(cb):
    (grad_out, x, weight, bias_sizes, stride, padding, dilation, transposed, output_padding,
     groups, mask) = cb.args[:11]
    return grad_out, x, weight, dict(stride=list(stride), padding=list(padding),
                                     dilation=list(dilation), transposed=transposed,
                                     output_padding=list(output_padding), groups=groups)


def unfold_nd(x, kernel, stride, padding, dilation):
    """(N, C, *S) -> (N, C * prod(kernel), L): the im2col of an N-d convolution, channel-major
    (matching weight.reshape(out, -1)), positions row-major (matching the output's flatten)."""
    nd = len(kernel)
    pads = []
    for p in reversed(padding):
        pads += [p, p]
    if any(pads):
        x = F.pad(x, pads)
    for i in range(nd):
        span = dilation[i] * (kernel[i] - 1) + 1
        x = x.unfold(2 + i, span, stride[i])  # (N, C, L..., w...) windows appended at the end
        if dilation[i] > 1:
            x = x[..., ::dilation[i]]
    n, c = x.shape[:2]
    positions = x.shape[2:2 + nd]
    x = x.permute(0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd))
    return x.reshape(n, c * math.prod(kernel), math.prod(positions))


def _grouped_rows(go, x, weight_shape, conv, batch):
    """(A, G): per sample and group, the unfolded input rows A (B * g, inner * L, Cin/g * K) and
    the output gradient rows G (B * g, inner * L, Cout/g) of a convolution with this weight."""
    g = conv["groups"]
    out_ch = weight_shape[0]
    kernel = list(weight_shape[2:])
    a = unfold_nd(x, kernel, conv["stride"], conv["padding"], conv["dilation"])  # (N, Cin K, L)
    n, ck, L = a.shape
    inner = n // batch
    # (B, inner, g, d, L) -> (B, g, inner * L, d)
    a = a.reshape(batch, inner, g, ck // g, L).permute(0, 2, 1, 4, 3).reshape(batch * g, inner * L, ck // g)
    gg = go.reshape(batch, inner, g, out_ch // g, L).permute(0, 2, 1, 4, 3).reshape(batch * g, inner * L, out_ch // g)
    return a, gg


def conv_ghost_norm_sq(go, x, weight_shape, conv, batch):
    """Per-sample ||grad_weight||^2 from unfolded activations and output gradients."""
    a, gg = _grouped_rows(go, x, weight_shape, conv, batch)
    a, gg = upcast(a), upcast(gg)
    ga = torch.bmm(a, a.transpose(1, 2))
    gb = torch.bmm(gg, gg.transpose(1, 2))
    return (ga * gb).reshape(batch, -1).sum(1)


def _per_sample_weight_grad(go, x, w, conv, batch):
    """(B, *w.shape) per-sample weight gradients. With a static batch size, one grouped
    convolution (vmap of convolution_backward: groups = B * groups). Its groups must be a
    number, so a symbolic batch size would be specialized (a recompile for every size, and
    Dynamo's recompile limit within a few Poisson steps): then G^T A on unfolded rows."""
    if isinstance(batch, int):
        return _per_sample_grouped_conv(go, x, w, conv, batch)
    return unfolded_weight_grad(go, x, tuple(w.shape), conv, batch)


def unfolded_weight_grad(go, x, weight_shape, conv, batch=1):
    """(batch, *weight_shape): the weight gradient of each of `batch` equal parts of the batch,
    as G^T A on unfolded rows: no grouped convolution, so it vmaps and traces without
    specializing a symbolic batch size."""
    if conv["transposed"]:  # its weight gradient is a convolution's, input and output swapped
        go, x = x, go
    a, gg = _grouped_rows(go, x, weight_shape, conv, batch)
    return torch.bmm(gg.transpose(1, 2), a).reshape(batch, *weight_shape)


def _per_sample_grouped_conv(go, x, w, conv, batch):
    gos = go.reshape(batch, go.shape[0] // batch, *go.shape[1:])
    xs = x.reshape(batch, x.shape[0] // batch, *x.shape[1:])

    def one(g, a):
        return aten.convolution_backward(g, a, w, None, conv["stride"], conv["padding"], conv["dilation"],
                                         conv["transposed"], conv["output_padding"], conv["groups"],
                                         [False, True, False])[1]

    return torch.vmap(one)(gos, xs)


def _ghost_weighted(go, x, w, r, conv, lay):
    """sum_i R_i grad_i: one convolution_backward on R-scaled output gradients."""
    go = scale_by_sample(go, lay, r)
    x = zero_dropped(x, lay, r)  # a sample with R = 0 may hold inf: 0 * inf would be NaN
    return aten.convolution_backward(go, x, w, None, conv["stride"], conv["padding"], conv["dilation"],
                                     conv["transposed"], conv["output_padding"], conv["groups"],
                                     [False, True, False])[1]


def _candidates(grad_out, x, weight, conv, lay, batch: int) -> cost.Candidates:
    """Both strategies of one conv weight on random tensors of its shapes, for timing."""
    values = [n.meta["val"] for n in (grad_out, x, weight)]
    wshape = tuple(size_hint(s) for s in values[2].shape)

    def make_inputs():
        gen = cost.generator_for(values[0].device)
        return (*(cost.random_like(v, gen) for v in values),
                torch.rand(batch, generator=gen, device=values[0].device))

    def ghost(go, x, w, r):
        return conv_ghost_norm_sq(go, x, wshape, conv, batch), _ghost_weighted(go, x, w, r, conv, lay)

    def instantiate(go, x, w, r):
        per = _per_sample_weight_grad(go, x, w, conv, batch)
        return norm_sq_of(per), weighted_sum(per, r)

    key = ("conv", batch, str(lay), repr(sorted(conv.items())), *cost.values_key(*values))
    held = sum(cost.nbytes(v) for v in values[:2])
    return cost.Candidates(key, make_inputs, ghost, instantiate, held)


class ConvWeightRoute(InstantiatedRoute):
    def __init__(self, strategy, contribution, grad_out, x, weight, conv, layout, **kw):
        super().__init__("conv", strategy, contribution, **kw)
        self.grad_out, self.x, self.weight, self.conv, self.layout = grad_out, x, weight, conv, layout

    def per_sample(self, ctx):
        c, conv = self.contribution, self.conv

        def fn(go, x, w, bref):
            per = _per_sample_weight_grad(go, x, w, conv, bref.shape[0])
            return torch.vmap(lambda v: replay(c.path, c.root, v))(per)

        return ctx.builder.call(fn, self.grad_out, self.x, self.weight, ctx.bref)

    def norm_sq(self, ctx):
        if self.strategy == "instantiate":
            return super().norm_sq(ctx)
        conv, wshape = self.conv, tuple(int(s) for s in self.weight.meta["val"].shape)
        return ctx.builder.call(
            lambda go, x, bref: conv_ghost_norm_sq(go, x, wshape, conv, bref.shape[0]),
            self.grad_out, self.x, ctx.bref)

    def reweighted(self, ctx, clip):
        if self.strategy == "instantiate":
            return super().reweighted(ctx, clip)
        c, conv, lay = self.contribution, self.conv, self.layout

        return ctx.builder.call(lambda go, x, w, r: replay(c.path, c.root, _ghost_weighted(go, x, w, r, conv, lay)),
                                self.grad_out, self.x, self.weight, clip)


class ConvBiasRoute(InstantiatedRoute):
    def __init__(self, contribution, grad_out, **kw):
        super().__init__("conv", "instantiate", contribution, **kw)
        self.grad_out = grad_out

    def per_sample(self, ctx):
        c = self.contribution

        def fn(go, bref):
            batch = bref.shape[0]
            per = go.reshape(batch, go.shape[0] // batch, go.shape[1], -1).sum((1, 3))
            return torch.vmap(lambda v: replay(c.path, c.root, v))(per)

        return ctx.builder.call(fn, self.grad_out, ctx.bref)

    def reweighted(self, ctx, clip):
        c = self.contribution

        def fn(go, r):
            batch = r.shape[0]
            per = go.reshape(batch, go.shape[0] // batch, go.shape[1], -1).sum((1, 3))
            return replay(c.path, c.root, weighted_sum(per, r))

        return ctx.builder.call(fn, self.grad_out, clip)


def choose(batch, T, groups, d, p, candidates=None):
    """(strategy, extra flops, held bytes) of the cheaper way to get a conv weight's per-sample norms."""
    return cost.choose(batch, T, p, d, groups, candidates).as_tuple()


def match(contribution, ctx):
    root = contribution.root
    if not (root.target == operator.getitem and root.args[1] in (1, 2)
            and root.args[0].target == aten.convolution_backward.default):
        return Decline("the gradient is not a convolution's weight or bias gradient", applies=False)
    cb = root.args[0]
    grad_out, x, weight, conv = _conv_args(cb)
    lay = ctx.layouts.get(grad_out)
    if not (isinstance(lay, Layout) and lay.dim == 0 and lay.batch_major):
        return Decline("the output gradient does not hold the batch in dim 0 (batch-major)")
    if ctx.layouts.get(x) != lay:
        return Decline("the input and the output gradient are batched differently")
    if weight in ctx.layouts:
        return Decline("the weight depends on the batch")
    lay = normalized(lay)
    batch = ctx.batch_hint
    out_shape = grad_out.meta["val"].shape
    inner = size_hint(lay.inner)
    T = inner * math.prod(size_hint(s) for s in out_shape[2:])
    shapes = {"B": str(ctx.batch_size), "T": str(T), "x": str(tuple(x.meta["val"].shape)),
              "weight": str(tuple(weight.meta["val"].shape)), "groups": str(conv["groups"])}
    if root.args[1] == 2:
        p = size_hint(out_shape[1])
        return ConvBiasRoute(contribution, grad_out, shapes=shapes, extra_flops=batch * T * p,
                             extra_bytes=4 * batch * p)
    wshape = [size_hint(s) for s in weight.meta["val"].shape]
    g = conv["groups"]
    if conv["transposed"]:
        strategy, flops, nbytes = "instantiate", 2 * batch * T * math.prod(wshape), 4 * batch * math.prod(wshape)
    else:
        candidates = _candidates(grad_out, x, weight, conv, lay, batch)
        strategy, flops, nbytes = choose(batch, T, g, math.prod(wshape[1:]), wshape[0] // g, candidates)
        # the same choice again (measurements are cached): its costs and times for explain
        shapes.update(cost.choose(batch, T, wshape[0] // g, math.prod(wshape[1:]), g, candidates).describe())
    return ConvWeightRoute(strategy, contribution, grad_out, x, weight, conv, lay, shapes=shapes,
                           extra_flops=flops, extra_bytes=nbytes)
