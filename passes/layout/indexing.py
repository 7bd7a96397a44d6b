"""Gathers and scatters by index: per sample when each sample's index picks within its own rows
(or from a shared table), MIXED when rows are picked or written along the batch."""
from __future__ import annotations

import torch
import torch.fx as fx

from ..viewops import CASTS
from .base import MIXED, Layout, _arg, _dim, _one, _shape, aten, fits, known_equal, layout_rule, same_shape


@layout_rule(aten.index_select.default)
def _index_select(node, layouts, B):
    x, d, index = node.args[:3]
    d = _dim(d, len(_shape(x)))
    if x in layouts and index in layouts:
        return None
    if x in layouts:
        return MIXED if d == layouts[x].dim else layouts[x]
    lay = layouts[index]  # rows of a shared table picked per sample (like an embedding)
    return Layout(d, lay.outer, lay.inner)


@layout_rule(aten.gather.default)
def _gather(node, layouts, B):
    x, d, index = node.args[:3]
    lay = _one(layouts[a] for a in (x, index) if a in layouts)
    if lay is None:
        return None
    if x in layouts and _dim(d, len(_shape(x))) == lay.dim:
        return MIXED  # reads other samples' values
    return lay if fits(lay, _shape(node), B) else None


@layout_rule(aten.embedding.default)
def _embedding(node, layouts, B):
    weight, indices = node.args[:2]
    if weight in layouts:
        return None
    if _arg(node, 3, "scale_grad_by_freq", False):
        return MIXED  # the gradient is divided by each token's count over the whole batch
    return layouts[indices]  # output shape = indices.shape + (embedding_dim,)


@layout_rule(aten.embedding_dense_backward.default)
def _embedding_dense_backward(node, layouts, B):
    return MIXED  # a (num_weights, dim) table gradient summed over every sample's tokens


_SAME_VALUES = CASTS | {aten.clone.default, aten.expand.default}  # arange(B) keeps its values


def _batch_arange_axis(node, B):
    """The axis holding arange(B) when `node` is arange(B) with unit dims added (HF builds
    attention masks as mask[arange(B)[:, None, None, None], kv_idx]); else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target == torch.ops.prims.iota.default:
        whole = (node.kwargs.get("start", 0) == 0 and node.kwargs.get("step", 1) == 1
                 and known_equal(node.args[0], B))
        return 0 if whole else None
    inner = _batch_arange_axis(node.args[0], B) if node.args else None
    if inner is None:
        return None
    if node.target == aten.unsqueeze.default:
        return inner + (1 if _dim(node.args[1], len(_shape(node))) <= inner else 0)
    if node.target in _SAME_VALUES:  # expand may add leading dims
        return inner + len(_shape(node)) - len(_shape(node.args[0]))
    if node.target == aten.slice.Tensor and _whole_slice(node):  # arange(B)[:] (symbolic B)
        return inner
    return None


def _whole_slice(node) -> bool:
    """slice(x, dim, 0, end, 1) that keeps all of x (end at or past the size)."""
    start, step = _arg(node, 2, "start", None), _arg(node, 4, "step", 1)
    return start in (None, 0) and step == 1 and same_shape(_shape(node), _shape(node.args[0]))


def _advanced_layout(indices):
    """(rank of the broadcast advanced-index shape, output dim where it starts) for x[indices]:
    consecutive advanced indices stay in place, separated ones move to the front."""
    present = [i for i, idx in enumerate(indices) if idx is not None]
    width = max(len(_shape(indices[i])) for i in present)
    first = present[0] if present == list(range(present[0], present[-1] + 1)) else 0
    return width, first


def _per_sample_rows(x_lay, indices, B, layouts):
    """For x[indices] with x batched in dim d (batch-major) and indices[d] = arange(B): the
    output dim holding the batch, when every index picks within each sample's own rows."""
    d = x_lay.dim
    if not (x_lay.batch_major and known_equal(x_lay.inner, 1)) or d >= len(indices):
        return None
    idx = indices[d]
    if idx is None:
        return None
    axis = _batch_arange_axis(idx, B)
    if axis is None:
        return None
    width, first = _advanced_layout(indices)
    pos = width - len(_shape(idx)) + axis
    for other in indices:
        if other is None or other is idx or other not in layouts:
            continue
        lay = layouts[other]
        if not (isinstance(lay, Layout) and lay.batch_major
                and width - len(_shape(other)) + lay.dim == pos):
            return None  # another sample's index would pick from this sample's rows
    return first + pos


@layout_rule(aten.index.Tensor, aten._unsafe_index.Tensor)
def _index(node, layouts, B):
    x, indices = node.args[:2]
    batched_idx = [i for i in indices if i is not None and i in layouts]
    if x in layouts:
        lay = layouts[x]
        if lay.dim < len(indices) and indices[lay.dim] is not None:
            out = _per_sample_rows(lay, indices, B, layouts)
            if out is not None and fits(Layout(out), _shape(node), B):
                return Layout(out)  # sample b reads row b of x only
            return MIXED if not batched_idx else None  # picks rows along the batch
        if batched_idx:
            return None
        # advanced indices only after the batch dim: the leading dims stay in place
        if all(i is None for i in indices[:lay.dim]):
            return lay if fits(lay, _shape(node), B) else None
        return None
    if len(indices) == 1 and batched_idx:
        return layouts[batched_idx[0]]  # a shared table indexed per sample
    return None


@layout_rule(aten._unsafe_masked_index_put_accumulate.default, aten.index_put.default,
             aten._unsafe_index_put.default)
def _index_put_accumulate(node, layouts, B):
    base = node.args[0]
    if base in layouts:
        return _masked_fill_put(node, layouts)
    masked = node.target == aten._unsafe_masked_index_put_accumulate.default
    indices, values = node.args[2:4] if masked else node.args[1:3]
    lay = layouts.get(values)
    kept = _batch_before_indices(base, indices, values, lay, layouts)
    if kept is not None:
        return kept
    shared = values not in layouts  # the same values for every sample (a constant 1)
    if shared or (isinstance(lay, Layout) and lay.batch_major and known_equal(lay.inner, 1)):
        for d, idx in enumerate(indices):
            # x[arange(B), ...] = v, or the backward of x[arange(B), ...]: each sample's values
            # go to its own row d (HF builds length masks as mask[arange(B), lengths - 1] = 1)
            if idx is None or not known_equal(_shape(base)[d], B):
                continue
            rows = _per_sample_rows(Layout(d), indices, B, layouts)
            if rows is not None and (shared or rows == lay.dim):
                return Layout(d)
    return MIXED  # rows of a shared table written from (possibly) every sample


def _batch_before_indices(base, indices, values, lay, layouts):
    """The layout of index_put(base, indices, values) when the values carry the batch in a dim
    ahead of every (unbatched) index: the backward of x[:, :, idx] puts each sample's values
    back into its own rows."""
    present = [idx for idx in indices if idx is not None]
    if not isinstance(lay, Layout) or not present or any(idx in layouts for idx in present):
        return None
    width, first = _advanced_layout(indices)
    rank = len(_shape(base)) - len(present) + width  # indexed dims replaced by the index shape
    if len(_shape(values)) != rank or lay.dim >= first:
        return None
    return lay if known_equal(_shape(base)[lay.dim], _shape(values)[lay.dim]) else None


def _masked_fill_put(node, layouts):
    """x[mask] = v with one bool mask over x's leading dims and one value for every element: an
    elementwise fill (HF: hidden_states[~mask] = 0), per sample like masked_fill."""
    base, indices, values = node.args[:3]
    lay = layouts[base]
    if node.target != aten.index_put.default or len(indices) != 1 or values in layouts:
        return None
    mask = indices[0]
    mv, vv = mask.meta.get("val") if isinstance(mask, fx.Node) else None, values.meta.get("val")
    if not (isinstance(mv, torch.Tensor) and mv.dtype == torch.bool and vv.numel() == 1):
        return None
    if mask in layouts and layouts[mask] != lay:
        return None
    return lay if same_shape(_shape(mask), _shape(base)[:mv.dim()]) else None


@layout_rule(aten.scatter_add.default, aten.scatter.src, aten.scatter.value, aten.scatter_reduce.two)
def _scatter(node, layouts, B):
    """scatter*(base, dim, index, src): rows of dim 0... are written within each sample when the
    batch dim is not the scatter dim and every batched operand (and the output) agree on it."""
    dim = _dim(node.args[1], len(_shape(node)))
    lay = _one(layouts[a] for a in node.all_input_nodes if a in layouts)
    if lay is None or lay.dim == dim:
        return None
    if not known_equal(_shape(node)[lay.dim], _shape(node.args[2])[lay.dim]):
        return None
    return lay if fits(lay, _shape(node), B) else None
