"""The Gaussian noise of the DP step: N(0, 1) values in a documented stream, drawn at the step or
one step ahead on a worker thread.

The stream: for each accumulator in optimizer order, one draw (torch.randn of the generator) per
NOISE_CHUNK piece of its flat values. Pieces are grouped into runs of at most NOISE_CHUNK values,
each drawn into one buffer and added by one fused op, so that (drawing at the step) at most
NOISE_CHUNK noise values exist beside the gradients. The grouping and that buffer are made once per
layout of the gradients and reused at every step: on a small model the Python around the draw
cost as much as the draw.

Drawing ahead (`prefetch=True`, CPU only): after a step, a worker thread draws the next step's
values while the caller loads data and runs forward and backward; the step then only adds them,
each run as soon as it is drawn.
torch's CPU generator is a Mersenne Twister that draws ~5 ns per value on one core, which for a
model of millions of parameters costs as much as its forward and backward: drawing ahead moves
that off the training thread onto an idle core. It holds one gradient-sized float buffer, and it
draws from its own generator, seeded once from the given one (or torch's global RNG): the loader
may share that generator, and two threads reading one generator would make the order of the
values depend on timing.

`philox=True` (DPOptimizer's noise_rng="philox", CPU) draws from fxclip.philox's counter-based
stream instead, keyed by one draw from the given generator: each accumulator at each step is its
own draw (numbered in optimizer order, on from the last step's), and at the step it is drawn and
added in one pass with no buffer, over torch's threads when there are many values. A value
depends only on (key, draw, index), so drawing ahead gives the same run as drawing at the step.
"""
from __future__ import annotations

import math
import os
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import philox as philox_stream

NOISE_CHUNK = 1 << 18  # noise values drawn at a time (1 MB in float32)
PARALLEL_ADD_VALUES = 1 << 20  # philox: fewer values are added on the step's thread alone


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
    for run in _plan_runs(accs, chunk):
        yield [_piece(accs, piece) for piece in run]


def _plan_runs(accs: list, chunk: int) -> list:
    """noise_runs as (accumulator index, flat start, flat stop) per piece; (i, None, None) is the
    whole accumulator."""
    runs, run, room, last = [], [], chunk, None
    for i, acc in enumerate(accs):
        n = acc.numel()
        whole = n <= chunk or not acc.is_contiguous()
        for start in (0,) if whole else range(0, n, chunk):
            size = n if whole else min(chunk, n - start)
            if size == 0:
                continue
            kind = (acc.dtype, acc.device)
            if run and (size > room or kind != last):
                runs.append(run)
                run, room = [], chunk
            run.append((i, None, None) if whole else (i, start, start + size))
            room -= size
            last = kind
    if run:
        runs.append(run)
    return runs


def _piece(accs: list, piece: tuple) -> torch.Tensor:
    i, start, stop = piece
    return accs[i] if start is None else accs[i].view(-1)[start:stop]


class _Plan:
    """How accumulators laid out one way are noised: the runs and what their draws depend on
    (`layout`: per run its pieces' sizes, dtype, device), cached per layout so that a step
    repeats no grouping work. Draws at the step reuse one buffer of the largest run (per dtype
    and device): at most NOISE_CHUNK values beside the gradients, allocated once."""

    def __init__(self, accs: list, chunk: int):
        self.runs = _plan_runs(accs, chunk)
        self.count = len(accs)
        self.shapes = [[_piece(accs, piece).shape for piece in run] for run in self.runs]
        self.layout = tuple((tuple(math.prod(s) for s in shapes), accs[run[0][0]].dtype, accs[run[0][0]].device)
                            for run, shapes in zip(self.runs, self.shapes))
        self._buffers = None  # per run: where its draw at the step goes

    def pieces(self, accs: list, run: int) -> list:
        return [_piece(accs, piece) for piece in self.runs[run]]

    def views(self, z: torch.Tensor, run: int) -> list:
        """z's pieces shaped like the run's pieces."""
        return [zi.view(shape) for zi, shape in zip(z.split(self.layout[run][0]), self.shapes[run])]

    def buffers(self, draw_device) -> list:
        """Per run, where a draw at the step goes: (the flat buffer to draw into; its pieces shaped
        like the run's pieces) in ONE buffer of the largest run's size, reused at every step; None
        for a run drawn on another device than its own (a CPU generator for accelerator
        gradients: drawn, then copied)."""
        if self._buffers is None:
            shared, self._buffers = {}, []
            largest = max(sum(sizes) for sizes, _, _ in self.layout)
            for run, (sizes, dtype, device) in enumerate(self.layout):
                if draw_device is not None and torch.device(draw_device) != device:
                    self._buffers.append(None)
                    continue
                if (dtype, device) not in shared:
                    shared[dtype, device] = torch.empty(largest, dtype=dtype, device=device)
                z = shared[dtype, device][:sum(sizes)]
                self._buffers.append((z, self.views(z, run)))
        return self._buffers


def _accumulators_key(accs: list, chunk: int) -> tuple:
    return chunk, tuple((t.shape, t.dtype, t.device, t.is_contiguous()) for t in accs)


class NoiseSource:
    """Where a DPOptimizer's N(0, 1) values come from (see the module docstring).

    Args:
        generator: torch.Generator of the stream; None: torch's global RNG.
        secure: draw from os.urandom instead (no generator).
        prefetch: draw the next step's values on a worker thread (CPU tensors only).
        philox: draw from fxclip.philox's counter-based stream (CPU), keyed by one draw from
            `generator`: each accumulator at each step is the stream's next draw.
    """

    def __init__(self, generator: torch.Generator | None, *, secure: bool, prefetch: bool,
                 philox: bool = False):
        self.secure = secure
        self.prefetch = prefetch
        self.generator = generator
        self.philox_key = None
        if philox:
            philox_stream.library()  # compiled now: a missing compiler shows at construction
            self.philox_key = _seed(generator)
            self._philox_draws = 0  # draws made so far: the next draw's number
        elif prefetch and not secure:
            self.generator = _forked(generator)
        self._worker = None
        self._pending = None  # (layout, per run the future of its values)
        self._last_plan = None  # the last add_'s: the next step's is drawn for its layout
        self._plans = {}  # accumulators' key -> _Plan
        self._adders = None  # (count, pool) of threads adding philox values (several torch threads)

    def add_(self, accs: list, std: float) -> None:
        """acc += std * z for every accumulator, z the stream's next values (the ones drawn
        ahead when their layout is this step's, else drawn now)."""
        if self.philox_key is not None and not self.prefetch:
            self._philox_add(accs, std)  # drawn and added in one pass: no plan, no buffer
            return
        key = _accumulators_key(accs, NOISE_CHUNK)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= 16:  # layouts that keep changing: keep no stale buffers
                self._plans.clear()
            plan = self._plans[key] = _Plan(accs, NOISE_CHUNK)
        self._last_plan = plan
        ready = self._take_ahead(plan.layout)
        if ready is None and self.philox_key is not None:
            self._philox_add(accs, std)
            return
        reusable = None if ready is not None else plan.buffers(self._draw_device())
        for run, (sizes, dtype, device) in enumerate(plan.layout):
            if ready is not None:
                z = plan.views(ready[run].result(), run)
            elif reusable[run] is not None:
                flat, z = reusable[run]
                self._fill(flat, sizes)
            else:
                z = plan.views(self._draw(sizes, dtype, device), run)
            torch._foreach_add_(plan.pieces(accs, run), z, alpha=std)

    def _philox_add(self, accs: list, std: float) -> None:
        """Each accumulator its own draw of the philox stream, drawn and added in one pass (no
        buffer). With several torch threads and many values, in NOISE_CHUNK pieces over that many
        threads (the C call releases the GIL): a counter-based stream gives the same values
        however a draw is split."""
        base = self._take_draws(len(accs))
        threads = torch.get_num_threads()
        if threads < 2 or sum(acc.numel() for acc in accs) < PARALLEL_ADD_VALUES:
            for i, acc in enumerate(accs):
                philox_stream.add_(acc, std, self.philox_key, base + i)
            return
        jobs = []
        for i, acc in enumerate(accs):
            if acc.is_contiguous() and acc.numel() > NOISE_CHUNK:
                flat = acc.view(-1)
                jobs += [(flat[start:start + NOISE_CHUNK], base + i, start)
                         for start in range(0, flat.numel(), NOISE_CHUNK)]
            else:
                jobs.append((acc, base + i, 0))
        if self._adders is None or self._adders[0] != threads:  # torch's thread count changed
            if self._adders is not None:
                self._adders[1].shutdown(wait=False)
            pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fxclip-noise-add")
            weakref.finalize(self, pool.shutdown, wait=False)
            self._adders = (threads, pool)
        list(self._adders[1].map(lambda job: philox_stream.add_(job[0], std, self.philox_key, job[1], job[2]), jobs))

    def _take_draws(self, count: int) -> int:
        """The philox stream's next `count` draw numbers: the first of them."""
        first = self._philox_draws
        self._philox_draws += count
        return first

    def _draw_device(self):
        """Where the stream's values are drawn: the generator's device (None: the tensors')."""
        if self.philox_key is not None:
            return torch.device("cpu")
        return None if self.generator is None or self.secure else self.generator.device

    def normal(self, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
        """numel N(0, 1) values of the stream, drawn now (after any draw in flight)."""
        self._wait()
        draws = None if self.philox_key is None else [(self._take_draws(1), 0)]
        return self._draw([numel], dtype, device, draws)

    def draw_ahead(self) -> None:
        """Start drawing the next step's values (prefetch only; the layout of the last add_)."""
        plan = self._last_plan
        if not self.prefetch or plan is None or self._pending is not None:
            return
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fxclip-noise")
            weakref.finalize(self, self._worker.shutdown, wait=False)
        # philox: each accumulator's piece is its draw from its start, numbered now, in order
        base = None if self.philox_key is None else self._take_draws(plan.count)
        draws = [None if base is None else [(base + i, start or 0) for i, start, _ in run] for run in plan.runs]
        # one job per run, in order: the step adds each run's values as soon as they are drawn,
        # while the worker draws the next run's
        self._pending = (plan.layout, [self._worker.submit(self._draw, *run, run_draws)
                                       for run, run_draws in zip(plan.layout, draws)])

    def _take_ahead(self, layout: tuple) -> list | None:
        """The futures of the values drawn ahead for `layout`, one per run; None when nothing
        was drawn ahead, or for another layout (a parameter's dtype changed, a gradient became
        non-contiguous): those values are dropped, this step draws its own and the stream goes
        on from there."""
        if self._pending is None:
            return None
        drawn_for, futures = self._pending
        if drawn_for != layout:
            self._wait()
            futures = None
        self._pending = None
        return futures

    def _wait(self) -> None:
        if self._pending is not None:
            for future in self._pending[1]:
                future.result()

    def _draw(self, sizes: list, dtype: torch.dtype, device, draws: list | None = None) -> torch.Tensor:
        """N(0, 1) values in one new flat buffer, each piece of `sizes` its own draw."""
        z = torch.empty(sum(sizes), dtype=dtype, device=self._draw_device() or device)
        self._fill(z, sizes, draws)
        return z.to(device)

    def _fill(self, z: torch.Tensor, sizes, draws: list | None = None) -> None:
        """Draws a run into its flat buffer z: one draw per piece of `sizes`, the values of
        torch.randn(n) (secure: os.urandom's); philox: per piece (draw number, first value)."""
        if self.philox_key is not None:
            for piece, (draw, first) in zip(z.split(sizes), draws):
                philox_stream.normal_(piece, self.philox_key, draw, first)
            return
        for piece in z.split(sizes):
            if self.secure:
                piece.copy_(secure_normal(piece.shape))
            else:
                piece.normal_(generator=self.generator)


def _seed(generator: torch.Generator | None) -> int:
    """One draw from `generator` (None: torch's global RNG): runs seeded the same draw the same noise."""
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def _forked(generator: torch.Generator | None) -> torch.Generator:
    """A CPU generator of its own, seeded by one draw from `generator`."""
    return torch.Generator().manual_seed(_seed(generator))
