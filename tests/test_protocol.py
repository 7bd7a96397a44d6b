"""The protocol between a privatized module, its graph and the optimizer (passes/protocol.py),
and the pipeline of named stages (passes/pipeline.py)."""
import torch
from torch import nn

import fxclip
from fxclip.passes import ops
from fxclip.passes.protocol import ClipSpec, DeviceState


def test_the_marker_schema_is_derived_from_the_spec_fields():
    schema = str(ops.BATCH_OUTPUT._schema)
    for field in ("str names", "str frozen", "int[] groups", "bool mean", "bool checked_loss", "str owner"):
        assert field in schema, schema
    spec = ClipSpec(names=("a.weight", "b.bias"), frozen=(), groups=(0, 1), mean=True, checked_loss=False,
                    owner="7")
    assert ClipSpec.from_args(spec.to_args()) == spec
    assert ClipSpec.from_args(ClipSpec((), ("x",), (), False, True, "1").to_args()).names == ()


def test_device_state_reads_resets_and_reads_several_in_one_sync():
    state = DeviceState(DeviceState.new_tensor())
    assert state.read()["valid_rows"] == float("inf") and state.read()["samples"] == 0
    state.add("samples", 5)
    state.add("owners", 1)
    state.set("valid_rows", 3)
    other = DeviceState(DeviceState.new_tensor())
    other.add("samples", 2)
    (first, second), extra = DeviceState.read_all([state, other], [torch.tensor(1.0)])
    assert (first["samples"], second["samples"], extra) == (5, 2, [1.0])
    state.reset()  # the cumulative counts only
    assert state.read()["samples"] == 0 and state.read()["owners"] == 1 and state.read()["valid_rows"] == 3


def _step(pm, batch):
    pm(torch.randn(batch, 3)).sum().backward()


def test_the_backward_writes_the_state_the_module_reads():
    pm = fxclip.privatize(nn.Linear(3, 2), max_grad_norm=1.0, loss_reduction="sum")
    _step(pm, 4)
    _step(pm, 6)
    state = pm.read_state()
    assert (state["backwards"], state["samples"], state["batch_size"]) == (2, 10, 6)
    assert pm.per_sample_norms.shape == (6,)


def test_reports_are_kept_per_module_not_per_parameter_names():
    """Two models with the same parameter names, compiled in one process: each module's report
    is its own (keyed by the module, passes.protocol.ReportKey)."""
    wide, narrow = nn.Sequential(nn.Linear(3, 8)), nn.Sequential(nn.Linear(3, 2))
    pms = [torch.compile(fxclip.privatize(m, max_grad_norm=1.0, loss_reduction="sum")) for m in (wide, narrow)]
    for pm in pms:
        _step(pm, 4)
    reports = [pm._orig_mod.last_report for pm in pms]
    assert reports[0].key != reports[1].key
    outputs = [[n.meta["val"].shape for n in r.graph.output_node().args[0] if n is not None] for r in reports]
    assert torch.Size([8, 3]) in outputs[0] and torch.Size([2, 3]) in outputs[1]


def test_the_stages_run_in_order_and_dump_the_graph_after_each(tmp_path, monkeypatch):
    from fxclip.passes import pipeline

    monkeypatch.setenv("FXCLIP_DUMP_STAGES", str(tmp_path))
    pm = fxclip.privatize(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), max_grad_norm=1.0)
    _step(pm, 5)
    names = [name for name, _ in pipeline.STAGES]
    dumped = sorted(p.name for p in tmp_path.iterdir())
    assert [d.split("-", 2)[2][:-4] for d in dumped] == [n.replace(" ", "-") for n in names]
    assert "record_step" not in (tmp_path / dumped[names.index("norms")]).read_text()
    assert "record_step" in (tmp_path / dumped[names.index("clip")]).read_text()
