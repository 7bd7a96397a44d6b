"""Stages 1-2: read the privatized model's boundary from its markers, then canonicalize."""
from __future__ import annotations

import torch
import torch.fx as fx

from .. import ops
from .._torch import input_index, output_descriptors
from ..canonical import bmm_of_one_as_mm
from ..layout import known_equal
from ..protocol import ClipSpec
from ..refusals import refusal

aten = torch.ops.aten

def read_markers(state) -> None:
    """The spec, the model's inputs, outputs and output gradients, and where each parameter's
    gradient leaves the graph; the markers are removed. A graph without markers is not ours."""
    graph = state.graph
    inputs = _markers(graph, ops.BATCH_INPUT)
    outputs = _markers(graph, ops.BATCH_OUTPUT)
    if not inputs and not outputs:
        return
    state.privatized = True
    grads_in = _markers(graph, ops.OUTPUT_GRAD)
    # with B = 0 an output gradient that no gradient reads (a last LayerNorm's gradient is a
    # constant zero) is traced away with its marker: no graph break, just nothing to clip
    if not inputs or not outputs or not (grads_in or _empty_batch_of(inputs)):
        raise refusal("graph-break")
    state.spec, state.runtime = _read_spec(outputs)
    state.params = dict(zip(outputs[0].args[1], state.spec.names))
    state.batch_inputs = [m.args[0] for m in inputs]
    state.model_outputs = [m.args[0] for m in outputs]
    state.seeds = [m.args[0] for m in grads_in]
    state.batch_size = state.batch_inputs[0].meta["val"].shape[0]
    for marker in inputs + outputs + grads_in:
        _remove(marker)
    state.grad_slots = _grad_slots(graph)


def canonicalize(state) -> None:
    bmm_of_one_as_mm(state.graph)


def _markers(graph, target):
    return [n for n in graph.nodes if n.op == "call_function" and n.target == target]


def _read_spec(outputs) -> tuple[ClipSpec, tuple]:
    """(the spec, the runtime tensors' nodes: state, thresholds, scale, unit ids or None); see
    ops.batch_output."""
    specs = {tuple(n.args[6:]) for n in outputs}
    runtimes = {tuple(n.args[2:6]) for n in outputs}
    if len(specs) != 1 or len(runtimes) != 1:
        raise refusal("several-models")
    return ClipSpec.from_args(specs.pop()), runtimes.pop()


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


def _grad_slots(graph: fx.Graph) -> dict:
    """{parameter placeholder: position of its gradient in the output tuple}."""
    output = graph.output_node()
    placeholders = {input_index(n): n for n in graph.nodes if n.op == "placeholder"}
    slots = {}
    for pos, (kind, idx) in enumerate(output_descriptors(output)):
        if kind == "grad" and output.args[0][pos] is not None:
            slots[placeholders[idx]] = pos
    return slots
