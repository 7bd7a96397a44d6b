"""Noise drawn ahead on a worker thread (prefetch_noise, fxclip.noise), in runs as a user's loop
makes them: make_private's Poisson batches whose sizes change (empty ones included), keyword
tensors with a padding mask, eager and compiled. At every step the update is, in float64, exactly
(the oracle's clipped sum + sigma C z) / B, with z the next values of the optimizer's own noise
generator, and those values were drawn on the worker thread."""
from __future__ import annotations

import threading

import pytest
import torch
from helpers import D, masked_private_run, per_row_loss
from torch import nn

import fxclip
from fxclip import noise
from fxclip.noise import NoiseSource

C, SIGMA, B = 0.3, 0.8, 4


@pytest.fixture
def draw_threads(monkeypatch):
    """The name of the thread of every NoiseSource draw, in order."""
    names = []
    original = NoiseSource._fill

    def recording(self, *args):
        names.append(threading.current_thread().name)
        return original(self, *args)

    monkeypatch.setattr(NoiseSource, "_fill", recording)
    return names


def stream_values(generator: torch.Generator, model: nn.Module) -> dict:
    """The next noise values of the stream, per parameter in optimizer order (one draw each:
    these parameters are smaller than NOISE_CHUNK)."""
    return {n: torch.randn(p.shape, dtype=p.dtype, generator=generator) for n, p in model.named_parameters()}


@pytest.mark.parametrize("compiled", [False, True])
def test_prefetched_noise_is_the_stream_at_every_step(compiled, draw_threads):
    def noise_for(opt):  # the next values of the optimizer's own generator, from where it starts
        stream = torch.Generator().set_state(opt.noise_source.generator.get_state())
        return lambda step, model: stream_values(stream, model)

    opt, _, sizes, steps = masked_private_run(compiled, noise_for, C, SIGMA, B, prefetch_noise=True)
    assert len(sizes) > 3 and 0 in sizes or len(sizes) > 4
    # every step after the first added values drawn on the worker thread, which has drawn the
    # next step's too
    opt.noise_source._wait()
    assert draw_threads.count("MainThread") == 1
    assert sum(name.startswith("fxclip-noise") for name in draw_threads) == steps


def _adaptive_run(prefetch: bool, generator: torch.Generator, batches: list) -> list:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    pm = fxclip.privatize(model, max_grad_norm=C, loss_fn=per_row_loss)
    opt = fxclip.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), pm, noise_multiplier=SIGMA,
                             expected_batch_size=B, generator=generator, prefetch_noise=prefetch,
                             adaptive_clipping=fxclip.AdaptiveClipping(learning_rate=0.3, count_noise_multiplier=4.0))
    for x, y in batches:
        opt.zero_grad()
        if len(y):
            pm(x, target=y).mean().backward()
        opt.step()
    opt.noise_source._wait()
    return [p.detach().clone() for p in model.parameters()] + [torch.tensor(pm.max_grad_norm)]


def test_drawing_ahead_keeps_the_order_of_the_draws_with_adaptive_clipping(draw_threads):
    """Adaptive clipping draws its count's noise from the same generator during the step: the
    values drawn ahead come after it, as at the step, so a run with prefetching is bit for bit
    the run without it on a generator started where the forked one starts."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(k, 6, dtype=D, generator=g), torch.randn(k, 3, dtype=D, generator=g))
               for k in (5, 2, 0, 7, 4, 6)]
    ahead = _adaptive_run(True, torch.Generator().manual_seed(9), batches)
    assert sum(name.startswith("fxclip-noise") for name in draw_threads) == len(batches)
    forked = NoiseSource(torch.Generator().manual_seed(9), secure=False, prefetch=True).generator
    at_step = _adaptive_run(False, forked, batches)
    assert all(torch.equal(a, b) for a, b in zip(ahead, at_step))
    assert not torch.equal(ahead[-1], torch.tensor(C))  # the threshold moved: the count was drawn


def test_values_drawn_for_another_layout_are_dropped():
    """A step whose gradients are laid out otherwise than the last one's draws its own values;
    the stream goes on after the dropped ones."""
    source = NoiseSource(torch.Generator().manual_seed(1), secure=False, prefetch=True)
    stream = torch.Generator().set_state(source.generator.get_state())
    first = torch.zeros(5)
    source.add_([first], 1.0)
    source.draw_ahead()  # 5 values for a step laid out like the first
    second = torch.zeros(7)
    source.add_([second], 2.0)
    assert torch.equal(first, torch.randn(5, generator=stream))
    torch.randn(5, generator=stream)  # the dropped values
    assert torch.equal(second, 2.0 * torch.randn(7, generator=stream))


def test_runs_drawn_ahead_are_added_run_by_run_in_stream_order(monkeypatch, draw_threads):
    """Several runs (NOISE_CHUNK 4): the worker draws one job per run, in order, and the step adds
    each run's values when they are ready; every step is the stream's next pieces, each piece its
    own draw."""
    monkeypatch.setattr(noise, "NOISE_CHUNK", 4)
    source = NoiseSource(torch.Generator().manual_seed(2), secure=False, prefetch=True)
    stream = torch.Generator().set_state(source.generator.get_state())
    for _ in range(3):
        accs = [torch.zeros(5), torch.zeros(3), torch.zeros(2, 3)]
        source.add_(accs, 1.0)
        source.draw_ahead()
        assert len(source._pending[1]) == 4  # runs [4], [1, 3], [4], [2] of the pieces
        want = [torch.cat([torch.randn(4, generator=stream), torch.randn(1, generator=stream)]),
                torch.randn(3, generator=stream),
                torch.cat([torch.randn(4, generator=stream), torch.randn(2, generator=stream)]).view(2, 3)]
        assert all(torch.equal(a, w) for a, w in zip(accs, want))
    source._wait()
    assert draw_threads.count("MainThread") == 4  # the first step's four runs; then the worker's
    assert sum(name.startswith("fxclip-noise") for name in draw_threads) == 12


def test_secure_noise_drawn_ahead(draw_threads):
    torch.manual_seed(0)
    model = nn.Linear(300, 40)
    pm = fxclip.privatize(model, max_grad_norm=C, loss_reduction="sum")
    opt = fxclip.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), pm, noise_multiplier=SIGMA,
                             expected_batch_size=B, loss_reduction="sum", secure_rng=True, prefetch_noise=True)
    moves = []
    for _ in range(3):
        before = model.weight.detach().clone()
        opt.zero_grad()
        opt.step()  # no backward (an empty batch): the noise alone
        moves.append((model.weight.detach() - before).flatten())
    opt.noise_source._wait()
    assert sum(name.startswith("fxclip-noise") for name in draw_threads) == 3
    assert torch.stack(moves).std().item() == pytest.approx(SIGMA * C, rel=0.03)
    assert not torch.equal(moves[1], moves[2])


def test_prefetching_is_for_cpu_parameters():
    model = nn.Linear(4, 2, device="meta")
    pm = fxclip.privatize(model, max_grad_norm=C)
    with pytest.raises(ValueError, match="prefetch_noise draws on a CPU worker thread"):
        fxclip.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), pm, noise_multiplier=SIGMA,
                           expected_batch_size=B, prefetch_noise=True)
