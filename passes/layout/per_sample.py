"""Ops that treat dim 0 sample by sample (convolution, pooling, upsampling, eval-mode batch
norm) and their backward ops: the batch stays in dim 0; a batch elsewhere is MIXED."""
from __future__ import annotations

from .base import _DIM0, MIXED, NO_BATCH, Outputs, _op, _prims_op, _shared_dim0, aten, layout_rule, register_per_sample

register_per_sample(
    aten.convolution.default, aten.native_group_norm.default,
    aten._native_batch_norm_legit_no_training.default, aten.max_pool2d_with_indices.default,
    aten.max_pool3d_with_indices.default, aten.avg_pool2d.default, aten.avg_pool3d.default,
    aten._adaptive_avg_pool2d.default, aten._adaptive_avg_pool3d.default,
    aten.adaptive_max_pool2d.default, aten.upsample_nearest2d.default,
    aten.upsample_bilinear2d.default, aten.im2col.default, aten.pixel_shuffle.default,
    aten.pixel_unshuffle.default, _op("avg_pool1d"), _op("_low_memory_max_pool2d_with_offsets"),
    _prims_op("_low_memory_max_pool2d_with_offsets"),
)

# Inductor decomposes max pooling into these: each sample's window maxima, sample by sample.
register_per_sample(
    _prims_op("_low_memory_max_pool_with_offsets"),
    _prims_op("_low_memory_max_pool_offsets_to_indices"),
    aten.max_pool2d_with_indices_backward.default, aten.max_pool3d_with_indices_backward.default,
    aten.avg_pool2d_backward.default, aten.avg_pool3d_backward.default,
    aten._adaptive_avg_pool2d_backward.default, aten._adaptive_avg_pool3d_backward.default,
    aten.adaptive_max_pool2d_backward.default, aten.adaptive_max_pool3d.default,
    aten.adaptive_max_pool3d_backward.default,
)


@layout_rule(aten._native_batch_norm_legit_functional.default, aten.native_batch_norm.default,
             aten._native_batch_norm_legit.default)
def _batch_norm(node, layouts, B):
    if node.args[5]:  # training: statistics over every dim but the channels
        return MIXED if layouts.get(node.args[0]) is not None and layouts[node.args[0]].dim != 1 else None
    return _DIM0(node, layouts, B)


@layout_rule(aten.convolution_backward.default)
def _convolution_backward(node, layouts, B):
    grad_out, x, weight = node.args[:3]
    if weight in layouts:
        return None
    if grad_out not in layouts or x not in layouts:
        return None
    lay = _shared_dim0((grad_out, x), layouts, B)
    if lay is None:
        return None  # a batch that is not in dim 0: no rule
    mask = node.args[10]
    return Outputs(tuple(out if m else NO_BATCH for out, m in zip((lay, MIXED, MIXED), mask)))
