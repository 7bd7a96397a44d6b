"""Generic fallback: instantiate the per-sample gradient inside the graph.

The gradient is linear in the gradient arriving at the model output, and samples are
independent, so sample i's gradient is the same backward computation with that output
gradient masked to sample i. vmap over the B one-hot masks runs the backward slice that
feeds this contribution once per sample, batched: exact for any op, at B times its cost.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..builder import is_tensor_node, run_node
from ..module_path import module_of
from ..refusals import refusal
from ..viewops import VIEWS
from .base import InstantiatedRoute, replay
from .vmap_forms import SYMBOLIC_BATCH_FORMS, VMAP_FORMS

aten = torch.ops.aten


def _size_source(sym: fx.Node):
    """A tensor placeholder and dim whose size is the symbolic size placeholder `sym`."""
    expr = sym.meta["val"].node.expr
    for node in sym.graph.nodes:
        if node.op == "placeholder" and is_tensor_node(node):
            for d, size in enumerate(node.meta["val"].shape):
                if isinstance(size, torch.SymInt) and size.node.expr == expr:
                    return node, d
    raise NotImplementedError(f"no tensor carries the size {expr}")


def backward_slice(root: fx.Node, seeds: list, after_seeds: set) -> tuple[list, list]:
    """Nodes between the seeds and root, in graph order, and the tensors they read from outside.

    `after_seeds` holds every node computed from a seed (seeds excluded). A symbolic size input
    is read off a tensor input's shape, since a traced function can't take SymInts as inputs.
    """
    inside: set = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if node in inside or node in seeds:
            continue
        # symbolic sizes are recomputed inside: a traced fn can't take SymInts as inputs
        if node in after_seeds or not is_tensor_node(node):
            inside.add(node)
            stack.extend(node.all_input_nodes)
    order = [n for n in root.graph.nodes if n in inside]
    outside = []
    for node in order:
        reads = [_size_source(node)[0]] if node.op == "placeholder" else node.all_input_nodes
        for a in reads:
            if a not in inside and a not in seeds and a not in outside:
                outside.append(a)
    return order, outside


def _check_replayable(order) -> None:
    for node in order:
        if node.target == aten.as_strided_scatter.default and not _fresh(node.args[0]):
            path, cls = module_of(node)
            where = f" in module {path or '<root>'!r} ({cls})" if cls else ""
            raise refusal("strided-view-of-non-contiguous", where=where)


def _fresh(node) -> bool:
    v = node.meta.get("val")
    return isinstance(v, torch.Tensor) and v.is_contiguous() and v.storage_offset() == 0


class FallbackRoute(InstantiatedRoute):
    def per_sample(self, ctx):
        c = self.contribution
        seeds = list(ctx.output_grads)
        order, outside = backward_slice(c.root, seeds, ctx.after_output_grads)
        _check_replayable(order)
        n_seeds = len(seeds)

        def fn(*values):
            seed_vals, outside_vals = values[:n_seeds], values[n_seeds:]
            batch = seed_vals[0].shape[0]
            masks = torch.eye(batch, dtype=torch.bool, device=seed_vals[0].device)
            forms = VMAP_FORMS if isinstance(batch, int) else SYMBOLIC_BATCH_FORMS

            def one_sample(mask):
                env = dict(zip(outside, outside_vals))
                for s, v in zip(seeds, seed_vals):  # where, not *: another sample's NaN stays out
                    env[s] = torch.where(mask.reshape([batch] + [1] * (v.dim() - 1)), v, 0)
                for node in order:
                    if node.op == "placeholder":  # a symbolic size
                        source, dim = _size_source(node)
                        env[node] = env[source].shape[dim]
                    elif node.target in VIEWS:  # batched (vmapped) strides may not allow a view
                        env[node] = run_node(node, env, target=aten.reshape.default)
                    elif node.target in forms:
                        env[node] = run_node(node, env, target=forms[node.target])
                    else:
                        env[node] = run_node(node, env)
                return replay(c.path, c.root, env[c.root])

            return torch.vmap(one_sample)(masks)

        return ctx.builder.call(fn, *seeds, *outside)


def match(contribution, ctx):
    """Every contribution: the fallback never declines."""
    seeds = list(ctx.output_grads)
    order, _ = backward_slice(contribution.root, seeds, ctx.after_output_grads)
    work = sum(n.meta["val"].numel() for n in order if is_tensor_node(n))
    work = work if isinstance(work, int) else 0
    return FallbackRoute("fallback", "instantiate", contribution,
                         shapes={"B": str(ctx.batch_size), "param": str(ctx.param_shape)},
                         extra_flops=ctx.batch_hint * work,
                         extra_bytes=4 * ctx.batch_hint * (ctx.param_numel + work))
