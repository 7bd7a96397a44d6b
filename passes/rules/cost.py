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

FLOPS_PER_BYTE = 16 is roughly the balance point of a CPU core or a GPU's memory system on these
small, bandwidth-bound ops. BATCHED_PENALTY = 2: a bmm of 16 per-sample (128 x 64)(64 x 128)
products took 3.5x the time of the one (128 x 1024)(1024 x 128) mm it replaces on a 2-core CPU
(float32), i.e. 2.5 mm-times extra; 2 leans towards instantiation for larger per-sample matrices,
which run closer to one mm's speed.
"""
from __future__ import annotations

from dataclasses import dataclass

FLOPS_PER_BYTE = 16
BATCHED_PENALTY = 2.0
FLOAT_BYTES = 4


@dataclass(frozen=True)
class Choice:
    strategy: str  # "ghost" | "instantiate"
    flops: int  # extra FLOPs of the chosen strategy
    held_bytes: int  # extra memory it holds until the clip factors exist
    ghost_cost: float  # both candidates' costs (bytes + flops / FLOPS_PER_BYTE), for explain
    inst_cost: float

    def as_tuple(self):
        return self.strategy, self.flops, self.held_bytes

    def describe(self) -> dict:
        """Entries for the route's `shapes` (shown by explain): both candidates' estimated costs."""
        return {"ghost cost": _mb(self.ghost_cost), "instantiate cost": _mb(self.inst_cost)}


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


def choose(batch: int, T: int, m: int, k: int, groups: int = 1) -> Choice:
    g_flops, g_held, g_cost = ghost_cost(batch, T, m, k, groups)
    i_flops, i_held, i_cost = instantiate_cost(batch, T, m, k, groups)
    if g_cost <= i_cost:
        return Choice("ghost", g_flops, g_held, g_cost, i_cost)
    return Choice("instantiate", i_flops, i_held, g_cost, i_cost)
