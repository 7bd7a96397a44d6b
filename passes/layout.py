"""Where the batch lives in every tensor of the joint graph.

A Layout says: dimension `dim` of this tensor has size outer * B * inner, and sample b owns the
index range (o * B + b) * inner + [0, inner) for each o < outer. Plain (B, ...) tensors are
Layout(0, 1, 1); a (B*T, d) view of a (B, T, d) tensor is Layout(0, 1, T).

Forward tensors start from the marked model inputs, backward tensors from the tangents (model
outputs carry the batch in dim 0). MIXED marks a tensor in which samples were combined (a
reduction or contraction over the batch); UNKNOWN marks an op this analysis has no rule for.
Rules use layouts to find per-sample structure; an UNKNOWN only makes them decline.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten


@dataclass(frozen=True)
class Layout:
    dim: int
    outer: object = 1  # int or SymInt
    inner: object = 1

    @property
    def batch_major(self) -> bool:
        return known_equal(self.outer, 1)


class _Mark:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


MIXED = _Mark("MIXED")
UNKNOWN = _Mark("UNKNOWN")


def known_equal(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return statically_known_true(a == b)


def same_shape(a, b) -> bool:
    """Shape equality that never installs a guard on symbolic sizes."""
    return len(a) == len(b) and all(known_equal(x, y) for x, y in zip(a, b))


def exact_div(a, b):
    """a / b when b divides a for every value of the symbols, else None."""
    if isinstance(a, int) and isinstance(b, int):
        return a // b if b and a % b == 0 else None
    q = a // b
    return q if statically_known_true(q * b == a) else None


def _prod(xs):
    return math.prod(xs) if all(isinstance(x, int) for x in xs) else _sym_prod(xs)


def _sym_prod(xs):
    out = 1
    for x in xs:
        out = out * x
    return out


def _shape(node):
    v = node.meta.get("val")
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


LAYOUT_RULES: dict = {}


def layout_rule(*targets):
    def register(fn):
        for t in targets:
            LAYOUT_RULES[t] = fn
        return fn

    return register


def analyze(graph: fx.Graph, batched: dict[fx.Node, Layout], batch_size) -> dict:
    """Layouts of every node reachable from the `batched` seeds; others are absent (no batch)."""
    layouts: dict = dict(batched)
    for node in graph.nodes:
        if node in layouts or node.op != "call_function":
            continue
        inputs = [a for a in node.all_input_nodes if a in layouts]
        if not inputs:
            continue
        if any(layouts[a] is MIXED for a in inputs):
            layouts[node] = MIXED
            continue
        if any(layouts[a] is UNKNOWN for a in inputs):
            layouts[node] = UNKNOWN
            continue
        rule = LAYOUT_RULES.get(node.target) or _pointwise_rule(node)
        out = rule(node, layouts, batch_size) if rule else UNKNOWN
        layouts[node] = UNKNOWN if out is None else out
    return layouts


def _pointwise_rule(node):
    target = node.target
    if isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
        return _broadcast
    return None


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


layout_rule(aten.where.self, aten.clone.default, aten.alias.default, aten._to_copy.default,
            aten.copy.default, aten.masked_fill.Scalar, aten.masked_fill.Tensor,
            aten.native_dropout_backward.default, aten.threshold_backward.default,
            aten.gelu_backward.default, aten.silu_backward.default, aten.sigmoid_backward.default,
            aten.tanh_backward.default, aten.lift_fresh_copy.default,
            torch.ops.prims.convert_element_type.default)(_broadcast)


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


def _reduced_dims(node):
    ndim = len(_shape(node.args[0]))
    dims = node.args[1] if len(node.args) > 1 else None
    if dims is None or dims == []:
        return list(range(ndim)), False
    dims = [dims] if isinstance(dims, int) else list(dims)
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    return [d % ndim for d in dims], keepdim


@layout_rule(aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default,
             aten.sum.default, aten.mean.default, aten.var_mean.correction, aten.var.correction,
             aten.prod.dim_int, aten.any.dim, aten.argmax.default, aten.logsumexp.default)
def _reduction(node, layouts, B):
    lay = layouts[node.args[0]]
    if node.target in (aten.sum.default, aten.mean.default):
        return MIXED
    dims, keepdim = _reduced_dims(node)
    if lay.dim in dims:
        return MIXED
    return Layout(lay.dim if keepdim else lay.dim - sum(1 for d in dims if d < lay.dim),
                  lay.outer, lay.inner)


@layout_rule(operator.getitem)
def _getitem(node, layouts, B):
    return layouts[node.args[0]]


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
    la, lb = layouts.get(a), layouts.get(b)
    if (la is not None and la.dim == 2) or (lb is not None and lb.dim == 1):
        return MIXED  # contracts the batch
    outs = set()
    if la is not None:
        outs.add(la)  # dim 0 or 1 of a stays dim 0 or 1 of the output
    if lb is not None:
        outs.add(Layout(lb.dim, lb.outer, lb.inner))  # dim 0 or 2 of b stays put
    return outs.pop() if len(outs) == 1 else None
