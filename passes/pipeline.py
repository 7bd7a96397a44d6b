"""The joint-graph pass as a list of named stages over one PassState.

Runs on AOTAutograd's joint forward+backward graph before partitioning. For every trainable
parameter of the privatized model it replaces the gradient output `sum_i grad_i` with
`sum_i R_i grad_i`, R_i = min(1, C / (n_i + 1e-6)), n_i the norm of sample i's gradient over
all parameters. passes/README.md describes each stage and the invariants they keep.

FXCLIP_DUMP_STAGES=<dir> writes the graph after each stage to <dir>/<graph>-<k>-<stage>.txt.
"""
from __future__ import annotations

import itertools
import os
import pathlib
from dataclasses import dataclass, field

import torch.fx as fx

from .protocol import ClipSpec
from .report import RewriteReport
from .stages import checks, clipping, markers, reporting, reweighting, routing


@dataclass
class PassState:
    """What the stages read and write. Filled in order: markers, then layouts, routes, clip."""

    graph: fx.Graph
    privatized: bool = False  # the graph holds a privatized model's markers
    spec: ClipSpec | None = None
    params: dict = field(default_factory=dict)  # parameter placeholder -> its name
    batch_inputs: list = field(default_factory=list)  # the marked model inputs
    model_outputs: list = field(default_factory=list)  # the marked model outputs
    seeds: list = field(default_factory=list)  # the gradients arriving at the model outputs
    runtime: tuple = ()  # the device state, the thresholds, the loss scale, the unit ids or None (nodes)
    grad_slots: dict = field(default_factory=dict)  # parameter placeholder -> output position
    batch_size: object = None  # B: an int or a SymInt
    layouts: dict = field(default_factory=dict)  # node -> Layout of its batch
    builder: object = None  # GraphBuilder inserting before the output node
    ctx: object = None  # the rules' Context
    routes: dict = field(default_factory=dict)  # parameter placeholder -> its Routes
    declines: dict = field(default_factory=dict)  # parameter placeholder -> [(rule, reason)]
    norm_terms: dict = field(default_factory=dict)  # clipping group -> per-parameter squared norms
    clip_of: dict = field(default_factory=dict)  # clipping group -> its (B,) clip factors node
    unit_index: object = None  # privacy units: (B,) node, each row's unit as a row index
    specialized: bool = False  # a route fixed the symbolic batch size (warned once)
    report: RewriteReport | None = None

    @property
    def empty_batch(self) -> bool:
        return isinstance(self.batch_size, int) and self.batch_size == 0


STAGES = (
    ("read markers", markers.read_markers),  # the spec, the model's boundary; markers removed
    ("canonicalize", markers.canonicalize),  # rewrite ops into the forms the rules match
    ("check inputs and outputs", checks.check_inputs_and_outputs),  # batch in dim 0, loss shape
    ("batch layouts", checks.analyze_layouts),  # where each node holds the batch
    ("check mixing", checks.check_mixing),  # no op mixes samples; no batch-dependent state
    ("route", routing.route_parameters),  # each gradient term through the first matching rule
    ("norms", clipping.add_norms),  # per-sample squared norms, per clipping group
    ("clip", clipping.add_clip_factors),  # R = min(1, C / n) on the device, state recorded
    ("reweight", reweighting.reweight),  # each gradient output := sum_i R_i grad_i
    ("clean up", reweighting.clean_up),  # dead code, unused outputs
    ("check coverage", checks.check_coverage),  # no parameter gradient left unclipped
    ("report", reporting.report),  # what was done, for explain() and tests
)

_graphs = itertools.count()


def rewrite_joint_graph(graph: fx.Graph) -> RewriteReport | None:
    """Rewrite a joint graph holding a privatized model; returns None for any other graph (and
    for one with nothing to clip: an empty batch, no trainable parameter reached)."""
    state = PassState(graph)
    dump = os.environ.get("FXCLIP_DUMP_STAGES")
    number = next(_graphs)
    for k, (name, stage) in enumerate(STAGES):
        stage(state)
        if not state.privatized:
            return None
        if dump:
            _dump(pathlib.Path(dump), f"{number}-{k:02d}-{name.replace(' ', '-')}", graph)
    return state.report


def _dump(folder: pathlib.Path, name: str, graph: fx.Graph) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.txt").write_text(str(graph))
