"""Un-reduce: a gradient that is a sum over the batch of a per-sample expression.

Covers biases, LayerNorm/GroupNorm affine parameters, elementwise scales and shifts: their
gradient is sum(X, dims) with the batch among `dims`. Summing over the other dims only gives
the per-sample gradients (B, *shape) directly; parameters are small, so instantiating is cheap.
"""
from __future__ import annotations

import torch

from ..layout import Layout
from . import InstantiatedRoute, normalized, replay, rule, split_batch

aten = torch.ops.aten


def _summed_dims(root):
    x = root.args[0]
    ndim = x.meta["val"].dim()
    if root.target == aten.sum.default:
        return list(range(ndim)), False
    dims = root.args[1] if len(root.args) > 1 else None
    dims = list(range(ndim)) if not dims else [d % ndim for d in dims]
    keepdim = root.args[2] if len(root.args) > 2 else root.kwargs.get("keepdim", False)
    return dims, keepdim


class UnreduceRoute(InstantiatedRoute):
    def __init__(self, contribution, x, layout, dims, keepdim, **kw):
        super().__init__("unreduce", "instantiate", contribution, **kw)
        self.x, self.layout, self.dims, self.keepdim = x, layout, dims, keepdim

    def per_sample(self, ctx):
        c, layout, dims, keepdim = self.contribution, self.layout, self.dims, self.keepdim
        # split_batch puts B in front, so dim d of x (the batch dim: its inner part) is at d + 1
        moved = [d + 1 for d in dims]

        def fn(x, bref):
            per = split_batch(x, layout, bref.shape[0]).sum(moved, keepdim=keepdim)
            return torch.vmap(lambda v: replay(c.path, c.root, v))(per)

        return ctx.builder.call(fn, self.x, ctx.bref)


@rule("unreduce")
def match_unreduce(contribution, ctx):
    root = contribution.root
    if root.target not in (aten.sum.dim_IntList, aten.sum.default):
        return None
    x = root.args[0]
    layout = ctx.layouts.get(x)
    if not isinstance(layout, Layout):
        return None
    layout = normalized(layout)  # outer > 1 (sequence-first rows): split_batch handles it
    if layout is None:
        return None
    dims, keepdim = _summed_dims(root)
    if layout.dim not in dims:
        return None
    numel = ctx.param_numel
    return UnreduceRoute(contribution, x, layout, dims, keepdim,
                         shapes={"B": str(ctx.batch_size), "x": str(tuple(x.meta["val"].shape))},
                         extra_flops=3 * ctx.batch_hint * numel, extra_bytes=4 * ctx.batch_hint * numel)
