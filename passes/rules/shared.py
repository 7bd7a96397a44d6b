"""Shared (tied, reused) parameters: the exact norm of a parameter's TOTAL per-sample gradient.

A parameter used by several ops gets one gradient contribution per use (stages/routing.py splits
the top-level sum). With G_i = sum_k G_ik,

    ||G_i||^2 = sum_k ||G_ik||^2 + 2 sum_{k<l} <G_ik, G_il>

Each own term comes from its route (ghost or instantiated). A cross term comes from ghost
factors when both routes provide them (Route.ghost_factors), so no (B, *param.shape) tensor is
ever built for, e.g., a tied embedding / LM head; otherwise from the two per-sample gradients.

Ghost factors describe G_i viewed as a (rows, cols) matrix in the parameter's row-major order:
- Factors("dense", a, b):  G_i = a_i^T b_i, a (B, T, rows), b (B, T, cols)   (linear: T rows)
- Factors("onehot", ids, b): G_i = sum_t e_{ids_it} b_it^T, ids (B, T) int, b (B, T, cols)
  (embedding; masked tokens carry b = 0)
Cross terms (all per sample, T1 x T2 intermediates only):
- dense/dense:   sum_{t,s} (a1 a2^T)_ts (b1 b2^T)_ts
- onehot/dense:  sum_{t,s} a2[s, ids_t] <b1_t, b2_s>   (a gather of the dense rows at the ids,
                 as in Phantom Clipping: ids, activations and output grads only)
- onehot/onehot: sum_{t,s} [ids1_t == ids2_s] <b1_t, b2_s>
Reweighting needs nothing new: sum_i R_i G_i = sum_k (sum_i R_i G_ik), each route's own.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..layout import size_hint
from ..numerics import upcast
from ..viewops import COPIES, RESHAPES, SQUEEZES, TRANSPOSES
from . import cost
from .base import cat_slots

aten = torch.ops.aten


@dataclass
class Factors:
    kind: str  # "dense" | "onehot"
    a: fx.Node
    b: fx.Node
    rows: int
    cols: int


_IDENTITY_OPS = COPIES | {aten.add.Tensor}  # an add on the path passes one term through


def _shape(node):
    return tuple(node.meta["val"].shape)


def orientation(path, root) -> str | None:
    """How `path` (layout ops) maps the 2-D `root` value (m, k) onto the parameter:
    "same" (parameter = (m, k) in row-major order), "transposed" ((k, m)), None (other)."""
    swapped, reshaped = False, False
    prev = _shape(root)
    if len(prev) != 2:
        return None
    for node in path:
        out = _shape(node)
        if node.target in _IDENTITY_OPS:
            pass
        elif node.target in RESHAPES or node.target in SQUEEZES:
            if out != prev:
                if swapped:
                    return None  # a reshape of a transposed matrix: not a plain transpose
                reshaped = True
        elif node.target in TRANSPOSES:
            if reshaped or len(out) != 2:
                return None
            if node.target == aten.permute.default:
                perm = [p % 2 for p in node.args[1]]
                swapped ^= perm == [1, 0]
            elif node.target == aten.t.default:
                swapped = not swapped
            else:
                d0, d1 = node.args[1] % 2, node.args[2] % 2
                swapped ^= d0 != d1
        else:
            return None
        prev = out
    return "transposed" if swapped else "same"


def _dense_dense(a1, b1, a2, b2):
    a1, b1, a2, b2 = map(upcast, (a1, b1, a2, b2))
    return (torch.bmm(a1, a2.transpose(1, 2)) * torch.bmm(b1, b2.transpose(1, 2))).sum((1, 2))


def _onehot_dense(ids, b1, a2, b2):
    # a2[s, ids_t] for every (s, t): (B, T2, T1)
    b1, a2, b2 = map(upcast, (b1, a2, b2))
    picked = torch.gather(a2, 2, ids.unsqueeze(1).expand(ids.shape[0], a2.shape[1], ids.shape[1]))
    return (picked * torch.bmm(b2, b1.transpose(1, 2))).sum((1, 2))


def _onehot_onehot(ids1, b1, ids2, b2):
    b1, b2 = upcast(b1), upcast(b2)
    same = (ids1.unsqueeze(2) == ids2.unsqueeze(1)).to(b1.dtype)
    return (same * torch.bmm(b1, b2.transpose(1, 2))).sum((1, 2))


def _cross(builder, f1: Factors, f2: Factors):
    if f1.kind == "dense" and f2.kind == "dense":
        return builder.call(_dense_dense, f1.a, f1.b, f2.a, f2.b)
    if f1.kind == "onehot" and f2.kind == "onehot":
        return builder.call(_onehot_onehot, f1.a, f1.b, f2.a, f2.b)
    if f1.kind == "dense":
        f1, f2 = f2, f1
    return builder.call(_onehot_dense, f1.a, f1.b, f2.a, f2.b)


def _dot(p1, p2):
    p1, p2 = upcast(p1), upcast(p2)
    return (p1.reshape(p1.shape[0], -1) * p2.reshape(p2.shape[0], -1)).sum(1)


def _stacked_gram(a, b):
    a, b = upcast(a), upcast(b)
    return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(b, b.transpose(1, 2))).sum((1, 2))


def _stacked_instantiated(a, b):
    return torch.bmm(upcast(a).transpose(1, 2), upcast(b)).square().sum((1, 2))


def _stacked_norm_sq(routes, factors, ctx):
    """Every use dense with one (rows, cols) shape (a recurrent cell's weight at each step, a
    layer shared across depth): G_i = sum_k a_ik^T b_ik = A_i^T B_i with the uses' rows stacked,
    so ONE linear op over sum_k T_k rows gives the norm, by its Gram matrices or by
    instantiating A_i^T B_i, whichever the shapes make cheaper; no k^2 cross terms. Returns
    None where the uses don't qualify."""
    if any(f is None or f.kind != "dense" or (f.rows, f.cols) != (factors[0].rows, factors[0].cols)
           for f in factors) or any(cat_slots(r.contribution) for r in routes):
        return None
    rows = sum(_rows_of(f.a) for f in factors)
    m, k = factors[0].rows, factors[0].cols
    ghost = cost.stacked_uses_ghost(rows, m, k)
    a = ctx.builder.call(lambda *t: torch.cat(t, 1), *[f.a for f in factors])
    b = ctx.builder.call(lambda *t: torch.cat(t, 1), *[f.b for f in factors])
    for r in routes:
        r.cross_instantiated = not ghost
    routes[0].shapes["uses"] = (f"{len(routes)} stacked: one {'Gram' if ghost else 'per-sample bmm'} "
                                f"over {rows} rows")
    return ctx.builder.call(_stacked_gram if ghost else _stacked_instantiated, a, b)


def _rows_of(node) -> int:
    return size_hint(node.meta["val"].shape[1])


def shared_norm_sq(routes, ctx):
    """(B,) squared norms of the total per-sample gradient of a parameter with several uses."""
    b = ctx.builder
    factors = [r.ghost_factors(ctx) for r in routes]
    stacked = _stacked_norm_sq(routes, factors, ctx)
    if stacked is not None:
        return stacked
    terms = [r.norm_sq(ctx) for r in routes]
    slots = [cat_slots(r.contribution) for r in routes]
    for k in range(len(routes)):
        for j in range(k + 1, len(routes)):
            if any(slots[j].get(cat, part) is not part for cat, part in slots[k].items()):
                continue  # different slices of one cat: disjoint, no cross term
            fk, fj = factors[k], factors[j]
            ghost_pair = "ghost" in (routes[k].strategy, routes[j].strategy)
            if fk is not None and fj is not None and ghost_pair and (fk.rows, fk.cols) == (fj.rows, fj.cols):
                terms.append(_cross(b, fk, fj))
            else:
                for r in (routes[k], routes[j]):
                    r.cross_instantiated = True
                terms.append(b.call(_dot, ctx.per_sample(routes[k]), ctx.per_sample(routes[j])))
    n_own = len(routes)

    def total(*ts):
        own = sum(upcast(t) for t in ts[:n_own])
        cross = sum(upcast(t) for t in ts[n_own:])
        return (own + 2 * cross).clamp(min=0)  # >= 0 exactly; rounding may dip below

    return b.call(total, *terms)


def shared_reweighted(routes, ctx, clip):
    """sum_i R_i G_i for a shared parameter: the sum of every use's reweighted gradient."""
    parts = [r.reweighted(ctx, clip) for r in routes]

    def total(*ps):
        out = ps[0]
        for p in ps[1:]:
            out = out + p.to(out.dtype).reshape(out.shape)
        return out

    return ctx.builder.call(total, *parts)


def strategy_of(routes) -> str:
    """"ghost" when every use, every cross term and (privacy units) the unit norm of a parameter
    avoided per-sample gradients."""
    if all(r.strategy == "ghost" and not getattr(r, "cross_instantiated", False)
           and not getattr(r, "unit_instantiated", False) for r in routes):
        return "ghost"
    return "instantiate"
