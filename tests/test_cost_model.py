"""The ghost-vs-instantiate cost model: instantiated per-sample gradients replace the weight
gradient's mm, so only the Grams' work is weighed against the bmm's overhead."""
import torch
import torch.nn as nn

import fxclip
from fxclip.passes.rules import cost

from test_core import check_step


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


def test_explain_reports_both_costs_and_the_choice():
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
