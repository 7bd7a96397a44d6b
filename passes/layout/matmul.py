"""Matrix products: MIXED when the batch is contracted; a batch on one operand's free dim
stays in the output's matching dim."""
from __future__ import annotations

from .base import MIXED, Layout, _one, _shape, aten, layout_rule
from .pointwise import _broadcast


def _matmul_layout(a_lay, b_lay, contract_a, contract_b, out_a, out_b):
    if (a_lay is not None and a_lay.dim == contract_a) or (b_lay is not None and b_lay.dim == contract_b):
        return MIXED
    if a_lay is not None and b_lay is not None:
        return None
    if a_lay is not None:
        return Layout(out_a(a_lay.dim), a_lay.outer, a_lay.inner)
    return Layout(out_b(b_lay.dim), b_lay.outer, b_lay.inner)


@layout_rule(aten.mm.default)
def _mm(node, layouts, B):
    a, b = node.args[:2]
    return _matmul_layout(layouts.get(a), layouts.get(b), 1, 0, lambda d: 0, lambda d: 1)


@layout_rule(aten.addmm.default)
def _addmm(node, layouts, B):
    bias, a, b = node.args[:3]
    out = _matmul_layout(layouts.get(a), layouts.get(b), 1, 0, lambda d: 0, lambda d: 1)
    if bias in layouts and out not in (MIXED, None) and _broadcast(node, layouts, B) != out:
        return None
    return out


@layout_rule(aten.bmm.default)
def _bmm(node, layouts, B):
    a, b = node.args[:2]
    return _bmm_layout(layouts.get(a), layouts.get(b))


def _bmm_layout(la, lb):
    if (la is not None and la.dim == 2) or (lb is not None and lb.dim == 1):
        return MIXED  # contracts the batch
    # dim 0 or 1 of a stays dim 0 or 1 of the output; dim 0 or 2 of b stays put. Compared, not
    # hashed: under dynamic shapes a layout's sizes can be SymInts, which do not hash
    outs = [lay for lay in (la, None if lb is None else Layout(lb.dim, lb.outer, lb.inner)) if lay is not None]
    return outs[0] if outs and all(o == outs[0] for o in outs) else None


@layout_rule(aten._trilinear.default)
def _trilinear(node, layouts, B):
    """_trilinear(i1, i2, i3, expand1, expand2, expand3, sumdim): each input is unsqueezed at
    its expand dims, the three are multiplied, and `sumdim` is summed (nn.Bilinear)."""
    inputs, expands, sumdim = node.args[:3], node.args[3:6], set(node.args[6])
    ndim = len(_shape(inputs[0])) + len(expands[0])
    placed = []
    for x, expand in zip(inputs, expands):
        if x not in layouts:
            continue
        lay = layouts[x]
        kept = [d for d in range(ndim) if d not in set(expand)]
        placed.append(Layout(kept[lay.dim], lay.outer, lay.inner))
    lay = _one(placed)
    if lay is None:
        return None
    if lay.dim in sumdim:
        return MIXED
    return Layout(lay.dim - sum(1 for d in sumdim if d < lay.dim), lay.outer, lay.inner)


@layout_rule(aten.baddbmm.default)
def _baddbmm(node, layouts, B):
    """baddbmm(input, b1, b2) = beta * input + alpha * bmm(b1, b2) (attention scores plus a
    mask: nn.MultiheadAttention with attn_mask / key_padding_mask / need_weights)."""
    bias, a, b = node.args[:3]
    out = _bmm_layout(layouts.get(a), layouts.get(b))
    if bias in layouts and out not in (MIXED, None) and _broadcast(node, layouts, B) != out:
        return None  # the added input carries the batch elsewhere
    if out is None and bias in layouts and a not in layouts and b not in layouts:
        return _broadcast(node, layouts, B)  # only the added input is per sample
    return out


@layout_rule(aten.addbmm.default)
def _addbmm(node, layouts, B):
    """addbmm(input, b1, b2) = beta * input + alpha * sum_i b1[i] @ b2[i]: the sum over dim 0
    mixes a batch there; a batch in rows of b1 or columns of b2 stays in that output dim."""
    bias, a, b = node.args[:3]
    la, lb = layouts.get(a), layouts.get(b)
    if (la is not None and la.dim in (0, 2)) or (lb is not None and lb.dim in (0, 1)):
        return MIXED
    out = _matmul_layout(la, lb, 2, 1, lambda d: d - 1, lambda d: d - 1)
    if bias in layouts and out not in (MIXED, None) and _broadcast(node, layouts, B) != out:
        return None
    return out
