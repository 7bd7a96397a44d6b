"""nn.EmbeddingBag: a shared table read per bag. With 2-D input (B, L) the ids are flattened
to B * L and the offsets are arange(0, B * L, L): bag b is sample b's row. The 1-D input +
offsets form has no batch dim (bags are cut from one flat list) and is left unplaced."""
from __future__ import annotations

import torch
import torch.fx as fx

from .base import MIXED, NO_BATCH, Layout, Outputs, _arg, _shape, aten, fits, known_equal, layout_rule


def _bag_offsets(offsets, per_bag, B, include_last) -> bool:
    """offsets is arange(0, B * L, L) (one more with include_last_offset): one bag per sample."""
    if not (isinstance(offsets, fx.Node) and offsets.target == torch.ops.prims.iota.default):
        return False
    return (offsets.kwargs.get("start", 0) == 0 and known_equal(offsets.kwargs.get("step", 1), per_bag)
            and known_equal(offsets.args[0], B + 1 if include_last else B))


def bag_layout(node, layouts, B):
    """Layout(0, 1, L) of the flat ids when each sample is one bag of L ids, else None."""
    weight, indices, offsets = node.args[:3]
    lay = layouts.get(indices)
    if weight in layouts or not isinstance(lay, Layout) or lay.dim != 0 or not lay.batch_major:
        return None
    if offsets in layouts or not _bag_offsets(offsets, lay.inner, B, _arg(node, 7, "include_last_offset", False)):
        return None
    return lay


@layout_rule(aten._embedding_bag.default, aten._embedding_bag_forward_only.default)
def _embedding_bag(node, layouts, B):
    """Outputs (bags (B, d), offset2bag (B * L), bag_size (B), max_indices (B, d) or (B))."""
    lay = bag_layout(node, layouts, B)
    weights = _arg(node, 6, "per_sample_weights", None)
    if lay is None or (weights is not None and layouts.get(weights) != lay):
        return None
    if _arg(node, 3, "scale_grad_by_freq", False):
        return MIXED  # the gradient is divided by each id's count over the whole batch
    out = []
    for i, v in enumerate(node.meta["val"]):
        cand = lay if i == 1 else Layout(0)
        out.append(cand if fits(cand, tuple(v.shape), B) else NO_BATCH)
    return Outputs(out)


@layout_rule(aten._embedding_bag_backward.default, aten._embedding_bag_dense_backward.default)
def _embedding_bag_backward(node, layouts, B):
    return MIXED  # the table's gradient summed over every sample's bag


@layout_rule(aten._embedding_bag_per_sample_weights_backward.default)
def _per_sample_weights_backward(node, layouts, B):
    """(grad, weight, indices, offsets, offset2bag, mode, padding_idx): one value per id."""
    lay = layouts.get(node.args[2])
    grad = layouts.get(node.args[0])
    if not isinstance(lay, Layout) or grad != Layout(0) or node.args[1] in layouts:
        return None
    return lay if fits(lay, _shape(node), B) else None
