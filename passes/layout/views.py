"""Views and reshapes: the batch moves with its dim (or into a merged dim as outer/inner)."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .base import Layout, _arg, _prod, _shape, aten, exact_div, known_equal, layout_rule


@layout_rule(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _view(node, layouts, B):
    return _viewed(_shape(node.args[0]), layouts[node.args[0]], _shape(node), B)


def _viewed(in_shape, lay, out_shape, B):
    """The layout of a tensor batched as `lay` after a view from `in_shape` to `out_shape`."""
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


def _sample_chunk(x, lay, B):
    """P when x is contiguous and sample b owns its flat elements [b * P, (b + 1) * P)."""
    xv = x.meta.get("val")
    if not (isinstance(lay, Layout) and lay.dim == 0 and lay.batch_major and isinstance(xv, torch.Tensor)
            and xv.is_contiguous() and known_equal(xv.storage_offset(), 0)):
        return None
    return exact_div(xv.numel(), B)


def _strided_within_samples(node, P, B) -> bool:
    """Whether as_strided(_, size, stride, offset) of `node`, on a tensor whose samples own flat
    chunks of P elements, puts sample b in row b of dim 0 reading (or writing) its own chunk."""
    sym = lambda v: v.meta.get("val") if isinstance(v, fx.Node) else v  # noqa: E731
    first = 2 if node.target == aten.as_strided_scatter.default else 1
    size, stride = [sym(v) for v in node.args[first]], [sym(v) for v in node.args[first + 1]]
    offset = sym(_arg(node, first + 2, "storage_offset", 0)) or 0
    if P is None or not size or not (known_equal(size[0], B) and known_equal(stride[0], P)):
        return False
    extent = offset + sum((s - 1) * st for s, st in zip(size[1:], stride[1:]))
    return statically_known_true(extent < P)


@layout_rule(aten.as_strided.default)
def _as_strided(node, layouts, B):
    """A strided view inside each sample's chunk of a contiguous dim-0 batch keeps samples apart."""
    x = node.args[0]
    return Layout(0) if _strided_within_samples(node, _sample_chunk(x, layouts[x], B), B) else None


@layout_rule(aten.as_strided_scatter.default)
def _as_strided_scatter(node, layouts, B):
    """as_strided_scatter(base, src, size, stride, offset) writing each sample's rows of src
    (batch in dim 0) inside that sample's chunk of a contiguous base: the backward of such a
    view (adaptive pooling's memory-format restride)."""
    base, src = node.args[:2]
    base_shape = _shape(base)
    if layouts.get(src) != Layout(0) or base_shape is None:
        return None
    P = _sample_chunk(base, layouts[base], B) if base in layouts else None
    if base not in layouts and base.meta["val"].is_contiguous():
        P = exact_div(_prod(base_shape), B)
    if not _strided_within_samples(node, P, B):
        return None
    return _viewed((B, P), Layout(0), base_shape, B)


@layout_rule(aten.repeat.default)
def _repeat(node, layouts, B):
    """x.repeat(r): new leading dims, and each dim tiled r times; tiling the batch dim makes
    r blocks of the batch (outer * r)."""
    lay = layouts[node.args[0]]
    repeats = node.args[1]
    d = lay.dim + len(repeats) - len(_shape(node.args[0]))
    r = repeats[d].meta["val"] if isinstance(repeats[d], fx.Node) else repeats[d]
    return Layout(d, lay.outer * r, lay.inner)
