"""The contract under a plain torch.compile(pm): same gradients as eager, one graph, safe caches."""
import pytest
import torch
from helpers import sq_loss
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import per_sample_reference
from torch import nn

import fxclip


class SeqModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 16)
        self.norm = nn.LayerNorm(16)
        self.scale = nn.Parameter(torch.ones(16))
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        return self.out(torch.relu(self.norm(self.inp(x))) * self.scale)


@pytest.fixture(scope="module")
def compiled_seq():
    model = SeqModel().double()
    return model, torch.compile(fxclip.privatize(model, max_grad_norm=0.5))


def test_compiled_matches_reference_across_batch_sizes(compiled_seq):
    import torch._dynamo.utils as dynamo_utils

    model, cpm = compiled_seq
    graphs_before = dynamo_utils.counters["stats"]["unique_graphs"]
    for batch in (4, 7, 10, 3):  # Poisson-sampled sizes: one recompile at most (automatic dynamic)
        model.zero_grad()
        x = torch.randn(batch, 6, 5, dtype=torch.float64)
        y = torch.randn(batch, 6, 3, dtype=torch.float64)
        expected, norms = per_sample_reference(model, (x,), y, sq_loss, 0.5)
        (cpm(x) - y).square().sum((1, 2)).mean().backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected[name], atol=1e-10, rtol=1e-7)
        torch.testing.assert_close(cpm.per_sample_norms, norms)
    assert dynamo_utils.counters["stats"]["unique_graphs"] - graphs_before <= 2
    rules = {r.name: r.rule for r in cpm.last_report.params}
    assert rules["inp.weight"] == "linear" and rules["norm.weight"] == "unreduce"


@settings(max_examples=6, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.integers(2, 9), seq=st.sampled_from([1, 4]), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_compiled_property_batch_and_clip_regimes(compiled_seq, batch, seq, scale):
    model, cpm = compiled_seq
    model.zero_grad()
    x = torch.randn(batch, seq, 5, dtype=torch.float64) * scale
    y = torch.randn(batch, seq, 3, dtype=torch.float64)
    expected, norms = per_sample_reference(model, (x,), y, sq_loss, 0.5)
    (cpm(x) - y).square().sum((1, 2)).mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], atol=1e-10, rtol=1e-7)
    torch.testing.assert_close(cpm.per_sample_norms, norms)


def test_eager_and_compiled_agree(compiled_seq):
    model, cpm = compiled_seq
    eager = fxclip.privatize(model, max_grad_norm=0.5)
    x = torch.randn(5, 6, 5, dtype=torch.float64) * 10
    grads = []
    for pm in (eager, cpm):
        model.zero_grad()
        pm(x).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-9)


class Breaking(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        h = self.a(x)
        torch._dynamo.graph_break()
        return self.b(h)


def test_eager_path_refuses_graph_break():
    pm = fxclip.privatize(Breaking(), max_grad_norm=1.0)
    with pytest.raises(fxclip.PrivacyError, match="one graph"):
        pm(torch.randn(4, 3))


def test_backend_without_the_pass_is_refused():
    cpm = torch.compile(fxclip.privatize(nn.Linear(3, 2), max_grad_norm=1.0), backend="aot_eager")
    with pytest.raises(fxclip.PrivacyError, match="without fxclip's graph rewrite"):
        cpm(torch.randn(4, 3)).sum().backward()


class TiedTokens(nn.Module):
    """A tied embedding / LM head and a bilinear layer: scatters and fallback under Inductor."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.mix = nn.Bilinear(4, 4, 4)
        self.head = nn.Linear(4, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = torch.tanh(self.emb(ids))
        return self.head(self.mix(h, h))


def test_compiled_scatter_and_fallback_gradients_are_exact():
    model = TiedTokens().double()
    cpm = torch.compile(fxclip.privatize(model, max_grad_norm=0.3))
    ids = torch.randint(0, 11, (5, 3))
    y = torch.randn(5, 3, 11, dtype=torch.float64)
    expected, norms = per_sample_reference(model, (ids,), y, sq_loss, 0.3)
    (cpm(ids) - y).square().sum((1, 2)).mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], atol=1e-10, rtol=1e-7)
    torch.testing.assert_close(cpm.per_sample_norms, norms)


@pytest.mark.slow
def test_many_privatized_models_each_get_a_compiled_graph():
    """Each privatized module has its own Dynamo cache: a sweep over model shapes must not
    exhaust a shared recompile limit and drop to the (slower) eager path."""
    import fxclip._compile as wiring

    for i in range(10):  # more than Dynamo's recompile limit of 8 per code object
        model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(1 + i % 3)], nn.Linear(4, i + 1))
        wiring.compiled_reports.clear()
        cpm = torch.compile(fxclip.privatize(model, max_grad_norm=1.0))
        cpm(torch.randn(3, 4)).sum().backward()
        report = cpm._orig_mod.last_report
        assert report is not None, i  # Inductor ran the pass
        # its own report, not the previous (differently layered) model's
        assert report.param_names() == {n for n, _ in model.named_parameters()}, i
        assert cpm._orig_mod._eager is None, i  # the eager fallback was never built
