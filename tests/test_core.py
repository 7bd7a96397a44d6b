"""The contract (README.md, "Use") on MLPs, sequence models and fallback-only parameters."""
import pytest
import torch
from helpers import batch_loss, check_step, sq_loss
from hypothesis import given
from hypothesis import strategies as st
from reference import per_sample_reference
from torch import nn

import fxclip
from fxclip.passes import rule_counters


class Scaled(nn.Module):
    """x * scale + shift: parameters the linear rule can't take."""

    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d))
        self.shift = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.scale + self.shift


BLOCKS = {
    "linear": lambda d: nn.Linear(d, d),
    "linear_nobias": lambda d: nn.Linear(d, d, bias=False),
    "relu": lambda d: nn.ReLU(),
    "tanh": lambda d: nn.Tanh(),
    "layernorm": lambda d: nn.LayerNorm(d),
    "scaled": Scaled,
    "prelu": lambda d: nn.PReLU(),
    "frozen_linear": lambda d: nn.Linear(d, d).requires_grad_(False),
}

# Inductor rewrites tiny matmuls as pointwise mul + sum, which the unreduce rule takes exactly.
EXPECTED_RULES = {"weight": {"linear", "unreduce"}, "bias": {"unreduce"}, "scale": {"unreduce"},
                  "shift": {"unreduce"}}


@given(
    blocks=st.lists(st.sampled_from(sorted(BLOCKS)), min_size=1, max_size=5),
    seq=st.sampled_from([None, 1, 3]),
    batch=st.integers(1, 7),
    width=st.integers(2, 6),
    clip=st.sampled_from([1e-4, 0.3, 1e4]),
    reduction=st.sampled_from(["mean", "sum"]),
)
def test_random_architectures_match_reference(blocks, seq, batch, width, clip, reduction):
    torch.manual_seed(len(blocks) * 31 + width)
    model = nn.Sequential(nn.Linear(3, width), *[BLOCKS[b](width) for b in blocks]).double()
    shape = (batch, 3) if seq is None else (batch, seq, 3)
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randn(*shape[:-1], width, dtype=torch.float64)
    pm = fxclip.privatize(model, max_grad_norm=clip, loss_reduction=reduction)
    report = check_step(model, pm, x, y, clip, reduction)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {r.name for r in report.params} == trainable
    assert set(report.frozen) == {n for n, p in model.named_parameters() if not p.requires_grad}
    for route in report.params:
        kind = route.name.rsplit(".", 1)[-1]
        if kind in EXPECTED_RULES:  # the rule really fired: no silent fallback
            assert route.rule in (EXPECTED_RULES[kind] if batch > 1 else {"batch_of_one"}), route


def test_linear_strategy_follows_cost_model(model_costs):
    wide = nn.Sequential(nn.Linear(64, 64)).double()  # T*(m+k) = 2*128 < m*k: ghost
    long_seq = nn.Sequential(nn.Linear(4, 4)).double()  # T*(m+k) = 40*8 > 16: instantiate
    for model, shape, strategy in [(wide, (3, 2, 64), "ghost"), (long_seq, (3, 40, 4), "instantiate")]:
        x = torch.randn(*shape, dtype=torch.float64)
        pm = fxclip.privatize(model, max_grad_norm=0.1)
        report = check_step(model, pm, x, torch.randn(*shape[:-1], model[0].out_features, dtype=torch.float64),
                            0.1, "mean")
        assert report.route("0.weight").strategy == strategy


class BilinearNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.PReLU(4)
        self.bilinear = nn.Bilinear(4, 4, 3)

    def forward(self, x):
        return self.bilinear(x, torch.sin(self.act(x) * 2))


def test_fallback_parameters_are_exact_and_reported():
    model = BilinearNet().double()
    before = rule_counters["fallback"]
    pm = fxclip.privatize(model, max_grad_norm=0.05, loss_reduction="sum")
    x = torch.randn(6, 4, dtype=torch.float64)
    report = check_step(model, pm, x, torch.randn(6, 3, dtype=torch.float64), 0.05, "sum")
    assert report.route("bilinear.weight").rule == "fallback"
    assert report.route("bilinear.bias").rule == "unreduce"
    assert rule_counters["fallback"] > before


def test_gradients_accumulate_and_frozen_params_take_no_part():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    model[0].bias.requires_grad_(False)
    pm = fxclip.privatize(model, max_grad_norm=0.2)
    x1, x2 = torch.randn(5, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    y1, y2 = torch.randn(5, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    e1, _ = per_sample_reference(model, (x1,), y1, sq_loss, 0.2)
    e2, n2 = per_sample_reference(model, (x2,), y2, sq_loss, 0.2)
    batch_loss(pm(x1), y1, "mean").backward()
    batch_loss(pm(x2), y2, "mean").backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, e1[name] + e2[name])
    assert model[0].bias.grad is None
    torch.testing.assert_close(pm.per_sample_norms, n2)


def test_privatized_module_shares_parameters():
    model = nn.Linear(3, 2)
    pm = fxclip.privatize(model, max_grad_norm=1.0)
    assert [id(p) for p in pm.parameters()] == [id(p) for p in model.parameters()]
    assert pm.module is model


def test_bad_arguments_are_refused_with_a_hint():
    with pytest.raises(ValueError, match="max_grad_norm"):
        fxclip.privatize(nn.Linear(2, 2), max_grad_norm=0)
    with pytest.raises(ValueError, match="loss_reduction"):
        fxclip.privatize(nn.Linear(2, 2), max_grad_norm=1.0, loss_reduction="none")
    with pytest.raises(fxclip.PrivacyError, match="already privatized"):
        fxclip.privatize(fxclip.privatize(nn.Linear(2, 2), max_grad_norm=1.0), max_grad_norm=1.0)


def test_no_grad_forward_is_plain():
    model = nn.Linear(3, 2)
    pm = fxclip.privatize(model, max_grad_norm=1.0)
    x = torch.randn(4, 3)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), model(x))


@pytest.mark.parametrize("clipping", ["per_layer", [["0.weight", "2.bias"], ["0.bias", "2.weight"]]])
def test_group_wise_clipping_clips_each_group(clipping):
    from reference import per_sample_grads

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64) * 3, torch.randn(6, 2, dtype=torch.float64)
    pm = fxclip.privatize(model, max_grad_norm=0.4, loss_reduction="sum", clipping=clipping)
    batch_loss(pm(x), y, "sum").backward()
    grads = per_sample_grads(model, (x,), y, sq_loss)
    groups = ([["0.weight", "0.bias"], ["2.weight", "2.bias"]] if clipping == "per_layer" else clipping)
    limit = 0.4 / len(groups) ** 0.5  # sqrt(sum_g C_g^2) = C
    for group in groups:
        norms = torch.sqrt(sum(grads[n].reshape(6, -1).square().sum(1) for n in group))
        factor = (limit / (norms + 1e-6)).clamp(max=1.0)
        for n in group:
            expected = torch.einsum("b,b...->...", factor, grads[n])
            torch.testing.assert_close(dict(model.named_parameters())[n].grad, expected)
        assert (factor < 1).any()  # the test exercises clipping


def test_clipping_groups_must_cover_every_parameter():
    with pytest.raises(ValueError, match="missing"):
        fxclip.privatize(nn.Linear(2, 2), max_grad_norm=1.0, clipping=[["weight"]])


def test_max_pool_cnn_is_routed_through_conv_rules():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(4, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    report = check_step(model, fxclip.privatize(model, max_grad_norm=0.5), x, y, 0.5, "mean")
    rules = {r.name: r.rule for r in report.params}
    assert rules["0.weight"] == "conv" and rules["1.weight"] == "unreduce"  # not the fallback
