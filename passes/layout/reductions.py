"""Reductions: MIXED when the batch dim is reduced, else the batch keeps its place."""
from __future__ import annotations

from .base import MIXED, Layout, _register, aten, layout_rule, reduced_dims


def _reduced(lay, dims, keepdim):
    """The layout after reducing `dims`: MIXED when the batch dim is one of them."""
    if lay.dim in dims:
        return MIXED
    return Layout(lay.dim if keepdim else lay.dim - sum(1 for d in dims if d < lay.dim),
                  lay.outer, lay.inner)


@layout_rule(aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default,
             aten.sum.default, aten.mean.default, aten.var_mean.correction, aten.var.correction,
             aten.prod.dim_int, aten.any.dim, aten.argmax.default, aten.logsumexp.default)
def _reduction(node, layouts, B):
    if node.target in (aten.sum.default, aten.mean.default):
        return MIXED
    return _reduced(layouts[node.args[0]], *reduced_dims(node))


def _reduction_over(dim_at, keepdim_at):
    """Rule for a reduction whose dim and keepdim arguments sit at these positions (None: every
    dim, no keepdim, whatever the arguments say)."""

    def rule(node, layouts, B):
        return _reduced(layouts[node.args[0]], *reduced_dims(node, dim_at, keepdim_at))

    return rule


_register(_reduction_over(1, 2),
          aten.median.dim, aten.nanmedian.dim, aten.mode.default, aten.max.dim, aten.min.dim,
          aten.all.dim, aten.any.dims, aten.argmin.default, aten.count_nonzero.dim_IntList,
          aten.std.correction)
_register(_reduction_over(None, None),
          aten.median.default, aten.nanmedian.default, aten.max.default, aten.min.default,
          aten.all.default, aten.any.default, aten.nansum.default)
_register(_reduction_over(2, 3),
          aten.linalg_vector_norm.default)
