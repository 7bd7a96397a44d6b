"""Linear-like ops: a parameter gradient computed as mm(X, Y) contracting the batch rows.

Per sample i the contribution is X_i Y_i (X_i: m x T, Y_i: T x k, T rows per sample).
- ghost, T = 1:  ||X_i Y_i||^2 = ||x_i||^2 ||y_i||^2
- ghost, T > 1:  ||X_i Y_i||^2 = <X_i^T X_i, Y_i Y_i^T>   (two T x T Gram matrices)
- instantiate:   X_i Y_i as one bmm (replacing the weight-gradient mm), where rules/cost.py
                 prices it below the Grams
Reweighting scales one operand's rows by R: sum_i R_i X_i Y_i = mm(X * R, Y).
"""
from __future__ import annotations

import torch

from ..layout import Layout, known_equal, size_hint
from ..numerics import upcast
from ..viewops import RESHAPES, TRANSPOSES
from . import cost
from .base import (
    Decline,
    InstantiatedRoute,
    norm_sq_of,
    normalized,
    replay,
    scale_by_sample,
    split_batch,
    weighted_sum,
    zero_dropped,
)
from .shared import Factors, orientation

aten = torch.ops.aten


def _rows(x, layout: Layout, batch: int):
    """X with batch on `layout.dim` -> (B, T, other) float tensor of per-sample rows."""
    s = split_batch(x, layout, batch)  # (B, T, other) or (B, other, T)
    return s if layout.dim == 0 else s.transpose(1, 2)


def _sample_gram(x, layout: Layout, bref, one_row: bool):
    """Per-sample Gram matrices X_i X_i^T (B, T, T), float32 or wider; (B,) ||x_i||^2 for one row."""
    a = _rows(x, layout, bref.shape[0])
    a = upcast(a)
    if one_row:
        return a.square().sum((1, 2))
    return torch.bmm(a, a.transpose(1, 2))


def _gram_product(ga, gb):
    return ga * gb if ga.dim() == 1 else (ga * gb).sum((1, 2))


_VIEWS = RESHAPES | TRANSPOSES


def _structure(node):
    """A key equal for nodes that are the same views of the same tensor (each linear layer
    traces its own view and transpose of a shared input)."""
    if node.op == "call_function" and node.target in _VIEWS:
        return (node.target, _structure(node.args[0]), repr(node.args[1:]))
    return node


def _per_sample_products(x, y, lx: Layout, ly: Layout, batch: int):
    """(B, m, k): every sample's X_i Y_i, one bmm."""
    return torch.bmm(_rows(x, lx, batch).transpose(1, 2), _rows(y, ly, batch))


def _scale_x(x, y) -> bool:
    """Reweighting scales the smaller operand's rows."""
    return size_hint(x.meta["val"].numel()) <= size_hint(y.meta["val"].numel())


def _ghost_weighted(x, y, lx: Layout, ly: Layout, r, scale_x: bool):
    """sum_i R_i X_i Y_i as one mm on R-scaled rows."""
    if scale_x:
        x = scale_by_sample(x, lx, r)
        y = zero_dropped(y, ly, r)  # a sample with R = 0 may hold inf: 0 * inf in the mm is NaN
    else:
        y = scale_by_sample(y, ly, r)
        x = zero_dropped(x, lx, r)
    return torch.mm(x, y)


def _candidates(x, y, lx: Layout, ly: Layout, batch: int, one_row: bool) -> cost.Candidates:
    """Both strategies of one linear weight on random tensors of its shapes, for timing."""
    scale_x = _scale_x(x, y)
    vx, vy = x.meta["val"], y.meta["val"]

    def make_inputs():
        gen = cost.generator_for(vx.device)
        return (cost.random_like(vx, gen), cost.random_like(vy, gen),
                torch.empty(batch, device=vx.device), torch.rand(batch, generator=gen, device=vx.device))

    def ghost(x, y, bref, r):
        norms = _gram_product(_sample_gram(x, lx, bref, one_row), _sample_gram(y, ly, bref, one_row))
        return norms, _ghost_weighted(x, y, lx, ly, r, scale_x)

    def instantiate(x, y, bref, r):
        per = _per_sample_products(x, y, lx, ly, batch)
        return norm_sq_of(per), weighted_sum(per, r)

    key = ("linear", batch, str(lx), str(ly), one_row, *cost.values_key(vx, vy))
    return cost.Candidates(key, make_inputs, ghost, instantiate, cost.nbytes(vx) + cost.nbytes(vy))


class LinearRoute(InstantiatedRoute):
    def __init__(self, strategy, contribution, x, y, lx, ly, **kw):
        super().__init__("linear", strategy, contribution, **kw)
        self.x, self.y, self.lx, self.ly = x, y, lx, ly

    def per_sample(self, ctx):
        c, lx, ly = self.contribution, self.lx, self.ly

        def fn(x, y, bref):
            per = _per_sample_products(x, y, lx, ly, bref.shape[0])
            return torch.vmap(lambda v: replay(c.path, c.root, v))(per)

        return ctx.builder.call(fn, self.x, self.y, ctx.bref)

    def norm_sq(self, ctx):
        if self.strategy == "instantiate":
            return super().norm_sq(ctx)
        one_row = known_equal(self.lx.inner, 1) and known_equal(self.lx.outer, 1)
        grams = [self._gram(ctx, node, lay, one_row) for node, lay in ((self.x, self.lx), (self.y, self.ly))]
        return ctx.builder.call(_gram_product, *grams)

    @staticmethod
    def _gram(ctx, node, layout, one_row):
        """One Gram matrix per (tensor, layout): q, k and v projections of one input share it."""
        # a layout's sizes may be SymInts (dynamic batch), which do not hash: key on their text
        key = ("linear-gram", _structure(node), tuple(str(v) for v in (layout.dim, layout.outer, layout.inner)))
        return ctx.once(key, lambda: ctx.builder.call(
            lambda x, b: _sample_gram(x, layout, b, one_row), node, ctx.bref))

    def ghost_factors(self, ctx):
        """Per-sample G_i = X_i Y_i as rows (T, m) and (T, k), oriented like the parameter."""
        c, lx, ly = self.contribution, self.lx, self.ly
        way = orientation(c.path, c.root)
        if way is None:
            return None
        a, b = ctx.builder.call(lambda x, y, bref: (_rows(x, lx, bref.shape[0]),
                                                    _rows(y, ly, bref.shape[0])), self.x, self.y, ctx.bref)
        m, k = (size_hint(s) for s in c.root.meta["val"].shape)
        return Factors("dense", a, b, m, k) if way == "same" else Factors("dense", b, a, k, m)

    def reweighted(self, ctx, clip):
        if self.strategy == "instantiate":
            return super().reweighted(ctx, clip)
        c, lx, ly = self.contribution, self.lx, self.ly
        scale_x = _scale_x(self.x, self.y)
        return ctx.builder.call(lambda x, y, r: replay(c.path, c.root, _ghost_weighted(x, y, lx, ly, r, scale_x)),
                                self.x, self.y, clip)


def match(contribution, ctx):
    root = contribution.root
    if root.target != aten.mm.default:
        return Decline("the gradient is not computed by an mm", applies=False)
    x, y = root.args[:2]
    lx, ly = ctx.layouts.get(x), ctx.layouts.get(y)
    # an operand that holds no sample's data (a recurrence's zero initial state) splits its rows
    # like the other operand's: each sample's term still reads only its own rows
    if x not in ctx.layouts and isinstance(ly, Layout) and ly.dim == 0:
        lx = Layout(1, ly.outer, ly.inner)
    if y not in ctx.layouts and isinstance(lx, Layout) and lx.dim == 1:
        ly = Layout(0, lx.outer, lx.inner)
    if not (isinstance(lx, Layout) and isinstance(ly, Layout)):
        return Decline("an operand of the mm has no per-sample batch layout")
    if lx.dim != 1 or ly.dim != 0:
        return Decline("the batch is not on the contracted dim of the mm")
    lx, ly = normalized(lx), normalized(ly)
    if lx is None or ly is None:
        return Decline("the batch's row blocks have a symbolic count")
    if not (known_equal(lx.inner, ly.inner) and known_equal(lx.outer, ly.outer)):
        return Decline("the two operands of the mm split the batch into different rows")
    T = size_hint(lx.inner) * size_hint(lx.outer)  # rows per sample (outer > 1: sequence-first)
    m, k = size_hint(x.meta["val"].shape[0]), size_hint(y.meta["val"].shape[1])
    one_row = known_equal(lx.inner, 1) and known_equal(lx.outer, 1)
    choice = cost.choose(ctx.batch_hint, T, m, k,
                         candidates=_candidates(x, y, lx, ly, ctx.batch_hint, one_row))
    shapes = {"B": str(ctx.batch_size), "T": str(lx.inner), "m": str(m), "k": str(k), **choice.describe()}
    return LinearRoute(choice.strategy, contribution, x, y, lx, ly, shapes=shapes,
                       extra_flops=choice.flops, extra_bytes=choice.held_bytes)
