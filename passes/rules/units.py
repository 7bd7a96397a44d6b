"""Privacy units: the squared norm of each UNIT's gradient, a unit being the rows that share a
privacy_unit id (a user's examples, a sample's augmented copies, a micro-batch).

A unit's gradient is g_u = sum_{i in u} g_i, so its squared norm has cross terms between its
rows and no per-row norm gives it. Each parameter's per-unit squared norm, one value per row
(every row of a unit holds its unit's value), comes from one of:
- Gram: a parameter whose per-sample gradients are dense factors G_i = a_i^T b_i (linear; uses
  of one weight stacked, as rules/shared.py does) gets
      ||g_u||^2 = sum_{i,j in u} <G_i, G_j> = sum_{i,j} M_ij sum_{t,s} (a_i a_j^T)_ts (b_i b_j^T)_ts
  with M the (B, B) same-unit mask: one Gram pair over all B*T rows, no per-sample gradient.
- instantiated: the per-sample gradients (B, *param) of every use, summed by unit with index_add,
  then the norm of each unit's sum. Any route can do it.
rules/cost.py prices both (unit_gram_cost against instantiate_cost); the cheaper is built.

Rows are grouped by `index`, (B,) int64: for a real row, the first real row of its unit; for a
padding row, itself (so padding never joins a real unit; its factor is 0 anyway). A row with an
inf/NaN gradient makes its own unit's norm non-finite (the whole unit then gets factor 0) and no
other unit's: the Gram pairs are masked with `where`, never multiplied by 0.

Reweighting needs nothing new: sum_i R_{u(i)} g_i is each route's own reweighting with the
per-row factors.
"""
from __future__ import annotations

import torch

from ..layout import size_hint
from ..numerics import upcast
from ..protocol import DeviceState
from . import cost
from .base import cat_slots


def unit_index(ids: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """(B,) int64: each real row's first real row with the same id; a padding row's own index.
    No torch.unique: its output size depends on the data, which a traced graph cannot hold."""
    rows = torch.arange(ids.shape[0], device=ids.device)
    real = rows < DeviceState.field(state, "valid_rows")
    same = (ids[:, None] == ids[None, :]) & real[None, :]
    first = same.to(torch.int32).argmax(1)  # argmax returns the FIRST maximal index
    return torch.where(real, first, rows)


def unit_sizes(index: torch.Tensor) -> torch.Tensor:
    """(B,) each row's unit size (padding rows: 1)."""
    ones = torch.ones(index.shape[0], dtype=torch.float32, device=index.device)
    return torch.zeros_like(ones).index_add(0, index, ones)[index]


def unit_norm_sq(routes: list, ctx, index):
    """(B,) node: each row's unit's squared gradient norm for one parameter (all its uses)."""
    factors = _dense_factors(routes, ctx)
    if factors is not None and _gram_is_cheaper(factors, ctx):
        a = ctx.builder.call(lambda *t: torch.cat(t, 1), *[f.a for f in factors])
        b = ctx.builder.call(lambda *t: torch.cat(t, 1), *[f.b for f in factors])
        rows = sum(_rows_of(f.a) for f in factors)
        _describe(routes, f"ghost Gram over the unit's rows ({rows} rows per sample)", instantiated=False)
        return ctx.builder.call(_gram_unit_norm_sq, a, b, index)
    _describe(routes, "instantiated per sample, summed by unit", instantiated=True)
    per_sample = [ctx.per_sample(r) for r in routes]
    return ctx.builder.call(_instantiated_unit_norm_sq, index, *per_sample)


def _dense_factors(routes, ctx):
    """Every use's ghost factors, when all are dense with one (rows, cols) shape; else None.
    Asked only of ghost routes: an instantiating route's per-sample gradients exist anyway."""
    if any(r.strategy != "ghost" for r in routes) or any(cat_slots(r.contribution) for r in routes):
        return None
    factors = [r.ghost_factors(ctx) for r in routes]
    if any(f is None or f.kind != "dense" or (f.rows, f.cols) != (factors[0].rows, factors[0].cols)
           for f in factors):
        return None
    return factors


def _gram_is_cheaper(factors, ctx) -> bool:
    rows = sum(_rows_of(f.a) for f in factors)
    m, k = factors[0].rows, factors[0].cols
    return cost.unit_gram_cost(ctx.batch_hint, rows, m, k)[2] <= cost.instantiate_cost(ctx.batch_hint, rows, m, k)[2]


def _rows_of(node) -> int:
    return size_hint(node.meta["val"].shape[1])


def _describe(routes, how: str, instantiated: bool) -> None:
    routes[0].shapes["unit norm"] = how
    for r in routes:
        r.unit_instantiated = instantiated


def _gram_unit_norm_sq(a, b, index):
    """a (B, T, m), b (B, T, k): per row, sum over j in its unit of <a_i^T b_i, a_j^T b_j>."""
    batch, rows = a.shape[0], a.shape[1]
    a, b = upcast(a).reshape(batch * rows, -1), upcast(b).reshape(batch * rows, -1)
    pairs = ((a @ a.T) * (b @ b.T)).reshape(batch, rows, batch, rows).sum((1, 3))
    same = index[:, None] == index[None, :]
    with_unit = torch.where(same, pairs, 0).sum(1)  # <G_i, g_u(i)>
    return torch.where(same, with_unit[None, :], 0).sum(1).clamp(min=0)  # sum over i in u; rounding may dip below 0


def _instantiated_unit_norm_sq(index, *per_sample):
    """Each use's (B, *shape) per-sample gradients summed (a shared parameter), then by unit."""
    batch = index.shape[0]
    total = sum(upcast(p).reshape(batch, -1) for p in per_sample)
    by_unit = torch.zeros_like(total).index_add(0, index, total)
    return by_unit.square().sum(1)[index]
