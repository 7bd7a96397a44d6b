"""Views and reshapes: the batch moves with its dim (or into a merged dim as outer/inner)."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import Layout, _arg, _prod, _shape, aten, exact_div, known_equal, layout_rule


@layout_rule(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _view(node, layouts, B):
    lay = layouts[node.args[0]]
    in_shape, out_shape = _shape(node.args[0]), _shape(node)
    # flat index = (p * B + b) * Q + q: find the output dim whose index range holds the B digit
    Q = _prod(in_shape[lay.dim + 1:]) * lay.inner
    below = 1
    for k in range(len(out_shape) - 1, -1, -1):
        inner = exact_div(Q, below)
        if inner is not None:
            outer = exact_div(below * out_shape[k], Q * B)
            if outer is not None:
                return Layout(k, outer, inner)
        below = below * out_shape[k]
    return None


@layout_rule(aten.permute.default)
def _permute(node, layouts, B):
    lay = layouts[node.args[0]]
    perm = [p % len(_shape(node)) for p in node.args[1]]
    return Layout(perm.index(lay.dim), lay.outer, lay.inner)


@layout_rule(aten.t.default, aten.transpose.int)
def _transpose(node, layouts, B):
    lay = layouts[node.args[0]]
    ndim = len(_shape(node))
    d0, d1 = (0, 1) if node.target == aten.t.default else (node.args[1] % ndim, node.args[2] % ndim)
    swap = {d0: d1, d1: d0}
    return Layout(swap.get(lay.dim, lay.dim), lay.outer, lay.inner)


@layout_rule(aten.unsqueeze.default)
def _unsqueeze(node, layouts, B):
    lay = layouts[node.args[0]]
    d = node.args[1] % len(_shape(node))
    return Layout(lay.dim + (1 if d <= lay.dim else 0), lay.outer, lay.inner)


@layout_rule(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def _squeeze(node, layouts, B):
    lay = layouts[node.args[0]]
    in_shape = _shape(node.args[0])
    if node.target == aten.squeeze.default:
        dims = [i for i, s in enumerate(in_shape) if known_equal(s, 1)]
    else:
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        dims = [d % len(in_shape) for d in dims if known_equal(in_shape[d % len(in_shape)], 1)]
    if lay.dim in dims:
        return None
    return Layout(lay.dim - sum(1 for d in dims if d < lay.dim), lay.outer, lay.inner)


@layout_rule(aten.expand.default)
def _expand(node, layouts, B):
    lay = layouts[node.args[0]]
    d = lay.dim + len(_shape(node)) - len(_shape(node.args[0]))
    if not known_equal(_shape(node)[d], _shape(node.args[0])[lay.dim]):
        return None
    return Layout(d, lay.outer, lay.inner)


@layout_rule(aten.as_strided.default)
def _as_strided(node, layouts, B):
    """A strided view inside each sample's slice of a contiguous dim-0 batch keeps samples apart."""
    x = node.args[0]
    sym = lambda v: v.meta.get("val") if isinstance(v, fx.Node) else v  # noqa: E731
    size, stride = [sym(v) for v in node.args[1]], [sym(v) for v in node.args[2]]
    offset = sym(_arg(node, 3, "storage_offset", 0)) or 0
    xv = x.meta.get("val")
    if layouts[x] != Layout(0) or not size or not isinstance(xv, torch.Tensor) or not xv.is_contiguous():
        return None
    per_sample = xv.stride()[0]
    if not (known_equal(size[0], B) and known_equal(stride[0], per_sample)):
        return None
    extent = offset + sum((s - 1) * st for s, st in zip(size[1:], stride[1:]))
    return Layout(0) if statically_known_true(extent < per_sample) else None
