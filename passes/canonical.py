"""Rewrite equivalent op forms into the ones the rules know, before the analysis.

torch.einsum (and matmul on some shapes) contract through `bmm` with a batch of ONE:
bmm((1, n, k), (1, k, m)). That is an mm; written as one, a parameter's gradient through it
is an mm the linear rule recognizes instead of a contraction only the fallback handles.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .builder import GraphBuilder
from .layout import known_equal

aten = torch.ops.aten


def _unit_bmm(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target != aten.bmm.default:
        return False
    return all(isinstance(a, fx.Node) and known_equal(a.meta["val"].shape[0], 1) for a in node.args[:2])


def bmm_of_one_as_mm(graph: fx.Graph) -> int:
    """Replace every bmm over a batch of one by unsqueeze(mm(squeeze(a), squeeze(b))); returns
    how many were replaced."""
    found = [n for n in graph.nodes if _unit_bmm(n)]
    for node in found:
        builder = GraphBuilder(graph, node)
        new = builder.call(lambda a, b: torch.mm(a.squeeze(0), b.squeeze(0)).unsqueeze(0), *node.args[:2])
        mm = new.args[0]
        for added in (new, mm, *mm.args):  # error messages and reports name the module
            for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
                if key in node.meta:
                    added.meta[key] = node.meta[key]
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    return len(found)
