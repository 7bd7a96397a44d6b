"""Stage "report": what the pass did, for explain() and tests (passes/report.py)."""
from __future__ import annotations

import torch.fx as fx

from ..module_path import module_of
from ..protocol import ReportKey
from ..report import ParamRoute, RewriteReport, rule_counters
from ..rules.shared import strategy_of
from ..viewops import MOVES_VALUES
from .routing import op_name


def report(state) -> None:
    """The report; none for a graph with nothing clipped (an empty batch, no parameter reached)."""
    if not state.routes:
        return
    graph, params = state.graph, state.params
    rows = []
    for param, found in state.routes.items():
        module, ops_used = _module_and_ops(param)
        for r in found:
            rule_counters[r.rule] += 1
        rows.append(ParamRoute(
            name=params[param], module=module, ops=ops_used,
            rule="+".join(sorted({r.rule for r in found})),
            strategy=strategy_of(found),
            shapes=found[0].shapes, extra_flops=sum(r.extra_flops for r in found),
            extra_bytes=sum(r.extra_bytes for r in found), uses=len(found),
            declines=state.declines.get(param, [])))
    copy = fx.Graph()
    copy.output(copy.graph_copy(graph, {}))
    copy.output_node().meta["desc"] = graph.output_node().meta.get("desc")
    added = {n.name: dict(n.meta["fxclip"]) for n in graph.nodes if "fxclip" in n.meta}
    state.report = RewriteReport(
        params=rows, frozen=list(state.spec.frozen), batch_size=str(state.batch_size), graph=copy,
        added=added, unused=[params[p] for p in params if p not in state.routes],
        loss_checked=state.spec.checked_loss, key=ReportKey.of(state.spec), privacy_unit=_unit_text(state.spec))


def _unit_text(spec) -> str:
    if not spec.units:
        return ""
    return f"groups of rows by privacy_unit ids, unit_reduction={'mean' if spec.unit_mean else 'sum'}"


def _module_and_ops(param: fx.Node):
    """Where a parameter is used in the forward: module path and the aten ops it feeds."""
    ops_used, module = [], ""
    stack = list(param.users)
    while stack:
        user = stack.pop(0)
        if user.op != "call_function":
            continue
        if user.target in MOVES_VALUES:
            stack.extend(user.users)
            continue
        name = op_name(user)
        if name not in ops_used:
            ops_used.append(name)
        if not module and user.meta.get("nn_module_stack"):
            module = module_of(user)[0]
    return module, ops_used
