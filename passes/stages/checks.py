"""The stages that refuse: the model's boundary, mixing of samples, and coverage (no parameter
gradient leaves the graph unclipped). Each raises PrivacyError with what to change."""
from __future__ import annotations

import torch.fx as fx

from .. import ops
from .._torch import input_index, output_descriptors
from ..context import descendants
from ..layout import Layout, analyze, known_equal, size_hint
from ..mixing import check_batch_independence, check_no_batch_state, model_region
from ..refusals import refusal


def check_inputs_and_outputs(state) -> None:
    """Every marked input and output, and every output gradient, holds the batch in dim 0; with
    loss_fn the outputs are per-sample losses (B,)."""
    if state.spec.checked_loss:
        _check_loss_shape(state.model_outputs)
    _check_batch_sizes(state.batch_inputs, state.model_outputs, state.batch_size)
    for s in state.seeds:
        if not known_equal(s.meta["val"].shape[0], state.batch_size):
            raise refusal("output-gradient-batch-size", size=s.meta["val"].shape[0], batch=state.batch_size)


def analyze_layouts(state) -> None:
    seeds = {n: Layout(0) for n in state.batch_inputs + state.seeds}
    state.layouts = analyze(state.graph, seeds, state.batch_size)


def check_mixing(state) -> None:
    """No op of the model mixes samples; no batch-dependent state (BatchNorm's running stats)."""
    B = state.batch_size
    # a graph specialized to B <= 1 (sizes 0 and 1 are always specialized) has no two samples to
    # mix: with B = 0 every gradient is zero, with B = 1 "x.mean(0)" is the sample itself
    if not (isinstance(B, int) and B <= 1):
        region = model_region(state.batch_inputs, state.model_outputs)
        check_batch_independence(state.graph, state.layouts, region)
    check_no_batch_state(state.graph, state.layouts, list(state.params), list(state.spec.names))


def check_coverage(state) -> None:
    """Every gradient the graph returns is either a reweighted parameter gradient or a gradient
    of a model input; anything else would leave the graph unclipped."""
    graph, params, batch_inputs = state.graph, state.params, set(state.batch_inputs)
    output = graph.output_node()
    placeholders = {input_index(n): n for n in graph.nodes if n.op == "placeholder"}
    # a clipped gradient is computed from the clip factors R (the recorded-norms op's output)
    clipped = descendants(n for n in graph.nodes if n.op == "call_function" and n.target == ops.RECORD_STEP)
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
            raise refusal("gradient-without-clip", name=name)
        if tag.get("role") != "reweight" or tag.get("param") != name:
            what = f"parameter {name!r}" if name else f"graph input {source.name}"
            raise refusal("trained-outside-model", what=what)


def _check_loss_shape(model_outputs) -> None:
    for node in model_outputs:
        shape = tuple(node.meta["val"].shape)
        if len(shape) != 1:
            raise refusal("loss-shape", shape=tuple(size_hint(s) for s in shape))


def _check_batch_sizes(batch_inputs: list[fx.Node], model_outputs: list[fx.Node], B) -> None:
    """Every marked input and output has the batch size of the first input in dim 0."""
    for kind, nodes in (("input", batch_inputs), ("output", model_outputs)):
        for node in nodes:
            shape = node.meta["val"].shape
            if len(shape) == 0 or not known_equal(shape[0], B):
                size = ("no batch dimension (a 0-d tensor, e.g. a mean loss computed inside the "
                        "model)") if len(shape) == 0 else f"batch size {size_hint(shape[0])}"
                raise refusal("boundary-batch-size", kind=kind, size=size, batch=size_hint(B))
