"""Memory of the compiled backward: the rewrite holds no extra parameter-sized buffer.

Peak bytes come from torch.profiler's allocation events inside one backward (not timings): the
privatized backward may hold the per-sample buffers that explain reports (row norms, Grams,
R-scaled rows), nothing of a weight gradient's size beyond the gradients themselves.
"""
import copy

import pytest
import torch
from torch import nn

import fxclip
from bench.step_memory import peak_allocations


def _backward_allocations(model, x):
    """(peak bytes live during loss.backward(), sizes of all allocations in it), by the profiler."""
    loss = model(x).square().sum()
    return peak_allocations(loss.backward)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(8, 256), (8, 4, 256)])  # one row per sample; T=4 rows (Grams)
def test_compiled_backward_holds_no_extra_gradient_sized_buffer(shape):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 128))
    x = torch.randn(*shape)
    plain = torch.compile(copy.deepcopy(base), dynamic=False)
    private = torch.compile(fxclip.privatize(copy.deepcopy(base), max_grad_norm=1.0, loss_reduction="sum"),
                            dynamic=False)
    measured = {}
    for name, model in (("plain", plain), ("private", private)):
        for _ in range(2):  # the second backward runs the compiled code without compiling
            for p in model.parameters():
                p.grad = None
            measured[name] = _backward_allocations(model, x)
    report = fxclip.explain(base, x, max_grad_norm=1.0, loss_reduction="sum").report
    assert {r.rule for r in report.params} == {"linear", "unreduce"}
    per_sample = sum(r.extra_bytes for r in report.params)
    (plain_peak, plain_sizes), (private_peak, private_sizes) = measured["plain"], measured["private"]
    smallest_weight = 4 * min(p.numel() for p in base.parameters() if p.dim() == 2)
    # the weight-gradient-sized allocations are the weight gradients, in both
    assert [s for s in private_sizes if s >= smallest_weight] == [s for s in plain_sizes if s >= smallest_weight]
    # R-scaled rows of one operand per layer (at most B*T x 512 and B*T x 128 floats): the only other extra
    scaled_rows = 4 * x[..., 0].numel() * (512 + 128)
    assert private_peak <= plain_peak + per_sample + scaled_rows, (private_peak, plain_peak, per_sample)


def test_dp_optimizer_step_draws_noise_in_chunks_beside_the_gradient(monkeypatch):
    """The noise is added to .grad in place, NOISE_CHUNK values at a time: the optimizer step
    allocates nothing of a weight gradient's size (the seed MLP held one per parameter before)."""
    monkeypatch.setattr(fxclip.noise, "NOISE_CHUNK", 4096)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 128))
    pm = fxclip.privatize(model, max_grad_norm=1.0, loss_reduction="mean")
    opt = fxclip.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), pm, noise_multiplier=1.0,
                             expected_batch_size=8, loss_reduction="mean")
    pm(torch.randn(8, 256)).square().sum(1).mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    clipped = [p.grad.clone() for p in model.parameters()]
    _, sizes = peak_allocations(opt.step)
    assert max(sizes) <= 4 * 4096, sizes[:4]
    for p, w, g in zip(model.parameters(), before, clipped):
        # .grad held the clipped sum / B (a DPOptimizer owns the module); the update is
        # lr * (sum + noise) / B with noise of std sigma * C = 1
        noise = ((w - p.detach()) / 0.1 - g) * 8
        assert 0.8 < noise.std() < 1.2 and abs(noise.mean()) < 0.1
