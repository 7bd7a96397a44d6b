"""Scaled dot-product attention: combines values along its last two dims (sequence, features)
of q, k, v; the batch and head dims stay per sample."""
from __future__ import annotations

import torch
import torch.fx as fx

from .base import MIXED, NO_BATCH, Outputs, _along, _one, _op, _register, _shape, _shared_dim0, fits

_register(_along(lambda n, nd: range(nd - 2, nd)), *[
    _op(name) for name in ("_scaled_dot_product_flash_attention_for_cpu",
                           "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                           "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_attention_math",
                           "scaled_dot_product_attention")])


def _sdpa_backward(node, layouts, B):
    """Attention backward: (grad_q, grad_k, grad_v) keep the batch dim of q, k, v (dim 0)."""
    tensors = [a for a in node.args[:6] if isinstance(a, fx.Node)]
    mask = node.kwargs.get("attn_mask")
    if isinstance(mask, fx.Node):
        tensors.append(mask)
    lay = _shared_dim0(tensors, layouts, B)
    if lay is None:
        return None
    return Outputs((lay, lay, lay))


_register(_sdpa_backward, _op("_scaled_dot_product_flash_attention_for_cpu_backward"))


def _sdpa_forward_outputs(node, layouts, B):
    """Attention forward with several outputs (output, logsumexp, ...): each per sample."""
    tensors = [a for a in node.args[:3] if isinstance(a, fx.Node)]
    mask = node.kwargs.get("attn_mask")
    if isinstance(mask, fx.Node):
        tensors.append(mask)
    lay = _one(layouts[a] for a in tensors if a in layouts)
    if lay is None:
        return None
    for a in tensors:
        if a in layouts and layouts[a].dim >= len(_shape(a)) - 2:
            return MIXED
    vals = node.meta.get("val")
    if not isinstance(vals, (tuple, list)):
        return lay if fits(lay, _shape(node), B) else None
    return Outputs(tuple(lay if isinstance(v, torch.Tensor) and fits(lay, tuple(v.shape), B) else NO_BATCH
                         for v in vals))


_register(_sdpa_forward_outputs, _op("_scaled_dot_product_flash_attention_for_cpu"))
