"""Normalizations that combine values along their last dims only (layer norm, RMS norm)."""
from __future__ import annotations

from .base import MIXED, Outputs, _along, _one, _register, _shape, aten, layout_rule

_register(_along(lambda n, nd: range(nd - len(n.args[1]), nd)), aten.native_layer_norm.default)


@layout_rule(aten._fused_rms_norm.default)
def _fused_rms_norm(node, layouts, B):
    x = node.args[0]
    if x not in layouts or any(a in layouts for a in node.all_input_nodes if a is not x):
        return None
    lay = layouts[x]
    ndim = len(_shape(x))
    if lay.dim >= ndim - len(node.args[1]):
        return MIXED
    return Outputs((lay, lay))  # (output, rstd): rstd keeps the leading dims


@layout_rule(aten._fused_rms_norm_backward.default)
def _fused_rms_norm_backward(node, layouts, B):
    grad, x = node.args[:2]
    lay = _one(layouts[a] for a in (grad, x) if a in layouts)
    if lay is None:
        return None
    return Outputs((lay, MIXED))  # (grad_input, grad_weight)
