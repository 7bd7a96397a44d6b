"""Reductions: MIXED when the batch dim is reduced, else the batch keeps its place."""
from __future__ import annotations

from . import MIXED, Layout, _arg, _as_list, _dim, _register, _shape, aten, layout_rule


def _reduced_dims(node):
    ndim = len(_shape(node.args[0]))
    dims = node.args[1] if len(node.args) > 1 else None
    if dims is None or dims == []:
        return list(range(ndim)), False
    dims = [dims] if isinstance(dims, int) else list(dims)
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    return [d % ndim for d in dims], keepdim


@layout_rule(aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default,
             aten.sum.default, aten.mean.default, aten.var_mean.correction, aten.var.correction,
             aten.prod.dim_int, aten.any.dim, aten.argmax.default, aten.logsumexp.default)
def _reduction(node, layouts, B):
    lay = layouts[node.args[0]]
    if node.target in (aten.sum.default, aten.mean.default):
        return MIXED
    dims, keepdim = _reduced_dims(node)
    if lay.dim in dims:
        return MIXED
    return Layout(lay.dim if keepdim else lay.dim - sum(1 for d in dims if d < lay.dim),
                  lay.outer, lay.inner)


def _reduction_over(dims_of, keepdim_of):
    def rule(node, layouts, B):
        lay = layouts[node.args[0]]
        ndim = len(_shape(node.args[0]))
        dims = dims_of(node)
        dims = list(range(ndim)) if dims is None or dims == [] else [_dim(d, ndim) for d in _as_list(dims)]
        if lay.dim in dims:
            return MIXED
        keep = keepdim_of(node)
        return Layout(lay.dim if keep else lay.dim - sum(1 for d in dims if d < lay.dim),
                      lay.outer, lay.inner)

    return rule


_register(_reduction_over(lambda n: _arg(n, 1, "dim", None), lambda n: _arg(n, 2, "keepdim", False)),
          aten.median.dim, aten.nanmedian.dim, aten.mode.default, aten.max.dim, aten.min.dim,
          aten.all.dim, aten.any.dims, aten.argmin.default, aten.count_nonzero.dim_IntList,
          aten.std.correction)
_register(_reduction_over(lambda n: None, lambda n: False),
          aten.median.default, aten.nanmedian.default, aten.max.default, aten.min.default,
          aten.all.default, aten.any.default, aten.nansum.default)
_register(_reduction_over(lambda n: _arg(n, 2, "dim", None), lambda n: _arg(n, 3, "keepdim", False)),
          aten.linalg_vector_norm.default)
