"""The ghost-vs-instantiate cost model: instantiated per-sample gradients replace the weight
gradient's mm, so only the Grams' work is weighed against the bmm's overhead."""
import pytest
import torch
import torch.nn as nn
from helpers import check_step

import fxclip
from fxclip.passes import rule_counters
from fxclip.passes.rules import cost


def test_instantiation_is_priced_as_a_replacement_of_the_weight_gradient():
    # d=128 attention projections at T=64: the old model (T (m + k) vs m k, as if instantiation
    # added a full B T m k mm) chose instantiation; the Grams are cheaper than the bmm's overhead
    assert cost.choose(16, 64, 128, 128).strategy == "ghost"
    # the choice flips with the sequence length: long rows per sample, small matrices
    strategies = [cost.choose(16, T, 16, 16).strategy for T in (1, 4, 16, 64, 256)]
    assert strategies[0] == "ghost" and strategies[-1] == "instantiate"
    flip = strategies.index("instantiate")
    assert all(s == "instantiate" for s in strategies[flip:])
    # one row per sample (an MLP): norms from row norms, never a B x m x k tensor
    assert cost.choose(64, 1, 5120, 2560).strategy == "ghost"
    choice = cost.choose(16, 256, 16, 16)
    assert choice.flops == cost.instantiate_cost(16, 256, 16, 16)[0]
    assert choice.held_bytes == 4 * 16 * 16 * 16  # the per-sample gradients


def test_explain_reports_both_costs_and_the_choice(model_costs):
    model = nn.Sequential(nn.Linear(4, 4)).double()  # T=40 rows of 4 features: instantiate
    x = torch.randn(3, 40, 4, dtype=torch.float64)
    pm = fxclip.privatize(model, max_grad_norm=0.1)
    report = check_step(model, pm, x, torch.randn(3, 40, 4, dtype=torch.float64), 0.1, "mean")
    route = report.route("0.weight")
    assert route.rule == "linear" and route.strategy == "instantiate"
    ghost, inst = (float(route.shapes[k].removesuffix("MB")) for k in ("ghost cost", "instantiate cost"))
    assert inst < ghost
    rows = {r["name"]: r for r in fxclip.explain(model, x, max_grad_norm=0.1).to_json()["parameters"]}
    assert rows["0.weight"]["strategy"] == "instantiate"
    assert {"ghost cost", "instantiate cost"} <= set(rows["0.weight"]["shapes"])
    # the instantiated per-sample gradients replace the weight-gradient mm: no mm left computes
    # a (4, 4) weight gradient from the batch rows
    mms = [n for n in report.graph.nodes if n.target == torch.ops.aten.mm.default
           and tuple(n.meta["val"].shape) == (4, 4)]
    assert mms == []


# --- the measured choice: where the model's two costs are close, both candidates are timed ---
_time_candidates = cost._time_candidates

def _fake_timing(monkeypatch, faster: str):
    """Make every timed candidate report `faster` as the quicker one, and count the timings."""
    calls = []

    def fake(candidates):
        calls.append(candidates.key)
        inputs = candidates.make_inputs()  # the real shapes can be built and both candidates run
        candidates.ghost(*inputs), candidates.instantiate(*inputs)
        return {"ghost": 1e-3, "instantiate": 2e-3} if faster == "ghost" else {"ghost": 2e-3, "instantiate": 1e-3}

    monkeypatch.setattr(cost, "_time_candidates", fake)
    monkeypatch.setattr(cost, "_measured", {})
    return calls


@pytest.mark.parametrize("faster", ["ghost", "instantiate"])
def test_measured_choice_overrides_the_model_and_stays_exact(faster, monkeypatch):
    # d=8 projections at T=12: the model's costs are within MEASURE_WITHIN, so the layer is timed
    calls = _fake_timing(monkeypatch, faster)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)).double()
    x = torch.randn(5, 12, 8, dtype=torch.float64)
    before = rule_counters["linear"]
    pm = fxclip.privatize(model, max_grad_norm=0.05)
    report = check_step(model, pm, x, torch.randn(5, 12, 8, dtype=torch.float64), 0.05, "mean")
    assert rule_counters["linear"] >= before + 2
    for name in ("0.weight", "2.weight"):
        route = report.route(name)
        assert route.rule == "linear" and route.strategy == faster, name
        assert route.shapes["chosen by"] == "measured"
        assert {"ghost time", "instantiate time"} <= set(route.shapes)
    assert len(calls) == 1  # both layers have the same shapes: timed once, then cached
    text = str(fxclip.explain(model, x, max_grad_norm=0.05))
    times = "ghost 1000us, instantiate 2000us" if faster == "ghost" else "ghost 2000us, instantiate 1000us"
    assert f"0.weight {faster} ({times})" in text  # explain's text says what was timed and chosen


def test_timing_off_lopsided_or_failing_falls_back_to_the_model(monkeypatch):
    calls = _fake_timing(monkeypatch, "instantiate")
    candidates = cost.Candidates(("k",), lambda: (torch.zeros(2),), lambda t: t, lambda t: t, 1 << 30)
    # one row per sample, wide layer: ghost is far cheaper by the model, never timed
    assert cost.choose(64, 1, 512, 512, candidates=candidates).strategy == "ghost" and calls == []
    # per-sample gradients of 64 x 2048 x 2048 floats (1 GiB): never built just to be timed
    assert cost.choose(64, 512, 2048, 2048, candidates=candidates).measured == {} and calls == []
    monkeypatch.setenv("FXCLIP_STRATEGY", "model")
    choice = cost.choose(16, 64, 128, 128, candidates=candidates)
    assert choice.strategy == "ghost" and choice.describe()["chosen by"] == "model" and calls == []
    monkeypatch.delenv("FXCLIP_STRATEGY")
    monkeypatch.setattr(cost, "_measured", {})

    def broken():
        raise RuntimeError("no such device")

    assert _time_candidates(cost.Candidates(("b",), broken, None, None)) == {}


def test_real_timing_picks_the_faster_candidate_and_keeps_the_rng(monkeypatch):
    monkeypatch.setattr(cost, "_measured", {})

    def busy(t):
        for _ in range(50):
            t = t @ t.T / t.shape[0]
        return t

    candidates = cost.Candidates(("busy",), lambda: (torch.ones(64, 64),), busy, lambda t: t + 1, 1 << 30)
    rng = torch.get_rng_state()
    # close model costs (within MEASURE_WITHIN) so the candidates are timed
    choice = cost.choose(16, 64, 128, 128, candidates=candidates)
    assert choice.strategy == "instantiate"  # the cheap candidate, against the model's "ghost"
    assert choice.measured["ghost"] > choice.measured["instantiate"] > 0
    gen = cost.generator_for("cpu")
    cost.random_like(torch.empty(3, 4).t(), gen)  # timing inputs come from their own generator
    assert torch.equal(rng, torch.get_rng_state())


def test_compiling_with_timing_leaves_the_users_random_stream_alone(monkeypatch):
    monkeypatch.setattr(cost, "_measured", {})
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    x = torch.randn(8, 12, 16)
    pm = fxclip.privatize(model, max_grad_norm=1.0)
    torch.manual_seed(1)
    pm(x).sum().backward()  # the first call traces, rewrites and times the linear layers
    after = torch.rand(3)
    torch.manual_seed(1)
    model(x).sum()
    assert torch.equal(after, torch.rand(3))
    assert pm.last_report.route("0.weight").shapes["chosen by"] == "measured"
