"""Select, slice, split, cat and stack, and the scatters that write a slice back (their
backward): taking or joining pieces along the batch dim is MIXED, along other dims it is not."""
from __future__ import annotations

import torch.fx as fx

from .base import (
    MIXED,
    Layout,
    Outputs,
    _arg,
    _dim,
    _one,
    _shape,
    _val,
    aten,
    exact_div,
    fits,
    known_equal,
    layout_rule,
    same_shape,
)


@layout_rule(aten.select.int)
def _select(node, layouts, B):
    lay = layouts[node.args[0]]
    d = _dim(node.args[1], len(_shape(node.args[0])))
    if d == lay.dim:
        return MIXED  # one sample's values, handed on without a batch
    return Layout(lay.dim - (1 if d < lay.dim else 0), lay.outer, lay.inner)


def _blocks(lay, start, length, B):
    """The layout of elements [start, start + length) of a dim batched as `lay` when they are
    whole blocks of B samples (outer index o holds elements [o, o + 1) * B * inner), else None:
    the per-step pieces of a time-first stack (and their gradients)."""
    block = B * lay.inner
    first, count = exact_div(start, block), exact_div(length, block)
    if first is None or count is None or known_equal(count, 0):
        return None
    return Layout(lay.dim, count, lay.inner)


@layout_rule(aten.slice.Tensor)
def _slice(node, layouts, B):
    lay = layouts[node.args[0]]
    in_shape = _shape(node.args[0])
    d = _dim(_arg(node, 1, "dim", 0), len(in_shape))
    if d != lay.dim or same_shape(_shape(node), in_shape):
        return lay
    start = _val(_arg(node, 2, "start", None)) or 0
    if _arg(node, 4, "step", 1) != 1 or (isinstance(start, int) and start < 0):
        return MIXED  # drops samples
    return _blocks(lay, start, _shape(node)[d], B) or MIXED


@layout_rule(aten.unbind.int, aten.split.Tensor, aten.split_with_sizes.default)
def _split(node, layouts, B):
    lay = layouts[node.args[0]]
    unbind = node.target == aten.unbind.int
    d = _dim(_arg(node, 1 if unbind else 2, "dim", 0), len(_shape(node.args[0])))
    if d != lay.dim:
        if unbind:
            return Layout(lay.dim - (1 if d < lay.dim else 0), lay.outer, lay.inner)
        return lay  # the layout of every piece
    if unbind:
        return MIXED
    pieces, start = [], 0
    for v in node.meta["val"]:
        pieces.append(_blocks(lay, start, v.shape[d], B) or MIXED)
        start = start + v.shape[d]
    return Outputs(pieces)


@layout_rule(aten.cat.default)
def _cat(node, layouts, B):
    parts = [t for t in node.args[0] if isinstance(t, fx.Node)]
    lay = _one(layouts[t] for t in parts if t in layouts)
    if lay is None:
        return None
    if _dim(_arg(node, 1, "dim", 0), len(_shape(node))) != lay.dim:
        return lay if fits(lay, _shape(node), B) else None
    if not all(t in layouts for t in parts):
        return MIXED  # rows that belong to no sample join the batch
    # joining whole blocks of samples (states stacked time-first): outer counts the blocks
    out = Layout(lay.dim, lay.outer * len(parts), lay.inner)
    return out if fits(out, _shape(node), B) else MIXED


@layout_rule(aten.stack.default)
def _stack(node, layouts, B):
    lay = _one(layouts[t] for t in node.args[0] if t in layouts)
    if lay is None:
        return None
    d = _dim(_arg(node, 1, "dim", 0), len(_shape(node)))
    return Layout(lay.dim + (1 if d <= lay.dim else 0), lay.outer, lay.inner)


@layout_rule(aten.select_scatter.default)
def _select_scatter(node, layouts, B):
    """select_scatter(base, src, dim, index): src (one dim fewer) written into base at index."""
    base, src, dim = node.args[:3]
    ndim = len(_shape(node))
    dim = _dim(dim, ndim)
    out = None
    if src in layouts:
        lay = layouts[src]
        out = Layout(lay.dim + (1 if dim <= lay.dim else 0), lay.outer, lay.inner)
    if base in layouts:
        if layouts[base].dim == dim or (out is not None and layouts[base] != out):
            return None
        out = layouts[base]
    return out if out is not None and fits(out, _shape(node), B) else None


@layout_rule(aten.slice_scatter.default)
def _slice_scatter(node, layouts, B):
    """slice_scatter(base, src, dim, ...): src written into a slice of base along dim."""
    base, src = node.args[:2]
    dim = _dim(_arg(node, 2, "dim", 0), len(_shape(node)))
    lay = _one(layouts[a] for a in (base, src) if a in layouts)
    if lay is None or (lay.dim == dim and not same_shape(_shape(src), _shape(node))):
        return None
    return lay if fits(lay, _shape(node), B) else None
