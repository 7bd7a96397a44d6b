"""Embeddings: a table gradient accumulated from per-token rows,
`_unsafe_masked_index_put_accumulate(zeros, mask, [ids], values)` (Inductor's decomposition),
`index_put(zeros, [ids], values, accumulate=True)` or `embedding_dense_backward`.

Per sample i with tokens t (ids_it, output-grad rows g_it, masked tokens such as padding_idx
contributing nothing) the gradient is sum_t e_{ids_it} g_it^T, so with static shapes only:
- ghost "gram":    ||grad_i||^2 = sum_{t,s} [ids_it == ids_is] <g_it, g_is>   (T x T per sample)
- ghost "segment": sort each sample's ids, sum the rows of equal ids into a (T, d) buffer at
                   their run index (a cumsum of "id changed"), square and sum: T d memory,
                   no T x T; chosen when T^2 > 4 T d (long sequences, narrow tables)
- reweighting: the same accumulation with values scaled by R per sample.
Ids without a batch (a positional table looked up with arange(T)) with values that are a sum
over the batch of a per-sample tensor (the gradient broadcast back) are un-summed first.
scale_grad_by_freq couples samples (counts over the batch) and is refused; sparse=True gives a
sparse gradient, which Dynamo/AOTAutograd do not trace (refused before this pass).
"""
from __future__ import annotations

import torch

from ..builder import run_node
from ..layout import Layout, reduced_dims, same_shape, size_hint
from ..numerics import upcast
from ..refusals import refusal
from ..viewops import MOVES_VALUES
from . import cost
from .base import Decline, InstantiatedRoute, is_zeros, normalized, replay, scale_by_sample, split_batch, weighted_sum
from .shared import Factors, orientation

aten = torch.ops.aten

# ops between a sum over the batch and the values it feeds (the gradient broadcast back)
_CHAIN = MOVES_VALUES | {aten.expand.default}


class _Source:
    """Where a root's values come from: batched (a layout) or a sum over the batch (un-summed)."""

    def __init__(self, values, layout=None, summed=None, chain=(), dims=(), keepdim=False):
        self.values, self.layout, self.summed, self.chain = values, layout, summed, list(chain)
        self.dims, self.keepdim = dims, keepdim


def _source(values, ctx):
    """The _Source of the values a table gradient accumulates, or a Decline."""
    lay = ctx.layouts.get(values)
    if isinstance(lay, Layout):
        if not lay.batch_major:
            return Decline("the values are not batch-major")
        return _Source(values, layout=normalized(lay))
    chain, node = [], values
    while node.op == "call_function" and node.target in _CHAIN and isinstance(node.args[0], type(node)):
        chain.insert(0, node)
        node = node.args[0]
    if node.target != aten.sum.dim_IntList:
        return Decline("the values are neither per sample nor a sum over the batch")
    y = node.args[0]
    ylay = ctx.layouts.get(y)
    dims, keepdim = reduced_dims(node)
    if not (isinstance(ylay, Layout) and ylay.batch_major and ylay.dim in dims):
        return Decline("the values are a sum that does not reduce a batch-major batch dim")
    return _Source(values, summed=(node, y, normalized(ylay)), chain=chain, dims=dims, keepdim=keepdim)


class EmbeddingRoute(InstantiatedRoute):
    def __init__(self, method, contribution, ids, ids_layout, mask, source, num_rows, padding_idx,
                 **kw):
        super().__init__("embedding", "instantiate" if method == "instantiate" else "ghost",
                         contribution, **kw)
        self.method = method  # "gram" | "segment" | "instantiate"
        self.ids, self.mask, self.source = ids, mask, source
        self.ids_layout = ids_layout  # how to split the ids per sample; None: shared by all
        self.num_rows, self.padding_idx = num_rows, padding_idx

    # --- traced helpers: per-sample (ids (B, T), rows (B, T, d)) with masked rows zeroed ---
    def _inputs(self, ctx):
        src = self.source
        base = [self.ids, self.mask if self.mask is not None else self.ids]
        return base + [src.summed[1] if src.summed else src.values, ctx.bref]

    def _per_sample_values(self, src, v, batch):
        if src.summed is None:
            return split_batch(v, src.layout, batch)  # (B, inner, ...) batch-major
        node, y, ylay = src.summed
        moved = [d + 1 for d in src.dims]
        per = split_batch(v, ylay, batch).sum(moved, keepdim=src.keepdim)
        return torch.vmap(lambda t: replay(src.chain, node, t))(per)

    def _rows(self, ctx):
        src, has_mask, pad = self.source, self.mask is not None, self.padding_idx
        ids_lay = self.ids_layout

        def fn(ids, mask, v, bref):
            batch = bref.shape[0]
            vals = self._per_sample_values(src, v, batch)
            d = vals.shape[-1]
            if isinstance(ids_lay, Layout):
                ids_b = split_batch(ids, ids_lay, batch).reshape(batch, -1)
            else:
                ids_b = ids.reshape(1, -1).expand(batch, -1)
            vals = vals.reshape(batch, -1, d)
            keep = torch.ones_like(ids_b, dtype=torch.bool)
            if has_mask:
                m = mask.reshape(mask.shape[:-1]) if mask.dim() == ids.dim() + 1 else mask
                m = m.expand(ids.shape)
                if isinstance(ids_lay, Layout):
                    m = split_batch(m, ids_lay, batch).reshape(batch, -1)
                else:
                    m = m.reshape(1, -1).expand(batch, -1)
                keep = keep & m
            if pad is not None:
                keep = keep & (ids_b != pad)
            vals = vals * keep.unsqueeze(-1).to(vals.dtype)
            ids_b = torch.where(keep, ids_b, torch.zeros_like(ids_b))
            return ids_b, vals

        return ctx.builder.call(fn, *self._inputs(ctx))

    def ghost_factors(self, ctx):
        if orientation(self.contribution.path, self.contribution.root) != "same":
            return None
        ids, vals = self._rows(ctx)
        d = size_hint(self.contribution.root.meta["val"].shape[1])
        return Factors("onehot", ids, vals, size_hint(self.num_rows), d)

    def norm_sq(self, ctx):
        if self.strategy == "instantiate":
            return super().norm_sq(ctx)
        ids, vals = self._rows(ctx)
        if self.method == "gram":
            return ctx.builder.call(_gram_norm_sq, ids, vals)
        return ctx.builder.call(_segment_norm_sq, ids, vals)

    def per_sample(self, ctx):
        ids, vals = self._rows(ctx)
        c, rows = self.contribution, self.num_rows

        def fn(ids, vals):
            def one(i, v):
                table = torch.zeros(rows, v.shape[-1], dtype=v.dtype, device=v.device)
                return replay(c.path, c.root, table.index_put((i,), v, accumulate=True))

            return torch.vmap(one)(ids, vals)

        return ctx.builder.call(fn, ids, vals)

    def reweighted(self, ctx, clip):
        if self.strategy == "instantiate":
            return super().reweighted(ctx, clip)
        c, src = self.contribution, self.source
        root = c.root
        others = [a for a in root.all_input_nodes if a is not src.values]

        def fn(v, r, *other_vals):
            if src.summed is None:
                new_values = scale_by_sample(v, src.layout, r)
            else:
                new_values = weighted_sum(self._per_sample_values(src, v, r.shape[0]), r)
            env = dict(zip(others, other_vals))
            env[src.values] = new_values.to(src.values.meta["val"].dtype)
            return replay(c.path, root, run_node(root, env))

        v = src.summed[1] if src.summed else src.values
        return ctx.builder.call(fn, v, clip, *others)


def _gram_norm_sq(ids, vals):
    vals = upcast(vals)
    same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(vals.dtype)
    return (same * torch.bmm(vals, vals.transpose(1, 2))).sum((1, 2))


def _segment_norm_sq(ids, vals):
    vals = upcast(vals)
    batch, T, d = vals.shape
    order = torch.argsort(ids, dim=1, stable=True)
    sorted_ids = torch.gather(ids, 1, order)
    rows = torch.gather(vals, 1, order.unsqueeze(-1).expand(batch, T, d))
    # no in-place writes in traced code: the joint graph is functional
    changed = torch.cat([torch.ones_like(sorted_ids[:, :1]),
                         (sorted_ids[:, 1:] != sorted_ids[:, :-1]).to(sorted_ids.dtype)], 1)
    run = changed.cumsum(1) - 1  # (B, T): the run (distinct id) each sorted token belongs to
    sums = torch.zeros_like(rows).scatter_add(1, run.unsqueeze(-1).expand(batch, T, d), rows)
    return sums.square().sum((1, 2))


def _parse(root):
    """(ids, mask, values, num_rows, padding_idx) of an embedding-gradient root, else a Decline."""
    if root.target == aten._unsafe_masked_index_put_accumulate.default:
        base, mask, indices, values = root.args[:4]
    elif root.target in (aten.index_put.default, aten._unsafe_index_put.default):
        base, indices, values = root.args[:3]
        accumulate = root.args[3] if len(root.args) > 3 else root.kwargs.get("accumulate", False)
        mask = None
        if not accumulate:
            return Decline("the index_put does not accumulate")
    elif root.target == aten.embedding_dense_backward.default:
        values, ids, num_rows, padding_idx, by_freq = root.args[:5]
        if by_freq:
            raise refusal("embedding-scale-grad-by-freq")
        return ids, None, values, num_rows, (padding_idx if padding_idx >= 0 else None)
    else:
        return Decline("the gradient is not an embedding backward", applies=False)
    if not (is_zeros(base) and len(indices) == 1 and indices[0] is not None):
        return Decline("the values are not accumulated into zeros with one index tensor")
    if base.meta["val"].dim() != 2:
        return Decline("the table is not 2-D")
    return indices[0], mask, values, base.meta["val"].shape[0], None


def choose(batch, T, d, rows):
    """(strategy, flops, bytes): gram T x T, segment sums, or instantiate the (rows, d) table."""
    return cost.choose_embedding(batch, T, d, rows)


def _plain_layout(layout):
    """A batch-major layout with plain int sizes (traced fns read them); others as they are."""
    return normalized(layout) if isinstance(layout, Layout) and layout.batch_major else layout


def match(contribution, ctx):
    parsed = _parse(contribution.root)
    if isinstance(parsed, Decline):
        return parsed
    ids, mask, values, num_rows, padding_idx = parsed
    if ids.meta["val"].dtype not in (torch.int64, torch.int32):
        return Decline("the ids are not integers")
    ids_lay = _plain_layout(ctx.layouts.get(ids))
    if ids in ctx.layouts and not (isinstance(ids_lay, Layout) and ids_lay.batch_major):
        return Decline("the ids are batched but not batch-major")
    if mask is not None and mask in ctx.layouts and _plain_layout(ctx.layouts.get(mask)) != ids_lay:
        return Decline("the mask and the ids are batched differently")
    src = _source(values, ctx)
    if isinstance(src, Decline):
        return src
    vshape = values.meta["val"].shape
    if src.summed is None:
        # values hold ids.shape + (d,) with the batch where the ids have it. Ids computed
        # without the batch but batch-shaped (arange(T).repeat(B, 1)) are split where the
        # values are: row r's gradient comes from the sample that owns row r.
        if ids_lay is None and same_shape(vshape[:-1], ids.meta["val"].shape):
            ids_lay = src.layout
        if not (isinstance(ids_lay, Layout) and src.layout == ids_lay):
            return Decline("the ids and the values are batched differently")
    elif isinstance(ids_lay, Layout):
        return Decline("the ids are batched but the values are summed over the batch")
    ids_shape = ids.meta["val"].shape
    if not same_shape(vshape[:-1], ids_shape) and not (src.summed and len(vshape) == len(ids_shape) + 1):
        return Decline("the values do not have the ids' shape plus one dim")
    batch = ctx.batch_hint
    T = size_hint(ids.meta["val"].numel()) // (batch if isinstance(ids_lay, Layout) else 1)
    d = size_hint(vshape[-1])
    method, flops, nbytes = choose(batch, T, d, size_hint(num_rows))
    shapes = {"B": str(ctx.batch_size), "T": str(T), "rows": str(num_rows), "d": str(d), "method": method}
    return EmbeddingRoute(method, contribution, ids, ids_lay, mask, src, num_rows, padding_idx, shapes=shapes,
                          extra_flops=flops, extra_bytes=nbytes)
