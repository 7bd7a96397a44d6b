"""explain() says why a parameter is not on a cheaper rule: each rule that applied and declined."""
import torch
from torch import nn

import fxclip


class LowRank(nn.Module):
    """x @ (U @ V): U's and V's gradients are mm's whose other operand is summed over the batch,
    so the linear rule declines and the fallback instantiates them."""

    def __init__(self):
        super().__init__()
        self.u = nn.Parameter(torch.randn(6, 2))
        self.v = nn.Parameter(torch.randn(2, 4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(x @ (self.u @ self.v)))


class Elementwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(6, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(x @ torch.tanh(self.scale))


def _explain(model):
    torch.manual_seed(0)
    return fxclip.explain(model.double(), torch.randn(5, 6, dtype=torch.float64), max_grad_norm=1.0)


def test_a_declined_rule_and_its_reason_reach_json_text_and_html():
    expl = _explain(LowRank())
    rows = {r["name"]: r for r in expl.to_json()["parameters"]}
    why = [{"rule": "linear", "reason": "an operand of the mm has no per-sample batch layout"}]
    assert rows["u"]["rule"] == rows["v"]["rule"] == "fallback"
    assert rows["u"]["declines"] == rows["v"]["declines"] == why
    assert rows["head.weight"]["rule"] == "linear" and rows["head.weight"]["declines"] == []
    text = str(expl)
    assert "why not a cheaper rule:" in text
    assert "  u (fallback): linear: an operand of the mm has no per-sample batch layout" in text
    assert "an operand of the mm has no per-sample batch layout" in expl.to_html()


def test_a_gradient_no_rule_applies_to_names_its_op():
    rows = {r["name"]: r for r in _explain(Elementwise()).to_json()["parameters"]}
    assert rows["scale"]["rule"] == "fallback"
    assert [d["rule"] for d in rows["scale"]["declines"]] == ["no rule"]
    assert rows["scale"]["declines"][0]["reason"].startswith("none covers a gradient computed by ")


def test_a_model_on_its_best_rules_has_no_decline_section():
    expl = _explain(nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)))
    assert all(r["declines"] == [] for r in expl.to_json()["parameters"])
    assert "why not a cheaper rule" not in str(expl)
