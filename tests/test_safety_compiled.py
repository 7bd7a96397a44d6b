"""The refusals of issue 4 under a plain torch.compile(pm), the coverage proof, graph breaks and
compile-cache safety (plain and private copies, same process and a second process)."""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import Wrap, sq_loss
from reference import per_sample_reference
from test_safety_refusals import MutatesParam, Scalar, TwoInputs
from torch import nn

import fxclip
from fxclip.passes import rules


def test_compiled_mixing_is_refused():
    cpm = torch.compile(fxclip.privatize(Wrap(lambda h: h - h.mean(0, keepdim=True)), max_grad_norm=1.0))
    with pytest.raises(fxclip.PrivacyError, match=r"aten::mean.*module 'inner'.*mixes samples"):
        cpm(torch.randn(5, 3)).sum().backward()


def test_compiled_batchnorm_training_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    cpm = torch.compile(fxclip.privatize(model, max_grad_norm=1.0))
    with pytest.raises(fxclip.PrivacyError, match=r"var_mean.*BatchNorm1d.*GroupNorm"):
        cpm(torch.randn(5, 3)).sum().backward()


def test_compiled_bad_inputs_and_outputs_are_refused():
    with pytest.raises(fxclip.PrivacyError, match="no batch dimension.*mean loss"):
        torch.compile(fxclip.privatize(Scalar(), max_grad_norm=1.0))(torch.randn(4, 3)).backward()
    class Mismatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 2)

        def forward(self, x, z):
            return self.l(x) + 0 * z.sum()

    with pytest.raises(fxclip.PrivacyError, match="batch size 3 but the first input has batch size 4|"
                                                  "batch sizes disagree: input 0: 4, input 1: 3"):
        torch.compile(fxclip.privatize(Mismatch(), max_grad_norm=1.0))(
            torch.randn(4, 3), torch.randn(3, 2)).sum().backward()
    cpm = torch.compile(fxclip.privatize(TwoInputs(), max_grad_norm=1.0))
    with pytest.raises(fxclip.PrivacyError, match="0-d tensor"):
        cpm(torch.randn(4, 3), {"shift": [torch.randn(4, 2)], "scale": torch.tensor(2.0)}).sum().backward()


def test_compiled_parameter_modified_in_forward_is_refused():
    cpm = torch.compile(fxclip.privatize(MutatesParam(), max_grad_norm=1.0))
    with pytest.raises(fxclip.PrivacyError, match="parameter 'l.weight' is modified in place"):
        cpm(torch.randn(4, 3)).sum().backward()


def test_graph_break_inside_the_model_is_refused():
    class Breaking(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            h = self.a(x)
            torch._dynamo.graph_break()
            return self.b(h)

    model = Breaking()
    # "one graph": Dynamo ran the frame eagerly (recompile limit), so fxclip's eager path refused
    with pytest.raises(fxclip.PrivacyError, match="graph break|one graph"):
        torch.compile(fxclip.privatize(model, max_grad_norm=1.0))(torch.randn(4, 3)).sum().backward()
    assert all(p.grad is None for p in model.parameters())


def test_parameter_outside_the_private_model_in_the_same_region_is_refused():
    pm = fxclip.privatize(nn.Linear(3, 2), max_grad_norm=1.0)
    outer = nn.Sequential(pm, nn.Tanh(), nn.Linear(2, 2))
    with pytest.raises(fxclip.PrivacyError, match="would receive an unclipped gradient"):
        torch.compile(outer)(torch.randn(4, 3)).sum().backward()
    assert outer[2].weight.grad is None


def test_coverage_catches_a_rule_that_returns_the_unclipped_gradient(monkeypatch):
    # a broken rule: its "reweighted" gradient is the original sum over the batch
    from fxclip.passes.rules import unreduce

    monkeypatch.setattr(unreduce.UnreduceRoute, "reweighted", lambda self, ctx, clip: self.contribution.root)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(fxclip.PrivacyError, match="does not depend on the clip factors"):
        fxclip.privatize(model, max_grad_norm=1.0)(torch.randn(5, 3)).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert rules  # imported for the registry the monkeypatch touches


@pytest.mark.slow
def test_compiled_nonfinite_sample_refuses_and_double_backward_fails_loudly():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    cpm = torch.compile(fxclip.privatize(model, max_grad_norm=1.0))
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    y[2] = float("nan")
    (cpm(x) - y).square().sum(1).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(fxclip.PrivacyError, match=r"1 sample\(s\).*non-finite.*rows \[2\]"):
        cpm.check_step()
    model.zero_grad()
    # double backward: torch's compiled backward refuses create_graph=True itself (donated buffers)
    y[2] = 0.0
    with pytest.raises(RuntimeError, match="create_graph"):
        (cpm(x) - y).square().sum(1).mean().backward(create_graph=True)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


CACHE_SCRIPT = textwrap.dedent("""
    import sys, copy, torch
    from torch import nn
    sys.path.insert(0, {tests!r})
    import fxclip
    from reference import per_sample_reference
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(16, 2))
    x, y = torch.randn(5, 2, 4, 4) * 10, torch.randn(5, 2)
    plain_model, private_model = copy.deepcopy(model), copy.deepcopy(model)
    order = [("private", private_model), ("plain", plain_model)]
    if sys.argv[1] == "plain_first":
        order.reverse()
    for kind, m in order:
        cm = torch.compile(fxclip.privatize(m, max_grad_norm=0.1) if kind == "private" else m)
        (cm(x) - y).square().sum(1).mean().backward()
    expected, _ = per_sample_reference(model, (x,), y, lambda o, t: (o - t).square().sum(), 0.1)
    plain = torch.func.grad(lambda ps: (torch.func.functional_call(model, ps, (x,)) - y)
                            .square().sum(1).mean())(dict(model.named_parameters()))
    for (n, p), q in zip(private_model.named_parameters(), plain_model.parameters()):
        torch.testing.assert_close(p.grad, expected[n], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(q.grad, plain[n], atol=1e-5, rtol=1e-4)
    print("ok")
""")


@pytest.mark.slow
def test_plain_and_private_copies_share_no_cached_graph_across_processes(tmp_path):
    script = tmp_path / "cache_check.py"
    script.write_text(CACHE_SCRIPT.format(tests=os.path.dirname(__file__)))
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor-cache"))
    for order in ("private_first", "plain_first"):  # the second process starts with a warm cache
        done = subprocess.run([sys.executable, str(script), order], env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
    assert any((tmp_path / "inductor-cache").rglob("*")), "the cache was used"


def test_plain_and_private_copies_in_one_process():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    plain_model, private_model = copy.deepcopy(model), copy.deepcopy(model)
    x, y = torch.randn(5, 3, dtype=torch.float64) * 10, torch.randn(5, 2, dtype=torch.float64)
    for m in (fxclip.privatize(private_model, max_grad_norm=0.1), plain_model):  # eager private
        (m(x) - y).square().sum(1).mean().backward()
    expected, _ = per_sample_reference(model, (x,), y, sq_loss, 0.1)
    plain = torch.func.grad(lambda ps: (torch.func.functional_call(model, ps, (x,)) - y)
                            .square().sum(1).mean())(dict(model.named_parameters()))
    for (n, p), q in zip(private_model.named_parameters(), plain_model.parameters()):
        torch.testing.assert_close(p.grad, expected[n])
        torch.testing.assert_close(q.grad, plain[n])
