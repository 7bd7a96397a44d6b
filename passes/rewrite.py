"""The joint-graph pass: per-sample norms, clip factors and reweighted gradients in one backward.

Runs on AOTAutograd's joint forward+backward graph before partitioning. For every trainable
parameter of the privatized model it replaces the gradient output `sum_i grad_i` with
`sum_i R_i grad_i`, R_i = min(1, C / (n_i + 1e-6)), n_i the norm of sample i's gradient over
all parameters, each parameter routed through the first rule that matches (passes/rules).
"""
from __future__ import annotations

import warnings

import torch
import torch.fx as fx

from . import ops
from ._torch import input_index, output_descriptors
from .builder import GraphBuilder
from .canonical import bmm_of_one_as_mm
from .errors import PrivacyError
from .layout import Layout, analyze, as_int, known_equal, same_shape, size_hint
from .mixing import check_batch_independence, check_no_batch_state, model_region
from .prune import prune_unused_outputs
from .report import ParamRoute, RewriteReport, rule_counters
from .rules import RULES, Contribution, cat_slot, norm_sq_of, slice_bounds, weighted_sum, zero_padding_of
from .rules.shared import shared_norm_sq, shared_reweighted, strategy_of

aten = torch.ops.aten

# Ops that only move a gradient's values around: a parameter gradient is a sum over the batch
# followed by these, which rules replay per sample.
LAYOUT_OPS = {
    aten.permute.default, aten.t.default, aten.transpose.int, aten.view.default,
    aten._unsafe_view.default, aten.reshape.default, aten.clone.default, aten.alias.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default, aten._to_copy.default,
    torch.ops.prims.convert_element_type.default,
}

GRAPH_BREAK = (
    "the privatized model was split into several compiled graphs (a graph break), so no single "
    "graph sees every parameter's per-sample gradient and the clipping would be wrong. Remove the "
    "graph break (run torch._dynamo.explain(model)(x) to find it), or compile with fullgraph=True "
    "to see where it happens."
)


class Context:
    """What rules read: the graph, batch layouts, the batch size and the per-sample cache."""

    def __init__(self, graph, builder, layouts, bref, output_grads):
        self.graph, self.builder, self.layouts = graph, builder, layouts
        self.bref = bref  # a (B, ...) tensor node: inside traced fns, B = bref.shape[0]
        self.batch_size = bref.meta["val"].shape[0]
        self.batch_hint = size_hint(self.batch_size)
        self.output_grads = output_grads
        self.after_output_grads = _descendants(output_grads)
        self.param_shape: tuple = ()
        self.param_numel = 0
        self._memo: dict = {}

    def per_sample(self, route):
        return self.once(("per-sample", id(route)), lambda: route.per_sample(self))

    def once(self, key, make):
        """make() the first time `key` is asked for, the same node after: shared work."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]


def _descendants(seeds) -> set:
    found = set()
    stack = list(seeds)
    while stack:
        for user in stack.pop().users:
            if user not in found:
                found.add(user)
                stack.append(user)
    return found


def _markers(graph, target):
    return [n for n in graph.nodes if n.op == "call_function" and n.target == target]


def _read_spec(outputs) -> dict:
    specs = {tuple(n.args[2:]) for n in outputs}  # see ops.batch_output
    if len(specs) != 1:
        raise PrivacyError(
            "one compiled graph holds several privatized models; compile each privatized model "
            "on its own (torch.compile(pm)) and call them separately."
        )
    state, thresholds, scale, names, frozen, groups, mean, checked_loss = specs.pop()
    return {"names": names.split("\n") if names else [], "frozen": frozen.split("\n") if frozen else [],
            "groups": [int(g) for g in groups.split(",")] if groups else [],
            "state": state, "thresholds": thresholds, "scale": scale, "mean": mean,
            "checked_loss": checked_loss}


def _empty_batch_of(inputs) -> bool:
    return known_equal(inputs[0].args[0].meta["val"].shape[0], 0)


def _remove(marker):
    """Replace a marker by its input. A marker's value is `empty_like(x)` (see ops): for an
    input whose memory is not dense (x[::2], an expanded batch) that is a contiguous copy, and
    the graph was traced on it (views that need contiguity), so a copy takes the marker's place."""
    source, val = marker.args[0], marker.meta.get("val")
    if isinstance(val, torch.Tensor) and val.stride() != source.meta["val"].stride():
        with marker.graph.inserting_before(marker):
            copy = marker.graph.call_function(aten.clone.default, (source,),
                                              {"memory_format": torch.contiguous_format})
        copy.meta.update(marker.meta)
        source = copy
    marker.replace_all_uses_with(source)
    marker.graph.erase_node(marker)


def _contributions(grad: fx.Node, backward: set) -> list[Contribution]:
    """Split a parameter's gradient into the terms of its top-level sum (tied / reused params)."""
    found = []

    def walk(node, path):
        if node.op == "call_function" and node.target in LAYOUT_OPS:
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


def _route(contribution, ctx):
    for name, match in RULES:
        route = match(contribution, ctx)
        if route is not None:
            return route
    raise AssertionError("the fallback rule matches every contribution")


def _module_and_ops(param: fx.Node):
    """Where a parameter is used in the forward: module path and the aten ops it feeds."""
    ops_used, module = [], ""
    stack = list(param.users)
    while stack:
        user = stack.pop(0)
        if user.op != "call_function":
            continue
        if user.target in LAYOUT_OPS:
            stack.extend(user.users)
            continue
        name = str(user.target).replace("aten.", "")
        if name not in ops_used:
            ops_used.append(name)
        stack_meta = user.meta.get("nn_module_stack")
        if stack_meta and not module:
            module = _clean_module_path(list(stack_meta.values())[-1][0])
    return module, ops_used


def _clean_module_path(path: str) -> str:
    # Dynamo writes e.g. "L['self'].module.layers[0].fc" or "L['self']._modules['module']..."
    for prefix in ("L['self'].module.", "L['self'].module", "L['self'].", "L['self']"):
        if path.startswith(prefix):
            return path[len(prefix):]
    return path


def _clip_fn(groups: list, mean: bool, checked_loss: bool):
    """(state, thresholds, scale, loss seed, per-group squared norms) -> (G, B) clip factors
    R_g = min(1, C_g / (n_g + 1e-6)), recording norms, counts and flags in the device state.

    All of it runs on the device: thresholds and the loss scale are runtime tensors (no
    recompile when they change) and problems become flags, never a host sync. A sample that is
    padding, or whose norm is inf/NaN, gets R = 0 (the optimizer step refuses the latter).
    """
    field = ops.STATE

    def clip(bref, state, thresholds, scale, seed, *group_sq):
        batch = bref.shape[0]
        norms = torch.stack(group_sq).sqrt()  # norms of the gradient as it arrived
        if mean:  # the output gradient carried 1/B: undo it to clip grad L_i itself
            norms = norms * batch
        norms = norms / scale.to(norms.dtype).reshape(())  # a connected GradScaler's S
        limit = torch.stack([thresholds[g] for g in groups]).to(norms.dtype)
        total = norms.square().sum(0).sqrt()
        real = torch.arange(batch, device=norms.device) < state[field["valid_rows"]]
        finite = torch.isfinite(total)
        factor = (limit[:, None] / (norms + 1e-6)).clamp(max=1.0)
        factor = torch.where(real & finite, factor, torch.zeros_like(factor))
        if mean:  # a DPOptimizer wants the sum: scale R by this backward's B, not the gradient
            factor = factor * (1 + (batch - 1) * (state[field["owners"]] > 0).to(factor.dtype))
        counts = {
            "nonfinite": (real & ~finite).sum(),
            "bad_seed": _bad_seed(seed, batch, mean, scale) if checked_loss else real.new_zeros(()),
            "samples": real.sum(),
            "backwards": real.new_ones(()),
            "unclipped": (real & (total <= limit.square().sum().sqrt())).sum(),
        }
        updated = _updated_state(state, counts, torch.ones_like(total).sum())
        return ops.record_step(total.where(real, torch.zeros_like(total)), updated, state, factor)

    return clip


def _updated_state(state, counts: dict, rows):
    """The state after a backward: counts added, `rows` the batch size (inside traced fns)."""
    return torch.stack([
        state[i] + counts[name].to(state.dtype) if name in counts
        else rows.to(state.dtype) if name == "batch_size"
        else state[i]
        for name, i in ops.STATE.items()])


def _bad_seed(seed, batch, mean, scale):
    """1 if the gradient arriving at the per-sample losses is not the same for every sample and
    equal to what a plain sum (1) or mean (1/B) gives, times the loss scale; else 0."""
    expected = scale.to(seed.dtype).reshape(()) / (batch if mean else 1)
    tolerance = 4 * torch.finfo(seed.dtype).eps * expected.abs()
    return ((seed - expected).abs() > tolerance).any().to(torch.int64)


def _row(i: int):
    return lambda t: t[i]


def rewrite_joint_graph(graph: fx.Graph) -> RewriteReport | None:
    """Rewrite a joint graph holding a privatized model; returns None for any other graph."""
    inputs = _markers(graph, ops.BATCH_INPUT)
    outputs = _markers(graph, ops.BATCH_OUTPUT)
    if not inputs and not outputs:
        return None
    grads_in = _markers(graph, ops.OUTPUT_GRAD)
    # with B = 0 an output gradient that no gradient reads (a last LayerNorm's gradient is a
    # constant zero) is traced away with its marker: no graph break, just nothing to clip
    if not inputs or not outputs or not (grads_in or _empty_batch_of(inputs)):
        raise PrivacyError(GRAPH_BREAK)
    spec = _read_spec(outputs)
    outputs_params = outputs[0].args[1]
    params = dict(zip(outputs_params, spec["names"]))
    batch_nodes = [m.args[0] for m in inputs]
    model_outputs = [m.args[0] for m in outputs]
    seeds = [m.args[0] for m in grads_in]
    for marker in inputs + outputs + grads_in:
        _remove(marker)

    output = graph.output_node()
    placeholders = {input_index(n): n for n in graph.nodes if n.op == "placeholder"}
    grad_slots = {}  # param placeholder -> position in the output tuple
    for pos, (kind, idx) in enumerate(output_descriptors(output)):
        if kind == "grad" and output.args[0][pos] is not None:
            grad_slots[placeholders[idx]] = pos

    bmm_of_one_as_mm(graph)
    bref = batch_nodes[0]
    B = bref.meta["val"].shape[0]
    if spec["checked_loss"]:
        _check_loss_shape(model_outputs)
    _check_batch_sizes(batch_nodes, model_outputs, B)
    seeds_layout = {n: Layout(0) for n in batch_nodes + seeds}
    layouts = analyze(graph, seeds_layout, B)
    # a graph specialized to B <= 1 (sizes 0 and 1 are always specialized) has no two samples to
    # mix: with B = 0 every gradient is zero, with B = 1 "x.mean(0)" is the sample itself
    if not (isinstance(B, int) and B <= 1):
        check_batch_independence(graph, layouts, model_region(batch_nodes, model_outputs))
    check_no_batch_state(graph, layouts, list(outputs_params), spec["names"])
    builder = GraphBuilder(graph, output)
    ctx = Context(graph, builder, layouts, bref, seeds)
    for s in seeds:
        if not known_equal(s.meta["val"].shape[0], B):
            raise PrivacyError(
                f"the model output has batch size {s.meta['val'].shape[0]} but the input has {B}: "
                "every output of a privatized model must have the batch in dim 0."
            )

    if isinstance(B, int) and B == 0:
        _empty_batch(graph, builder, params, grad_slots, bref, spec["state"])
        check_coverage(graph, params, set(batch_nodes))
        return None

    group_of = dict(zip(params, spec["groups"]))
    routes: dict[fx.Node, list] = {}
    norm_terms: dict[int, list] = {}  # clipping group -> per-parameter squared norms
    specialized = False  # a route made the symbolic batch size a number (warned once)
    for param, name in params.items():
        if param not in grad_slots:
            continue  # unused in this forward: it gets no gradient at all
        grad = output.args[0][grad_slots[param]]
        ctx.param_shape = tuple(param.meta["val"].shape)
        ctx.param_numel = size_hint(param.meta["val"].numel())
        found = [_route(c, ctx) for c in _contributions(grad, ctx.after_output_grads)]
        routes[param] = found
        builder.tag = {"param": name, "role": "norm"}
        if len(found) == 1:
            term = found[0].norm_sq(ctx)
        else:  # a shared parameter: the norm of its TOTAL per-sample gradient, cross terms included
            term = shared_norm_sq(found, ctx)
        norm_terms.setdefault(group_of[param], []).append(term)
        specialized = specialized or _warn_if_specialized(B, name, found)

    if not routes:  # no trainable parameter reached the output
        check_coverage(graph, params, set(batch_nodes))
        return None
    builder.tag = {"param": None, "role": "clip"}
    groups = sorted(norm_terms)
    group_sq = [builder.call(lambda *ts: sum(ts), *norm_terms[g]) for g in groups]
    seed = seeds[0] if spec["checked_loss"] else bref
    factors = builder.call(_clip_fn(groups, spec["mean"], spec["checked_loss"]), bref, spec["state"],
                           spec["thresholds"], spec["scale"], seed, *group_sq)
    clip_of = {g: builder.call(_row(i), factors) for i, g in enumerate(groups)}

    new_outputs = list(output.args[0])
    for param, found in routes.items():
        name = params[param]
        clip = clip_of[group_of[param]]
        builder.tag = {"param": name, "role": "reweight"}
        if len(found) == 1:
            new = found[0].reweighted(ctx, clip)
        else:
            new = shared_reweighted(found, ctx, clip)
        old = new_outputs[grad_slots[param]]
        want = old.meta["val"]
        if new.meta["val"].dtype != want.dtype or not same_shape(new.meta["val"].shape, want.shape):
            new = builder.call(lambda t: t.to(want.dtype).reshape(want.shape), new)
        new.meta["fxclip"] = {"param": name, "role": "reweight"}
        new_outputs[grad_slots[param]] = new
        specialized = specialized or _warn_if_specialized(B, name, found)
    output.args = (tuple(new_outputs),) + tuple(output.args[1:])
    graph.eliminate_dead_code()
    prune_unused_outputs(graph)
    check_coverage(graph, params, set(batch_nodes))
    graph.lint()
    return _report(graph, spec, params, routes, B)


SPECIALIZED = (
    "fxclip: computing the per-sample gradients of parameter {name!r} ({rule}) fixed the batch size "
    "of this graph to {size}: every new batch size compiles again, and Dynamo refuses the model "
    "after its recompile limit (8 sizes by default). Give the batches fixed shapes "
    "(make_private(..., pad_to_multiple=k)), and please report the model."
)


def _warn_if_specialized(B, name, routes) -> bool:
    """Warn when building a parameter's routes turned a symbolic batch size into a number (an
    op whose per-sample form needs the size as a number): correct, but a recompile per size."""
    if not (isinstance(B, torch.SymInt) and isinstance(size := as_int(B), int)):
        return False
    warnings.warn(SPECIALIZED.format(name=name, rule="+".join(sorted({r.rule for r in routes})), size=size),
                  stacklevel=2)
    return True


LOSS_SHAPE = (
    "loss_fn(output, target) returned a tensor of shape {shape}; it must return the per-sample "
    "losses, one number per sample: shape (B,) (e.g. F.cross_entropy(out, y, reduction=\"none\"); "
    "for token losses, reduce each sample's tokens inside loss_fn)."
)


def _check_loss_shape(model_outputs) -> None:
    for node in model_outputs:
        shape = tuple(node.meta["val"].shape)
        if len(shape) != 1:
            raise PrivacyError(LOSS_SHAPE.format(shape=tuple(size_hint(s) for s in shape)))


def _check_batch_sizes(batch_nodes, model_outputs, B) -> None:
    """Every marked input and output has the batch size of the first input in dim 0."""
    for kind, nodes in (("input", batch_nodes), ("output", model_outputs)):
        for node in nodes:
            shape = node.meta["val"].shape
            if len(shape) == 0 or not known_equal(shape[0], B):
                size = ("no batch dimension (a 0-d tensor, e.g. a mean loss computed inside the "
                        "model)") if len(shape) == 0 else f"batch size {size_hint(shape[0])}"
                raise PrivacyError(
                    f"a model {kind} has {size} but the first input has batch size {size_hint(B)}: every "
                    "tensor input and output of a privatized model must hold one row per sample "
                    "in dim 0. Pass per-sample tensors (shared constants belong in the module as "
                    "buffers), and return per-sample outputs (logits, or unreduced losses of shape "
                    "(B,)), reducing them outside the model as loss_reduction says."
                )


def _empty_batch(graph, builder, params, grad_slots, bref, state) -> None:
    """No samples: every gradient is exactly zero, and there are no norms to record."""
    output = graph.output_node()
    new_outputs = list(output.args[0])

    def zero_norms(b, state):
        empty = b.new_zeros((0,), dtype=torch.float32)
        updated = _updated_state(state, {"backwards": state.new_ones(())}, empty.sum())
        return ops.record_step(empty, updated, state, empty)

    builder.tag = {"param": None, "role": "clip"}
    recorded = builder.call(zero_norms, bref, state)
    for param, pos in grad_slots.items():
        if param in params:
            builder.tag = {"param": params[param], "role": "reweight"}
            new = builder.call(lambda g, r: torch.zeros_like(g) + r.sum().to(g.dtype), new_outputs[pos], recorded)
            new.meta["fxclip"] = dict(builder.tag)
            new_outputs[pos] = new
    output.args = (tuple(new_outputs),) + tuple(output.args[1:])
    graph.eliminate_dead_code()


def check_coverage(graph: fx.Graph, params: dict, batch_inputs: set) -> None:
    """Every gradient the graph returns is either a reweighted parameter gradient or a gradient
    of a model input; anything else would leave the graph unclipped."""
    output = graph.output_node()
    placeholders = {input_index(n): n for n in graph.nodes if n.op == "placeholder"}
    # a clipped gradient is computed from the clip factors R (the recorded-norms op's output)
    clipped = _descendants(_markers(graph, ops.RECORD_STEP))
    for pos, (kind, idx) in enumerate(output_descriptors(output)):
        node = output.args[0][pos]
        if kind != "grad" or node is None:
            continue
        source = placeholders[idx]
        if source in batch_inputs:
            continue
        tag = node.meta.get("fxclip", {})
        name = params.get(source)
        if name is not None and tag.get("role") == "reweight" and node not in clipped:
            raise PrivacyError(
                f"internal error, refused: the gradient of parameter {name!r} does not depend on "
                "the clip factors, so it would reach .grad unclipped. Please report this model."
            )
        if tag.get("role") != "reweight" or tag.get("param") != name:
            what = f"parameter {name!r}" if name else f"graph input {source.name}"
            raise PrivacyError(
                f"{what} would receive an unclipped gradient: it is trained inside the compiled "
                "region but is not a trainable parameter of the privatized model. Move it into the "
                "model passed to fxclip.privatize, or freeze it (requires_grad_(False))."
            )


def _report(graph, spec, params, routes, B) -> RewriteReport:
    rows = []
    for param, found in routes.items():
        module, ops_used = _module_and_ops(param)
        first = found[0]
        for r in found:
            rule_counters[r.rule] += 1
        rows.append(ParamRoute(
            name=params[param], module=module, ops=ops_used,
            rule="+".join(sorted({r.rule for r in found})),
            strategy=strategy_of(found),
            shapes=first.shapes, extra_flops=sum(r.extra_flops for r in found),
            extra_bytes=sum(r.extra_bytes for r in found), uses=len(found)))
    unused = [params[p] for p in params if p not in routes]
    copy = fx.Graph()
    copy.output(copy.graph_copy(graph, {}))
    copy.output_node().meta["desc"] = graph.output_node().meta.get("desc")
    added = {n.name: dict(n.meta["fxclip"]) for n in graph.nodes if "fxclip" in n.meta}
    return RewriteReport(params=rows, frozen=list(spec.get("frozen", [])), batch_size=str(B),
                         graph=copy, added=added, unused=unused, loss_checked=spec["checked_loss"])
