"""Insert new computation into an fx graph by tracing a Python function on fake values.

make_fx on the fake values of existing nodes gives every new node a valid meta["val"]
(symbolic batch sizes included, as sym_size nodes), which the partitioner and Inductor need.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._torch import fake_mode_of, inductor_decompositions


class GraphBuilder:
    def __init__(self, graph: fx.Graph, before: fx.Node):
        self.graph = graph
        self.before = before  # new nodes go right before this node (the output node)
        self.fake_mode = fake_mode_of([n.meta["val"] for n in graph.nodes if "val" in n.meta])
        self.tag: dict | None = None  # meta["fxclip"] given to the nodes added next

    def call(self, fn, *inputs: fx.Node):
        """Trace fn(*values of inputs) into the graph; returns its output nodes (same pytree)."""
        values = [n.meta["val"] for n in inputs]
        with self.fake_mode:
            # the same decompositions as the rest of the graph, so Inductor can lower every node
            traced = make_fx(fn, tracing_mode="real", decomposition_table=_decompositions())(*values)
        _materialize_scatter_targets(traced.graph)
        env: dict[fx.Node, fx.Node] = {}
        placeholders = iter(inputs)
        result = None
        with self.graph.inserting_before(self.before):
            for node in traced.graph.nodes:
                if node.op == "placeholder":
                    env[node] = next(placeholders)
                elif node.op == "output":
                    result = node.args[0]
                else:
                    new = self.graph.node_copy(node, lambda a: env[a])
                    if self.tag is not None:
                        new.meta["fxclip"] = dict(self.tag)
                    env[node] = new
        flat, spec = tree_flatten(result)
        return tree_unflatten([env[n] if isinstance(n, fx.Node) else n for n in flat], spec)


_SCATTERS = {torch.ops.aten.index_put.default, torch.ops.aten._unsafe_index_put.default,
             torch.ops.aten.scatter_add.default, torch.ops.aten.scatter.src,
             torch.ops.aten.scatter_reduce.two}


def _materialize_scatter_targets(graph: fx.Graph) -> None:
    """Give scatters a real buffer to write into, never an expanded (aliased) view.

    vmap batches `index_put(zeros, ...)` as `index_put(zeros.expand(B, ...), ...)`; Inductor
    then accumulated every sample into the one shared buffer. A clone makes B buffers.
    """
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _SCATTERS:
            target = node.args[0]
            if isinstance(target, fx.Node) and target.target == torch.ops.aten.expand.default:
                with graph.inserting_before(node):
                    copy = graph.call_function(torch.ops.aten.clone.default, (target,),
                                               {"memory_format": torch.contiguous_format})
                copy.meta["val"] = target.meta["val"].clone(memory_format=torch.contiguous_format)
                node.replace_input_with(target, copy)


_decomps = None


def _decompositions():
    global _decomps
    if _decomps is None:
        _decomps = inductor_decompositions()
    return _decomps


def run_node(node: fx.Node, env: dict, default=None, target=None):
    """Execute one call_function node (or `target` in its place) on values looked up in env
    (used inside traced fns)."""

    def load(a):
        if isinstance(a, fx.Node):
            return env[a] if a in env else default(a)
        return a

    args = fx.node.map_aggregate(node.args, load)
    kwargs = fx.node.map_aggregate(node.kwargs, load)
    return (target or node.target)(*args, **kwargs)


def val(node: fx.Node):
    return node.meta.get("val")


def is_tensor_node(node) -> bool:
    return isinstance(node, fx.Node) and isinstance(val(node), torch.Tensor)
