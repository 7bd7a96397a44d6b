"""Stage "route": split each parameter's gradient into the terms of its top-level sum and send
each term through the first rule (passes/rules, in RULES order) that matches it. Rules that
decline say why; the reasons reach the report and explain()."""
from __future__ import annotations

import torch
import torch.fx as fx

from ..builder import GraphBuilder
from ..context import Context
from ..layout import same_shape
from ..rules import RULES, Contribution, Route, cat_slot, slice_bounds, zero_padding_of
from ..viewops import MOVES_VALUES

aten = torch.ops.aten



def route_parameters(state) -> None:
    graph = state.graph
    output = graph.output_node()
    state.builder = GraphBuilder(graph, output)
    state.ctx = ctx = Context(graph, state.builder, state.layouts, state.batch_inputs[0], state.seeds)
    if state.empty_batch:
        return
    for param in state.params:
        if param not in state.grad_slots:
            continue  # unused in this forward: it gets no gradient at all
        grad = output.args[0][state.grad_slots[param]]
        ctx.for_param(param)
        declines: list = []
        terms = contributions(grad, ctx.after_output_grads)
        state.routes[param] = [route_contribution(c, ctx, declines) for c in terms]
        state.declines[param] = list(dict.fromkeys(declines))


def route_contribution(contribution: Contribution, ctx: Context, declines: list) -> Route:
    """The first rule's route; each rule tried before it that applies to the contribution's op
    adds (rule, reason) to `declines`; a term no rule applies to says which op computes it."""
    applicable = False
    for name, match in RULES:
        found = match(contribution, ctx)
        if isinstance(found, Route):
            if found.rule == "fallback" and not applicable:
                declines.append(("no rule", f"none covers a gradient computed by {op_name(contribution.root)}"))
            return found
        if found.applies:
            applicable = True
            declines.append((name, found.reason))
    raise AssertionError("the fallback rule matches every contribution")


def op_name(node: fx.Node) -> str:
    """An op as explain names it: `addmm.default`; a non-call node by its name."""
    return str(node.target).replace("aten.", "") if node.op == "call_function" else node.name


def contributions(grad: fx.Node, backward: set) -> list[Contribution]:
    """Split a parameter's gradient into the terms of its top-level sum (tied / reused params)."""
    found = []

    def walk(node, path):
        # a parameter gradient is a sum over the batch followed by ops that only move its
        # values around, which rules replay per sample
        if node.op == "call_function" and node.target in MOVES_VALUES:
            walk(node.args[0], [node] + path)
        elif zero_padding_of(node) is not None:  # a sliced parameter: pos[:T]
            walk(node.args[1], [node] + path)
        elif (piece := _cat_piece(node, backward)) is not None:  # packed with others: cat((bq, bk, bv))
            walk(piece, path)
        elif _split_gradient(node, backward):  # a parameter used in pieces (packed q/k/v)
            for part in node.args[0]:
                walk(part, [node] + path)
        elif (node.op == "call_function" and node.target == aten.add.Tensor and not node.kwargs
              and all(isinstance(a, fx.Node) and a in backward
                      and same_shape(a.meta["val"].shape, node.meta["val"].shape) for a in node.args)):
            for a in node.args:
                walk(a, [node] + path)
        else:
            found.append(Contribution(node, path))

    walk(grad, [])
    return found


def _cat_piece(node: fx.Node, backward: set):
    """For slice(cat(pieces), dim, start, end) taking back exactly one gradient piece (a
    parameter packed with others, as in cat((q.bias, k.bias, v.bias))): that piece; else None."""
    if node.op != "call_function" or node.target != aten.slice.Tensor or node.kwargs:
        return None
    src = node.args[0]
    if not (isinstance(src, fx.Node) and src.op == "call_function" and src.target == aten.cat.default
            and src in backward):
        return None
    ndim = src.meta["val"].dim()
    defaults = (0, None, None, 1)  # dim, start, end, step
    dim, start, end, step = (*node.args[1:], *defaults[len(node.args) - 1:])
    cat_dim = src.args[1] if len(src.args) > 1 else 0
    if step != 1 or not isinstance(dim, int) or dim % ndim != cat_dim % ndim:
        return None
    bounds = slice_bounds(src.meta["val"].shape[dim % ndim], start, end)
    if bounds is None:
        return None
    start, end = bounds
    for piece in src.args[0]:
        pad = cat_slot(src, piece) if isinstance(piece, fx.Node) else None
        if pad is None:
            continue
        before, size = pad[-2], piece.meta["val"].shape[dim % ndim]
        if start == before and end == before + size and piece in backward:
            return piece
    return None


def _split_gradient(node: fx.Node, backward: set) -> bool:
    """cat of gradient pieces, each computed from the output gradient, with static sizes."""
    if node.op != "call_function" or node.target != aten.cat.default:
        return False
    parts = node.args[0]
    return len(set(parts)) == len(parts) and all(  # each piece once: its slot is unambiguous
        isinstance(p, fx.Node) and p in backward and cat_slot(node, p) is not None for p in parts)
