"""The Gaussian noise of the DP step: N(0, 1) values in a documented stream, drawn at the step or
one step ahead on a worker thread.

The stream: for each accumulator in optimizer order, one draw (torch.randn of the generator) per
NOISE_CHUNK piece of its flat values. Pieces are grouped into runs of at most NOISE_CHUNK values,
each drawn into one buffer and added by one fused op, so that (drawing at the step) at most
NOISE_CHUNK noise values exist beside the gradients.

Drawing ahead (`prefetch=True`, CPU only): after a step, a worker thread draws the next step's
values while the caller loads data and runs forward and backward; the step then only adds them.
torch's CPU generator is a Mersenne Twister that draws ~5 ns per value on one core, which for a
model of millions of parameters costs as much as its forward and backward: drawing ahead moves
that off the training thread onto an idle core. It holds one gradient-sized float buffer, and it
draws from its own generator, seeded once from the given one (or torch's global RNG): the loader
may share that generator, and two threads reading one generator would make the order of the
values depend on timing.
"""
from __future__ import annotations

import math
import os
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

NOISE_CHUNK = 1 << 18  # noise values drawn at a time (1 MB in float32)


def secure_normal(shape, *, dtype=torch.float64) -> torch.Tensor:
    """Standard normal samples from the OS's CSPRNG (os.urandom), via Box-Muller in float64.

    Costs 16 random bytes per sample; fine for small and medium models, slow for huge ones.
    """
    n = math.prod(shape)
    m = (n + 1) // 2
    words = np.frombuffer(os.urandom(16 * m), dtype=np.uint64).reshape(2, m)
    u = ((words >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53  # in (0, 1), never 0
    r = np.sqrt(-2.0 * np.log(u[0]))
    z = np.concatenate([r * np.cos(2 * np.pi * u[1]), r * np.sin(2 * np.pi * u[1])])[:n]
    return torch.from_numpy(z).reshape(shape).to(dtype)


def noise_runs(accs: list, chunk: int):
    """The accumulators' noise draws, grouped into runs of at most `chunk` values. A draw is one
    accumulator's own piece (the whole tensor, or its flat values cut every `chunk` values); a run
    never mixes dtypes or devices; a non-contiguous tensor is drawn whole, by shape."""
    run, room = [], chunk
    for acc in accs:
        pieces = (acc,) if acc.numel() <= chunk or not acc.is_contiguous() else acc.view(-1).split(chunk)
        for piece in pieces:
            if piece.numel() == 0:
                continue
            if run and (piece.numel() > room or (piece.dtype, piece.device) != (run[0].dtype, run[0].device)):
                yield run
                run, room = [], chunk
            run.append(piece)
            room -= piece.numel()
    if run:
        yield run


def _layout(runs: list) -> tuple:
    """What a run's draw depends on: its pieces' sizes, its dtype and device."""
    return tuple((tuple(t.numel() for t in run), run[0].dtype, run[0].device) for run in runs)


class NoiseSource:
    """Where a DPOptimizer's N(0, 1) values come from (see the module docstring).

    Args:
        generator: torch.Generator of the stream; None: torch's global RNG.
        secure: draw from os.urandom instead (no generator).
        prefetch: draw the next step's values on a worker thread (CPU tensors only).
    """

    def __init__(self, generator: torch.Generator | None, *, secure: bool, prefetch: bool):
        self.secure = secure
        self.prefetch = prefetch
        self.generator = generator
        if prefetch and not secure:
            self.generator = _forked(generator)
        self._worker = None
        self._pending = None  # (layout, future of the buffers)
        self._last_layout = None  # the last add_'s: the next step's is drawn for it

    def add_(self, accs: list, std: float) -> None:
        """acc += std * z for every accumulator, z the stream's next values (the ones drawn
        ahead when their layout is this step's, else drawn now)."""
        runs = list(noise_runs(accs, NOISE_CHUNK))
        layout = _layout(runs)
        ready = self._take_ahead(layout)
        for run, (sizes, dtype, device), z in zip(runs, layout, ready or [None] * len(runs)):
            if z is None:
                z = self._draw(sizes, dtype, device)
            torch._foreach_add_(run, [zi.view(t.shape) for zi, t in zip(z.split(sizes), run)], alpha=std)
        self._last_layout = layout

    def normal(self, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
        """numel N(0, 1) values of the stream, drawn now (after any draw in flight)."""
        self._wait()
        return self._draw([numel], dtype, device)

    def draw_ahead(self) -> None:
        """Start drawing the next step's values (prefetch only; the layout of the last add_)."""
        layout = self._last_layout
        if not self.prefetch or layout is None or self._pending is not None:
            return
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fxclip-noise")
            weakref.finalize(self, self._worker.shutdown, wait=False)
        self._pending = (layout, self._worker.submit(
            lambda: [self._draw(sizes, dtype, device) for sizes, dtype, device in layout]))

    def _take_ahead(self, layout: tuple) -> list | None:
        if self._pending is None:
            return None
        drawn_for, future = self._pending
        self._pending = None
        buffers = future.result()
        # another layout (a parameter's dtype changed, a gradient became non-contiguous): those
        # values are dropped and this step draws its own; the stream goes on from there
        return buffers if drawn_for == layout else None

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending[1].result()

    def _draw(self, sizes: list, dtype: torch.dtype, device) -> torch.Tensor:
        """N(0, 1) values in one flat buffer, each piece of `sizes` its own draw: the values of
        torch.randn(n) per piece."""
        if self.secure:
            return secure_normal((sum(sizes),)).to(device, dtype)
        z = torch.empty(sum(sizes), dtype=dtype,
                        device=device if self.generator is None else self.generator.device)
        for piece in z.split(sizes):
            piece.normal_(generator=self.generator)
        return z.to(device)


def _forked(generator: torch.Generator | None) -> torch.Generator:
    """A CPU generator of its own, seeded by one draw from `generator` (None: torch's global RNG),
    so that runs seeded the same draw the same noise."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator().manual_seed(seed)
