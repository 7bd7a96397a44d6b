"""The whole DP step's host work: the noise drawn into one buffer per NOISE_CHUNK values and
added by fused ops (the same seeded stream, bit for bit; N(0, sigma^2 C^2) per coordinate), the
Poisson masks drawn for blocks of batches (the same batches), and the accountant's run-length
history (the same epsilon as one event per step)."""
import math

import pytest
import torch
from torch import nn

import fxclip
from fxclip import noise, sampling
from fxclip.accounting import Accountant, epsilon_for
from fxclip.noise import noise_runs as _noise_runs
from fxclip.optim import DPOptimizer
from fxclip.sampling import PoissonBatchSampler

SIGMA, C, B = 1.3, 0.7, 10


class TwoLayers(nn.Module):
    """Several parameters of different sizes, so the noise stream crosses parameter bounds."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(300, 40)
        self.b = nn.Linear(40, 7)

    def forward(self, x):
        return self.b(self.a(x))


def _setup(seed=0, **kw):
    torch.manual_seed(0)
    model = TwoLayers()
    pm = fxclip.privatize(model, max_grad_norm=C, loss_reduction="mean")
    gen = torch.Generator().manual_seed(seed)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), pm, noise_multiplier=SIGMA,
                      expected_batch_size=B, generator=gen, **kw)
    return model, opt


def _noise_of_one_step(model, opt):
    """The update gradient of a step with no backward (an empty batch): noise / B only."""
    opt.zero_grad()
    with torch.no_grad():
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    opt.add_noise()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("chunk", [noise.NOISE_CHUNK, 1000, 37])
def test_fused_noise_is_bit_for_bit_the_per_parameter_stream(monkeypatch, chunk):
    """The stream the seed fixes: for each parameter in optimizer order, one torch.randn per
    NOISE_CHUNK piece of its values, times sigma C / B; step after step."""
    monkeypatch.setattr(noise, "NOISE_CHUNK", chunk)
    model, opt = _setup(seed=4)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):  # steps reuse one draw buffer: each step the stream's next values
        got = _noise_of_one_step(model, opt)
        for g, p in zip(got, model.parameters()):
            pieces = [torch.randn(piece.numel(), generator=gen) for piece in torch.zeros(p.numel()).split(chunk)]
            want = torch.cat(pieces).mul_(opt.noise_multiplier * opt.max_grad_norm / B).view(p.shape)
            assert torch.equal(g, want)


@pytest.mark.parametrize("chunk", [noise.NOISE_CHUNK, 37])
def test_noise_is_gaussian_per_coordinate_with_std_sigma_C_over_B(monkeypatch, chunk):
    monkeypatch.setattr(noise, "NOISE_CHUNK", chunk)
    model, opt = _setup(seed=1)
    z = torch.cat([g.flatten() for g in _noise_of_one_step(model, opt)]) / (SIGMA * C / B)
    n = z.numel()  # 12,327 coordinates
    assert abs(z.mean().item()) < 4 / math.sqrt(n)
    assert z.std().item() == pytest.approx(1.0, rel=0.03)
    inside = (z.abs() < 1).double().mean().item()  # the Gaussian's mass within one std
    assert inside == pytest.approx(0.6827, abs=4 * math.sqrt(0.6827 * 0.3173 / n))
    # no parameter repeats another's values (each gets its own slice of the stream)
    grads = _noise_of_one_step(model, opt)
    assert not torch.equal(grads[0].flatten()[:7], grads[2].flatten()[:7])


def test_noise_is_reproducible_from_the_seed_and_fresh_every_step():
    first = [_noise_of_one_step(*_setup(seed=s)) for s in (5, 5, 6)]
    for a, b in zip(first[0], first[1]):
        assert torch.equal(a, b)
    assert not torch.equal(first[0][0], first[2][0])
    model, opt = _setup(seed=5)
    _noise_of_one_step(model, opt)
    again = _noise_of_one_step(model, opt)  # the second step draws new values
    assert not torch.equal(again[0], first[0][0])


def test_noise_runs_group_whole_draws_up_to_the_chunk():
    xs = [torch.zeros(5), torch.zeros(3, 4), torch.zeros(7), torch.zeros(0), torch.zeros(2)]
    sizes = lambda chunk: [[t.numel() for t in run] for run in _noise_runs(xs, chunk)]  # noqa: E731
    assert sizes(100) == [[5, 12, 7, 2]]
    assert sizes(12) == [[5], [12], [7, 2]]
    assert sizes(6) == [[5], [6], [6], [6], [1, 2]]  # the 12 and the 7 cut into pieces of 6
    mixed = [torch.zeros(3), torch.zeros(2, dtype=torch.float64), torch.zeros(4, 3).t(), torch.zeros(2)]
    runs = list(_noise_runs(mixed, 100))
    assert [[t.numel() for t in run] for run in runs] == [[3], [2], [12, 2]]  # a dtype change splits
    assert runs[2][0].shape == (3, 4)  # a non-contiguous tensor is drawn whole, by its shape


def test_noise_on_low_precision_and_non_contiguous_gradients():
    torch.manual_seed(0)
    model = nn.Linear(200, 60).to(torch.bfloat16)
    pm = fxclip.privatize(model, max_grad_norm=C, loss_reduction="sum")
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), pm, noise_multiplier=SIGMA,
                      expected_batch_size=B, generator=torch.Generator().manual_seed(0))
    model.weight.grad = torch.zeros(60, 200, dtype=torch.bfloat16)
    model.bias.grad = None  # no gradient: noise alone
    opt.add_noise()
    assert model.weight.grad.dtype == torch.bfloat16 and model.bias.grad.dtype == torch.bfloat16
    z = torch.cat([model.weight.grad.flatten(), model.bias.grad]).float() / (SIGMA * C)
    assert z.std().item() == pytest.approx(1.0, rel=0.04)

    model, opt = _setup(seed=0)
    opt.zero_grad()
    weight = model.a.weight
    weight.grad = torch.zeros(weight.shape[::-1]).t()  # non-contiguous, same shape
    opt.add_noise()
    assert weight.grad.std().item() == pytest.approx(SIGMA * C / B, rel=0.05)


def test_compressed_history_gives_the_epsilon_of_one_event_per_step():
    acc = Accountant("rdp")
    steps = [(1.1, 0.01)] * 6 + [(0.9, 0.02)] * 4 + [(1.1, 0.01)] * 3
    for sigma, q in steps:
        acc.step(sigma, q)
    assert acc.history == [(1.1, 0.01, 6), (0.9, 0.02, 4), (1.1, 0.01, 3)]
    uncompressed = epsilon_for([(s, q, 1) for s, q in steps], 1e-5)
    assert acc.epsilon(1e-5) == pytest.approx(uncompressed, rel=1e-9)
    for _ in range(10_000):  # a long run stays one entry
        acc.step(1.1, 0.01)
    assert len(acc.history) == 3 and acc.steps == 10_013


@pytest.mark.parametrize("block", [sampling.MASK_BLOCK, 250, 1])
def test_poisson_batches_drawn_in_blocks_are_the_per_batch_draws(monkeypatch, block):
    """One (k, n) draw for k batches reads the generator as k draws of n do: same batches, and
    a block never draws past the last batch."""
    monkeypatch.setattr(sampling, "MASK_BLOCK", block)
    n, q, batches = 100, 0.1, 7
    gen = torch.Generator().manual_seed(2)
    want = [(torch.rand(n, generator=gen) < q).nonzero().flatten().tolist() for _ in range(batches)]
    sampler = PoissonBatchSampler(n, q, num_batches=batches, generator=torch.Generator().manual_seed(2))
    assert list(sampler) == want
    assert torch.equal(sampler.generator.get_state(), gen.get_state())


def test_gradients_on_another_device_than_the_generator_are_drawn_then_copied():
    """A CPU generator for gradients elsewhere ("meta" stands in for an accelerator): that run is
    drawn on the CPU and copied, the CPU run reuses the step's buffer; one stream for both."""
    source = noise.NoiseSource(torch.Generator().manual_seed(0), secure=False, prefetch=False)
    stream = torch.Generator().manual_seed(0)
    for _ in range(2):
        accs = [torch.zeros(5, device="meta"), torch.zeros(3)]
        source.add_(accs, 1.0)
        torch.randn(5, generator=stream)  # the meta run's values
        assert torch.equal(accs[1], torch.randn(3, generator=stream))
    (plan,) = source._plans.values()
    assert [b is None for b in plan.buffers(torch.device("cpu"))] == [True, False]
