"""Un-reduce: a gradient that is a sum over the batch of a per-sample expression.

Covers biases, LayerNorm/GroupNorm affine parameters, elementwise scales and shifts: their
gradient is sum(X, dims) with the batch among `dims`. Summing over the other dims only gives
the per-sample gradients (B, *shape) directly; parameters are small, so instantiating is cheap.
The sum may be scaled by a factor the same for every sample: eval-mode BatchNorm's weight
gradient is sum(g * (x - running_mean)) * rsqrt(running_var + eps).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..layout import Layout, reduced_dims, same_shape
from .base import Decline, InstantiatedRoute, normalized, replay, split_batch

aten = torch.ops.aten


class UnreduceRoute(InstantiatedRoute):
    def __init__(self, contribution, x, layout, dims, keepdim, scale=None, **kw):
        super().__init__("unreduce", "instantiate", contribution, **kw)
        self.x, self.layout, self.dims, self.keepdim = x, layout, dims, keepdim
        self.scale = scale  # None, a number, or a node with no batch: multiplies the sum

    def per_sample(self, ctx):
        c, layout, dims, keepdim = self.contribution, self.layout, self.dims, self.keepdim
        # split_batch puts B in front, so dim d of x (the batch dim: its inner part) is at d + 1
        moved = [d + 1 for d in dims]
        scale_node = self.scale if isinstance(self.scale, fx.Node) else None
        constant = 1 if self.scale is None or scale_node is not None else self.scale

        def fn(x, bref, *scale):
            per = split_batch(x, layout, bref.shape[0]).sum(moved, keepdim=keepdim)
            factor = scale[0] if scale else constant
            return torch.vmap(lambda v: replay(c.path, c.root, v * factor))(per)

        return ctx.builder.call(fn, self.x, ctx.bref, *([scale_node] if scale_node is not None else []))


def _scaled_sum(root, ctx):
    """For mul(sum(...), f) with f the same for every sample (a number, or a node with no batch
    layout computed before the output gradients): (the sum, f); else None."""
    if root.target != aten.mul.Tensor or root.kwargs or len(root.args) != 2:
        return None
    for total, factor in (root.args, root.args[::-1]):
        if not (isinstance(total, fx.Node) and total.target in SUMS):
            continue
        if isinstance(factor, (int, float)):
            return total, factor
        if (isinstance(factor, fx.Node) and factor not in ctx.after_output_grads
                and ctx.layouts.get(factor) is None and same_shape(root.meta["val"].shape,
                                                                   total.meta["val"].shape)):
            return total, factor
    return None


SUMS = (aten.sum.dim_IntList, aten.sum.default)


def match(contribution, ctx):
    root, scale = contribution.root, None
    scaled = _scaled_sum(root, ctx)
    if scaled is not None:
        root, scale = scaled
    if root.target not in SUMS:
        return Decline("the gradient is not a sum (times a factor the same for every sample)", applies=False)
    x = root.args[0]
    layout = ctx.layouts.get(x)
    if not isinstance(layout, Layout):
        return Decline("the summed tensor has no per-sample batch layout")
    layout = normalized(layout)  # outer > 1 (sequence-first rows): split_batch handles it
    if layout is None:
        return Decline("the batch's row blocks have a symbolic count")
    dims, keepdim = reduced_dims(root)
    if layout.dim not in dims:
        return Decline("the sum does not reduce the batch dim")
    numel = ctx.param_numel
    return UnreduceRoute(contribution, x, layout, dims, keepdim, scale,
                         shapes={"B": str(ctx.batch_size), "x": str(tuple(x.meta["val"].shape))},
                         extra_flops=3 * ctx.batch_hint * numel, extra_bytes=4 * ctx.batch_hint * numel)
