"""noise_rng="philox" (fxclip.philox): the counter-based CPU stream. The generator against the
Random123 known answers, every value against the documented formula, the values' distribution,
and training runs as a user's loop makes them (make_private's Poisson batches of changing size,
keyword tensors with a padding mask, eager and compiled, drawn at the step or ahead): at every
step the update is, in float64, exactly (the oracle's clipped sum + sigma C z) / B with z the
stream's next draw."""
from __future__ import annotations

import math
import threading

import pytest
import torch
from helpers import D, masked_private_run, per_row_loss
from scipy import stats
from torch import nn

import fxclip
from fxclip import noise, philox

C, SIGMA, B = 0.3, 0.8, 4


def test_generator_gives_the_random123_known_answers():
    assert philox.philox4x32_10((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    ones = 0xFFFFFFFF
    assert philox.philox4x32_10((ones,) * 4, (ones, ones)) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    assert philox.philox4x32_10((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) \
        == (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)


def documented_value(key: int, draw: int, i: int) -> float:
    """Value i of draw `draw` under `key`, as fxclip/philox.py's docstring defines it."""
    block, k, lane = i // 256, (i % 256) // 64, i % 64
    j = 64 * block + lane
    w = philox.philox4x32_10((j % 2**32, j >> 32, draw % 2**32, draw >> 32), (key % 2**32, key >> 32))
    h = k // 2
    r = math.sqrt(-2 * math.log(((w[2 * h] >> 8) + 0.5) / 2**24))
    t = 2 * math.pi * (w[2 * h + 1] >> 8) / 2**24
    return r * math.cos(t) if k % 2 == 0 else r * math.sin(t)


@pytest.mark.parametrize("key,draw", [(0, 0), (12345, 7), (2**62 - 1, 2**40 + 3)])
def test_values_are_the_documented_stream(key, draw):
    n = 1000  # three whole blocks and a partial one
    z = philox.normal_(torch.empty(n), key, draw)
    want = torch.tensor([documented_value(key, draw, i) for i in range(n)], dtype=torch.float64)
    # float32 values of the formula (vector log, cos and sin: a few ulp)
    torch.testing.assert_close(z.double(), want, rtol=0, atol=4e-6)
    # a later piece, float64 and non-contiguous outputs: the same values
    assert torch.equal(philox.normal_(torch.empty(n - 512), key, draw, first=512), z[512:])
    assert torch.equal(philox.normal_(torch.empty(n, dtype=torch.float64), key, draw), z.double())
    strided = torch.empty(n, 2)[:, 0]
    assert torch.equal(philox.normal_(strided, key, draw), z)
    assert torch.equal(philox.normal_(torch.empty(300), key, draw, first=100), z[100:400])  # inside a block
    acc = torch.ones(n - 37)
    torch.testing.assert_close(philox.add_(acc, 0.5, key, draw, first=37), 1 + 0.5 * z[37:], rtol=0, atol=1e-6)


def test_values_are_standard_normal_and_draws_independent():
    n = 1 << 20
    z = philox.normal_(torch.empty(n), 3, 0).double()
    assert abs(z.mean()) < 5 / math.sqrt(n) and abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    assert z.abs().max() <= 5.9  # 24-bit uniforms: the largest radius is sqrt(-2 ln 2^-25)
    other_draw = philox.normal_(torch.empty(n), 3, 1).double()
    other_key = philox.normal_(torch.empty(n), 4, 0).double()
    for w in (other_draw, other_key):
        assert abs(torch.corrcoef(torch.stack([z, w]))[0, 1]) < 5 / math.sqrt(n)


def test_loading_the_library_keeps_denormals():
    """-ffast-math at link time would make the loaded object flush float denormals to zero in the
    whole process; the build links without it."""
    philox.library()
    tiny = torch.tensor([1e-40], dtype=torch.float32)
    assert (tiny * 1.0).item() > 0


def test_without_a_compiler_the_option_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(philox, "_library", None)
    monkeypatch.setenv("FXCLIP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(philox, "_compiler", lambda: None)
    with pytest.raises(RuntimeError, match="no C compiler"):
        philox.library()
    monkeypatch.setattr(philox, "_compiler", lambda: str(tmp_path / "no-such-cc"))
    with pytest.raises(RuntimeError, match="compiling its C"):
        philox.library()


def _step_draws(key: int, step: int, model: nn.Module) -> dict:
    """A step's values: each parameter in optimizer order its own draw, numbered on from the last
    step's."""
    params = dict(model.named_parameters())
    first = step * len(params)
    return {n: philox.normal_(torch.empty(p.shape, dtype=D), key, first + i) for i, (n, p) in enumerate(params.items())}


def _masked_run(compiled: bool, prefetch: bool) -> tuple[list, set, int]:
    def noise_for(opt):  # step t adds the draws numbered on from step t - 1's
        return lambda step, model: _step_draws(opt.noise_source.philox_key, step, model)

    _, params, sizes, steps = masked_private_run(compiled, noise_for, C, SIGMA, B, noise_rng="philox",
                                                 prefetch_noise=prefetch)
    return params, sizes, steps


@pytest.mark.parametrize("compiled", [False, True])
def test_runs_add_the_stream_at_every_step_drawn_at_the_step_or_ahead(compiled, monkeypatch):
    threads, fill = [], noise.NoiseSource._fill
    monkeypatch.setattr(noise.NoiseSource, "_fill",
                        lambda self, *a: threads.append(threading.current_thread().name) or fill(self, *a))
    at_step, sizes, steps = _masked_run(compiled, prefetch=False)
    assert len(sizes) > 3 and 0 in sizes or len(sizes) > 4
    assert threads == []  # at the step each draw is added as it is made: no buffer filled
    ahead, _, _ = _masked_run(compiled, prefetch=True)
    # counter-based: drawing ahead on the worker gives the run bit for bit
    assert all(torch.equal(a, b) for a, b in zip(ahead, at_step))
    # the first step drew at the step; every later one, and the one after the run, on the worker
    assert len(threads) == steps and all(name.startswith("fxclip-noise") for name in threads)


def test_float32_gradients_are_noised_in_one_pass_on_several_threads(monkeypatch):
    """Contiguous float32 gradients: each its own draw, added in one pass (no buffer); with
    several torch threads and many values, in pieces on a pool of threads: the same values."""
    accs = [torch.zeros(3000), torch.zeros(40, 25), torch.zeros(7)]
    source = noise.NoiseSource(torch.Generator().manual_seed(2), secure=False, prefetch=False, philox=True)
    source.add_(accs, 0.5)
    for i, acc in enumerate(accs):  # step 1: draws 0, 1, 2
        torch.testing.assert_close(acc.view(-1), 0.5 * philox.normal_(torch.empty(acc.numel()), source.philox_key, i),
                                   rtol=0, atol=1e-7)
    split = [torch.zeros_like(a) for a in accs]
    pool_threads = []
    add = philox.add_
    monkeypatch.setattr(philox, "add_", lambda *a, **k: pool_threads.append(threading.current_thread().name)
                        or add(*a, **k))
    monkeypatch.setattr(noise, "NOISE_CHUNK", 512)
    monkeypatch.setattr(noise, "PARALLEL_ADD_VALUES", 1000)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    source._philox_draws = 0
    source.add_(split, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(split, accs))
    assert len(pool_threads) == 6 + 2 + 1 and all(t.startswith("fxclip-noise-add") for t in pool_threads)


def test_key_is_one_draw_of_the_generator_and_options_are_checked():
    model = nn.Linear(3, 2).double()
    pm = fxclip.privatize(model, max_grad_norm=C)
    opt = fxclip.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), pm, noise_multiplier=SIGMA,
                             expected_batch_size=B, generator=torch.Generator().manual_seed(5), noise_rng="philox")
    assert opt.noise_source.philox_key == int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(5)))
    make = lambda **kw: fxclip.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), pm,  # noqa: E731
                                           noise_multiplier=SIGMA, expected_batch_size=B, **kw)
    with pytest.raises(ValueError, match="'torch' or 'philox'"):
        make(noise_rng="mt")
    with pytest.raises(ValueError, match="os.urandom"):
        make(noise_rng="philox", secure_rng=True)


def _float32_run(prefetch: bool, batches: list) -> list:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    pm = fxclip.privatize(model, max_grad_norm=C, loss_fn=per_row_loss)
    opt = fxclip.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), pm, noise_multiplier=SIGMA,
                             expected_batch_size=B, generator=torch.Generator().manual_seed(4),
                             noise_rng="philox", prefetch_noise=prefetch)
    for x, y in batches:
        opt.zero_grad()
        if len(y):
            pm(x, target=y).mean().backward()
        opt.step()
    opt.noise_source._wait()
    return [p.detach().clone() for p in model.parameters()]


def test_float32_run_drawn_ahead_is_the_run_drawn_at_the_step():
    """float32 gradients: at the step the C code draws and adds in one pass; ahead, the worker
    draws and the step adds with torch: the same values and the same rounding, bit for bit."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(k, 6, generator=g), torch.randn(k, 3, generator=g)) for k in (5, 2, 0, 7, 4)]
    at_step, ahead = _float32_run(False, batches), _float32_run(True, batches)
    assert all(torch.equal(a, b) for a, b in zip(at_step, ahead))
    assert not torch.equal(at_step[0], _float32_run(False, batches[:1])[0])  # the steps moved it
