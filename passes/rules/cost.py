"""Ghost norms or instantiated per-sample gradients: the cost model of the matmul-like rules.

A weight gradient that contracts T rows per sample is, per sample i (and group), the product
G_i = X_i^T Y_i of (T x m) and (T x k) row blocks (linear: m, k = out, in features; conv: m = Cout/g,
k = Cin/g * kernel, T = output positions). Both strategies are priced as their EXTRA work over the
plain backward:
- ghost: the weight-gradient mm stays (on R-scaled rows of the smaller operand). Extra: two T x T
  Grams per sample (2 B T^2 (m + k) FLOPs; T = 1: the row norms, 2 B (m + k)), reading both
  operands again, and the R-scaled copy of the smaller operand.
- instantiate: the per-sample gradients (a bmm, 2 B T m k FLOPs) REPLACE the weight-gradient mm,
  since sum_i R_i G_i is their weighted sum. Extra: the bmm's loss of speed against one large mm
  (BATCHED_PENALTY x its FLOPs) and the B m k per-sample values, written once and read twice
  (squared norms, then the weighted sum), 2 B m k FLOPs.
cost = memory traffic in bytes + FLOPs / FLOPS_PER_BYTE; the cheaper strategy wins.

The model only orders candidates whose costs are far apart. Where they are within
MEASURE_WITHIN of each other (a bmm's speed against one mm's, cache effects, the device: the
estimate can be off by several times), both candidates' functions run on random tensors of the
layer's real shapes, dtype and device at compile time, and the faster one is taken, as Inductor's
autotuning picks kernels; results are cached per shape for the process. FXCLIP_STRATEGY=model
turns the measurement off (deterministic choices from the model alone).

FLOPS_PER_BYTE = 16 is roughly the balance point of a CPU core or a GPU's memory system on these
small, bandwidth-bound ops. BATCHED_PENALTY = 2: a bmm of 16 per-sample (128 x 64)(64 x 128)
products took 3.5x the time of the one (128 x 1024)(1024 x 128) mm it replaces on a 2-core CPU
(float32), i.e. 2.5 mm-times extra; 2 leans towards instantiation for larger per-sample matrices,
which run closer to one mm's speed.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import _torch
from ..layout import size_hint

FLOPS_PER_BYTE = 16
BATCHED_PENALTY = 2.0
FLOAT_BYTES = 4
MEASURE_WITHIN = 8.0  # measure when the model's two costs are within this factor
MEASURE_MAX_BYTES = 256 << 20  # never build larger per-sample or Gram tensors just to time them
ROUNDS = 4  # interleaved timing rounds per candidate; the first is a warm-up
HELD_PER_OPERAND_BYTE = 2  # instantiation may hold up to 2x the layer's activation + output gradient
BUDGET_S = 0.2  # per layer: no further rounds once the timed calls took this long


@dataclass(frozen=True)
class Choice:
    strategy: str  # "ghost" | "instantiate"
    flops: int  # extra FLOPs of the chosen strategy
    held_bytes: int  # extra memory it holds until the clip factors exist
    ghost_cost: float  # both candidates' costs (bytes + flops / FLOPS_PER_BYTE), for explain
    inst_cost: float
    measured: dict = field(default_factory=dict)  # strategy -> seconds, when timed

    def as_tuple(self):
        return self.strategy, self.flops, self.held_bytes

    def describe(self) -> dict:
        """Entries for the route's `shapes` (shown by explain): both candidates' estimated costs."""
        shown = {"ghost cost": _mb(self.ghost_cost), "instantiate cost": _mb(self.inst_cost)}
        for strategy, seconds in self.measured.items():
            shown[f"{strategy} time"] = f"{seconds * 1e6:.0f}us"
        shown["chosen by"] = "measured" if self.measured else "model"
        return shown


def _mb(cost: float) -> str:
    return f"{cost / 1e6:.3g}MB"  # bytes moved + FLOPs / FLOPS_PER_BYTE


def ghost_cost(batch: int, T: int, m: int, k: int, groups: int = 1) -> tuple[int, int, float]:
    """(extra FLOPs, held bytes, cost) of ghost norms for `groups` products per sample."""
    n = batch * groups
    if T == 1:
        flops = 2 * n * (m + k) + n
        held = FLOAT_BYTES * n * 2
    else:
        flops = 2 * n * T * T * (m + k) + 2 * n * T * T
        held = FLOAT_BYTES * n * 2 * T * T
    traffic = FLOAT_BYTES * n * (T * (m + k) + 2 * T * T + T * min(m, k))
    return flops, held, traffic + flops / FLOPS_PER_BYTE


def instantiate_cost(batch: int, T: int, m: int, k: int, groups: int = 1) -> tuple[int, int, float]:
    """(extra FLOPs, held bytes, cost) of instantiated per-sample gradients."""
    n = batch * groups
    flops = int(BATCHED_PENALTY * 2 * n * T * m * k) + 2 * n * m * k
    held = FLOAT_BYTES * n * m * k
    traffic = 3 * held
    return flops, held, traffic + flops / FLOPS_PER_BYTE


def unit_gram_cost(batch: int, T: int, m: int, k: int) -> tuple[int, int, float]:
    """(extra FLOPs, held bytes, cost) of a privacy unit's norm by Grams (rules/units.py): units
    are any rows of the batch, so the Grams pair ALL B*T rows, (B T)^2 (m + k) FLOPs, masked to
    the pairs within a unit; against instantiate_cost of the B per-sample (m x k) gradients."""
    n = batch * T
    flops = 2 * n * n * (m + k) + 2 * n * n
    held = FLOAT_BYTES * 2 * n * n
    traffic = FLOAT_BYTES * (n * (m + k) + 2 * n * n)
    return flops, held, traffic + flops / FLOPS_PER_BYTE


@dataclass
class Candidates:
    """Both strategies of one layer, runnable for timing: make_inputs() builds real tensors of
    the layer's shapes; each function takes them and does that strategy's work (norms and
    reweighted gradient)."""
    key: tuple  # everything the timing depends on (shapes, strides, dtype, device, options)
    make_inputs: Callable[[], tuple]
    ghost: Callable
    instantiate: Callable
    operand_bytes: int = 0  # the layer's activation and output gradient, held by the graph anyway


def choose(batch: int, T: int, m: int, k: int, groups: int = 1, candidates: Candidates | None = None) -> Choice:
    g_flops, g_held, g_cost = ghost_cost(batch, T, m, k, groups)
    i_flops, i_held, i_cost = instantiate_cost(batch, T, m, k, groups)
    measured = {}
    # every instantiated layer's per-sample gradients live until the clip factors exist: time
    # instantiation only where they stay within twice what the layer holds anyway
    if (candidates is not None and i_held <= HELD_PER_OPERAND_BYTE * candidates.operand_bytes
            and _worth_measuring(g_cost, i_cost, max(g_held, i_held))):
        measured = measure(candidates)
    if measured:
        ghost = measured["ghost"] <= measured["instantiate"]
    else:
        ghost = g_cost <= i_cost
    if ghost:
        return Choice("ghost", g_flops, g_held, g_cost, i_cost, measured)
    return Choice("instantiate", i_flops, i_held, g_cost, i_cost, measured)


def embedding_costs(batch: int, T: int, d: int, rows: int) -> dict[str, tuple[int, int]]:
    """{method: (extra FLOPs, held bytes)} of an embedding table's per-sample norms, T tokens of
    width d per sample: "gram" (T x T id matches and row products), "segment" (sums of the rows
    of equal ids, T d memory) or "instantiate" (the (rows, d) table per sample)."""
    return {"gram": (2 * batch * T * T * (d + 1), FLOAT_BYTES * batch * T * T * 2),
            "segment": (batch * T * (d * 4 + 16), FLOAT_BYTES * batch * T * d * 3),
            "instantiate": (2 * batch * T * d, FLOAT_BYTES * batch * rows * d)}


def choose_embedding(batch: int, T: int, d: int, rows: int) -> tuple[str, int, int]:
    """(method, extra FLOPs, held bytes) of the cheapest of embedding_costs (no timing)."""
    costs = embedding_costs(batch, T, d, rows)
    best = min(costs, key=lambda k: costs[k][1] + costs[k][0] / FLOPS_PER_BYTE)
    return best, *costs[best]


def stacked_uses_ghost(T: int, m: int, k: int) -> bool:
    """For the uses of one shared weight stacked into one (T rows, m x k) product per sample:
    True when its T x T Grams cost no more than instantiating the m x k product."""
    return T * T * (m + k) <= T * m * k


def _worth_measuring(g_cost: float, i_cost: float, held: int) -> bool:
    if os.environ.get("FXCLIP_STRATEGY", "measure") == "model":
        return False
    return held <= MEASURE_MAX_BYTES and max(g_cost, i_cost) <= MEASURE_WITHIN * min(g_cost, i_cost)


_measured: dict[tuple, dict] = {}


def measure(candidates: Candidates) -> dict:
    """{strategy: seconds} (min over timed rounds), cached by key; {} where the layer cannot be
    run here (a meta or fake device, an error, symbolic strides): the model decides then."""
    if candidates.key not in _measured:
        _measured[candidates.key] = _time_candidates(candidates)
    return _measured[candidates.key]


def _time_candidates(candidates: Candidates) -> dict:
    fns = {"ghost": candidates.ghost, "instantiate": candidates.instantiate}
    times = {name: [] for name in fns}
    try:
        with _torch.real_tensors():
            inputs = candidates.make_inputs()
            if any(t.device.type == "meta" for t in inputs if isinstance(t, torch.Tensor)):
                return {}
            spent = 0.0
            for _ in range(ROUNDS):
                for name, fn in fns.items():
                    times[name].append(_time_once(fn, inputs))
                spent += sum(ts[-1] for ts in times.values())
                if spent > BUDGET_S:
                    break
    except Exception:  # timing is an optimization: never let it break a compile
        return {}
    return {name: min(ts[1:] or ts) for name, ts in times.items()}


def _time_once(fn, inputs) -> float:
    device = next(t.device for t in inputs if isinstance(t, torch.Tensor))
    _synchronize(device)
    start = time.perf_counter()
    fn(*inputs)
    _synchronize(device)
    return time.perf_counter() - start


def _synchronize(device) -> None:
    if device.type != "cpu":
        getattr(torch, device.type).synchronize(device)


def random_like(value, generator: torch.Generator) -> torch.Tensor:
    """A real tensor with `value`'s (hinted) shape, strides, dtype and device, filled from
    `generator` (so timing never moves the user's random streams)."""
    shape = [size_hint(s) for s in value.shape]
    stride = [size_hint(s) for s in value.stride()]
    if any(st == 0 for st, n in zip(stride, shape) if n > 1):  # an expanded view: time a dense copy
        stride = torch.empty(shape, device="meta").stride()
    out = torch.empty_strided(shape, stride, dtype=value.dtype, device=value.device)
    if out.is_floating_point():
        return out.normal_(generator=generator)
    return out.random_(0, 2, generator=generator)


def nbytes(value) -> int:
    """Bytes of a (fake) tensor, symbolic sizes at their hints."""
    return size_hint(value.numel()) * value.element_size()


def values_key(*values) -> tuple:
    """What a timing depends on in these values: dtype, device, shapes and strides (symbolic
    sizes as text: they do not hash)."""
    return tuple((v.dtype, str(v.device), tuple(map(str, v.shape)), tuple(map(str, v.stride()))) for v in values)


def generator_for(device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(0)
