"""Pointwise ops (every op tagged pointwise) and ops that keep each element where it is."""
from __future__ import annotations

import torch

from .base import NO_BATCH, Layout, _shape, aten, known_equal, layout_rule


@layout_rule(
    torch.Tag.pointwise,  # the default for every op tagged pointwise
    aten.where.self, aten.clone.default, aten.alias.default, aten._to_copy.default,
    aten.copy.default, aten.masked_fill.Scalar, aten.masked_fill.Tensor,
    aten.native_dropout_backward.default, aten.threshold_backward.default,
    aten.gelu_backward.default, aten.silu_backward.default, aten.sigmoid_backward.default,
    aten.tanh_backward.default, aten.lift_fresh_copy.default,
    torch.ops.prims.convert_element_type.default,
    aten.native_dropout.default, aten.rand_like.default, aten.randn_like.default,
    aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default,
    aten.full_like.default, aten.bernoulli.default, aten.bernoulli.p, aten.detach.default,
    aten.tril.default, aten.triu.default)
def _broadcast(node, layouts, B):
    out_shape = _shape(node)
    if out_shape is None:
        return None
    result = None
    for a in node.all_input_nodes:
        lay = layouts.get(a)
        if lay is None:
            continue
        in_shape = _shape(a)
        d = lay.dim + len(out_shape) - len(in_shape)
        if not known_equal(out_shape[d], in_shape[lay.dim]):
            return None  # the batch dim was broadcast: not a per-sample op
        cand = Layout(d, lay.outer, lay.inner)
        if result is not None and result != cand:
            return None
        result = cand
    return result


@layout_rule(aten.new_empty_strided.default, aten.new_empty.default, aten.new_zeros.default,
             aten.new_ones.default, aten.new_full.default)
def _new_tensor(node, layouts, B):
    return NO_BATCH  # a fresh tensor: only its dtype and device come from the batched input
