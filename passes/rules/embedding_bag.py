"""nn.EmbeddingBag with 2-D bags (one bag of L ids per sample): `_embedding_bag_backward`.

Sample i's table gradient is sum_t c_it e_{ids_it} g_i^T, g_i the gradient of its bag's output
and c_it the token's coefficient: the per_sample_weight (or 1), divided by the bag size in mean
mode, 0 for padding_idx. So, with L x L intermediates only:
- sum / mean: ||grad_i||^2 = ||g_i||^2 * sum_{t,s} c_it c_is [ids_it == ids_is]
- max:        each feature j takes g_ij at one row (its argmax id), so ||grad_i||^2 = ||g_i||^2
              (0 for a bag with no ids left after padding)
Reweighting runs the same backward with g_i scaled by R_i.
"""
from __future__ import annotations

import torch

from ..builder import run_node
from ..layout import Layout, size_hint
from ..layout.embedding_bag import bag_layout
from ..numerics import upcast
from .base import Decline, Route, replay, scale_by_sample

aten = torch.ops.aten

SUM, MEAN, MAX = 0, 1, 2
_ARGS = ("grad", "indices", "offsets", "offset2bag", "bag_size", "max_indices", "num_weights",
         "scale_grad_by_freq", "mode", "sparse", "per_sample_weights", "padding_idx")


def _args(root) -> dict:
    return {**dict(zip(_ARGS, root.args)), **root.kwargs}


def bag_norm_sq(grad, indices, bag_size, weights, mode: int, padding_idx):
    """(B,) squared norms of the per-bag table gradients (see the module docstring)."""
    g = upcast(grad)
    g_sq = g.square().sum(1)
    if mode == MAX:
        return torch.where(bag_size > 0, g_sq, 0)
    ids = indices.reshape(grad.shape[0], -1)
    coef = torch.ones_like(ids, dtype=g.dtype) if weights is None else weights.reshape(ids.shape).to(g.dtype)
    if mode == MEAN:
        coef = coef / bag_size.clamp(min=1).to(g.dtype)[:, None]
    if padding_idx is not None and padding_idx >= 0:
        coef = torch.where(ids == padding_idx, 0, coef)
    same = (ids[:, :, None] == ids[:, None, :]).to(g.dtype)
    return g_sq * (coef[:, :, None] * coef[:, None, :] * same).sum((1, 2))


class EmbeddingBagRoute(Route):
    def _inputs(self):
        return list(self.contribution.root.all_input_nodes)

    def _backward_with(self, scale):
        """fn(*root inputs, extra) -> the contribution with the bag gradients scaled per sample."""
        c, inputs = self.contribution, self._inputs()
        grad = c.root.args[0]

        def fn(*values):
            env = dict(zip(inputs, values[:-1]))
            env[grad] = scale(env[grad], values[-1])
            return replay(c.path, c.root, run_node(c.root, env))

        return fn

    def norm_sq(self, ctx):
        a = _args(self.contribution.root)
        weights = a.get("per_sample_weights")
        nodes = [a["grad"], a["indices"], a["bag_size"]] + ([weights] if weights is not None else [])
        mode, padding_idx = a["mode"], a.get("padding_idx")
        return ctx.builder.call(
            lambda g, i, s, *w: bag_norm_sq(g, i, s, w[0] if w else None, mode, padding_idx), *nodes)

    def reweighted(self, ctx, clip):
        fn = self._backward_with(lambda g, r: scale_by_sample(g, Layout(0), r))
        return ctx.builder.call(fn, *self._inputs(), clip)

    def per_sample(self, ctx):  # for cross terms with other uses of a shared table
        one = self._backward_with(lambda g, mask: torch.where(mask[:, None], g, 0))

        def fn(*values):
            grad = values[self._inputs().index(self.contribution.root.args[0])]
            masks = torch.eye(grad.shape[0], dtype=torch.bool, device=grad.device)
            return torch.vmap(lambda m: one(*values, m))(masks)

        return ctx.builder.call(fn, *self._inputs())


def match(contribution, ctx):
    root = contribution.root
    if root.target != aten._embedding_bag_backward.default:
        return Decline("the gradient is not an EmbeddingBag's", applies=False)
    a = _args(root)
    forward = a["offset2bag"].args[0] if a["offset2bag"].op == "call_function" else None
    forward = forward if getattr(forward, "target", None) == aten._embedding_bag.default else None
    if ctx.layouts.get(a["grad"]) != Layout(0):
        return Decline("the bags' output gradient does not hold one row per sample")
    if a.get("scale_grad_by_freq"):
        return Decline("scale_grad_by_freq couples samples")
    if a["mode"] not in (SUM, MEAN, MAX):
        return Decline("the bag mode is not sum, mean or max")
    if forward is None:
        return Decline("the forward _embedding_bag is not found")
    if bag_layout(forward, ctx.layouts, ctx.batch_size) is None:
        return Decline("the bags are not one per sample (2-D ids without offsets)")
    per_bag = size_hint(ctx.layouts[a["indices"]].inner)
    return EmbeddingBagRoute("embedding_bag", "ghost", contribution,
                             shapes={"B": str(ctx.batch_size), "L": str(per_bag)},
                             extra_flops=ctx.batch_hint * per_bag * per_bag,
                             extra_bytes=4 * ctx.batch_hint * per_bag * per_bag)
