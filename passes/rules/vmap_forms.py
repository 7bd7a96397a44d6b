"""Forms of backward ops that the fallback replays under vmap in place of the op itself: the
same values, computed in a way that vmap batches.

VMAP_FORMS: ops whose batching rule fails on arguments the graph holds. SYMBOLIC_BATCH_FORMS
adds ops whose batching rule needs the batch size as a number (a grouped convolution with
groups = B * groups, or a loop over the batch for ops without a batching rule): with a symbolic
batch size, tracing them would specialize it, a recompile for every size until Dynamo's
recompile limit refuses the model a few Poisson steps in.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .conv import unfolded_weight_grad

aten = torch.ops.aten


# --- ops whose vmap batching rule fails on arguments the graph holds: replayed in a form that
# vmaps (the same values). slice_scatter's fails on unnormalized bounds (x[..., n:] ends at
# INT64_MAX, x[:, :-1] at -1, steps > 1); as_strided_scatter has none. (Audited: select,
# select_scatter, slice, narrow, diagonal_scatter, index_put, unfold, constant_pad_nd, roll and
# the embedding backward ops batch as they are.)

def _min(a, b):
    return min(a, b) if isinstance(a, int) and isinstance(b, int) else torch.sym_min(a, b)


def _max(a, b):
    return max(a, b) if isinstance(a, int) and isinstance(b, int) else torch.sym_max(a, b)


def _bounds(size, start, end):
    """Slice bounds (None, negative, or past the end) as 0 <= start <= end <= size."""
    start = 0 if start is None else start + size if isinstance(start, int) and start < 0 else start
    end = size if end is None else end + size if isinstance(end, int) and end < 0 else end
    start = _min(_max(start, 0), size)
    return start, _max(_min(end, size), start)


def _slice_scatter(base, src, dim=0, start=None, end=None, step=1):
    dim = dim % base.dim()
    size = base.shape[dim]
    start, end = _bounds(size, start, end)
    if step != 1:
        return aten.slice_scatter.default(base, src, dim, start, end, step)
    # src padded to base's size where start <= i < end, else base: the batching rules of
    # slice_scatter and cat both specialize a symbolic batch size
    i = torch.arange(size, device=base.device).reshape([-1] + [1] * (base.dim() - 1 - dim))
    padded = F.pad(src, [0, 0] * (base.dim() - 1 - dim) + [start, size - end])
    return torch.where((i >= start) & (i < end), padded, base)


def _as_strided_scatter(base, src, size, stride, storage_offset=None):
    """src written where base.as_strided(size, stride, offset) looks (base contiguous, as
    functionalization makes it): an index_put of src at those flat positions."""
    flat = torch.arange(base.numel(), device=base.device).reshape(base.shape)
    positions = aten.as_strided.default(flat, size, stride, storage_offset or 0).reshape(-1)
    out = base.reshape(-1).index_put((positions,), src.reshape(-1))
    return out.reshape(base.shape)


class _RowsApart(torch.autograd.Function):
    """fn(*tensors) for a fn that treats the rows (dim 0) of the tensors flagged in `rows` one by
    one and returns one row per input row; the other tensors are shared by every row. Under
    vmap, the vmapped dim is merged into the rows: one call of fn on lanes * N rows, with no
    batching rule that needs the batch size as a number."""

    @staticmethod
    def forward(fn, rows, *tensors):
        return fn(*tensors)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def vmap(info, in_dims, fn, rows, *tensors):
        dims = in_dims[2:]
        if any(d is not None and not r for d, r in zip(dims, rows)):  # a vmapped shared tensor
            return torch.vmap(fn, in_dims=dims)(*tensors), 0
        # sizes read off the tensors: info.batch_size is a number even where the size is symbolic
        lanes = next(t.shape[d] for t, d in zip(tensors, dims) if d is not None)
        n = next(t.shape[1 if d == 0 else 0] for t, d, r in zip(tensors, dims, rows) if r)
        merged = [t if not r else (t.movedim(d, 0) if d is not None else t.expand(lanes, *t.shape)).flatten(0, 1)
                  for t, d, r in zip(tensors, dims, rows)]
        return _unmerge(fn(*merged), lanes, n), 0


def _unmerge(out, lanes, n):
    if isinstance(out, torch.Tensor):
        return out.unflatten(0, (lanes, n))
    return tuple(_unmerge(o, lanes, n) for o in out)


def _rows_apart(fn, rows, *tensors):
    return _RowsApart.apply(fn, rows, *tensors)


def _convolution_backward(grad_out, x, weight, bias_sizes, stride, padding, dilation, transposed,
                          output_padding, groups, output_mask):
    """convolution_backward, whose batching rule needs the batch size as a number: the input
    gradient with the vmapped dim merged into the rows, the weight gradient from unfolded rows
    (it sums over the rows), the bias gradient as a sum."""
    def input_grad(go, x, w):
        return aten.convolution_backward.default(go, x, w, None, stride, padding, dilation, transposed,
                                                 output_padding, groups, [True, False, False])[0]

    conv = dict(stride=stride, padding=padding, dilation=dilation, transposed=transposed, groups=groups)
    return (_rows_apart(input_grad, (True, True, False), grad_out, x, weight) if output_mask[0] else None,
            unfolded_weight_grad(grad_out, x, tuple(weight.shape), conv)[0] if output_mask[1] else None,
            grad_out.sum([0, *range(2, grad_out.dim())]) if output_mask[2] else None)


def _flash_attention_cpu_backward(grad_out, query, key, value, out, logsumexp, dropout_p, is_causal,
                                  attn_mask=None, scale=None):
    """The CPU flash attention backward (no batching rule: a loop over the batch), with the
    vmapped dim merged into the rows; a mask with one row for all is shared."""
    def backward(*tensors):
        go, q, k, v, o, lse, *mask = tensors
        return aten._scaled_dot_product_flash_attention_for_cpu_backward.default(
            go, q, k, v, o, lse, dropout_p, is_causal, attn_mask=mask[0] if mask else None, scale=scale)

    tensors = (grad_out, query, key, value, out, logsumexp) + ((attn_mask,) if attn_mask is not None else ())
    rows = (True,) * 6 + ((not statically_known_true(attn_mask.shape[0] == 1),) if attn_mask is not None else ())
    return _rows_apart(backward, rows, *tensors)


def _weight_norm_backward(grad_w, v, g, norms, dim):
    """weight_norm's backward (no batching rule: a loop over the batch) from its formula: with
    w = g * v / n, n = ||v|| over every dim but `dim`: grad_g = <grad_w, v> / n and
    grad_v = g / n * (grad_w - v * grad_g / n)."""
    others = [d for d in range(v.dim()) if d != dim % v.dim()]
    grad_g = (grad_w * v).sum(others, keepdim=True) / norms
    return g / norms * (grad_w - v * grad_g / norms), grad_g.reshape(g.shape)


def _cat(tensors, dim=0):
    """cat as a sum of the pieces, each zero-padded to its place (cat's batching rule needs
    every size as a number)."""
    dim = dim % tensors[0].dim()
    total = sum(t.shape[dim] for t in tensors)
    out, before = 0, 0
    for t in tensors:
        after = total - before - t.shape[dim]
        out = out + F.pad(t, [0, 0] * (t.dim() - 1 - dim) + [before, after])
        before = before + t.shape[dim]
    return out


def _fma(a, b, c):
    """prims.fma (Inductor's softmax backward; no batching rule: a loop over the batch) as
    c + a * b, rounded twice instead of once."""
    return torch.addcmul(c, a, b)


def _scatter_add(base, dim, index, src):
    """scatter_add along a dim other than the rows: each row of base takes values from the same
    row of src only, so the vmapped dim is merged into the rows (its batching rule needs every
    size as a number)."""
    rows = base.shape[0]
    if dim % base.dim() == 0 or not all(statically_known_true(t.shape[0] == rows) for t in (index, src)):
        return aten.scatter_add.default(base, dim, index, src)
    return _rows_apart(lambda b, i, s: aten.scatter_add.default(b, dim, i, s), (True,) * 3, base, index, src)


VMAP_FORMS = {
    aten.slice_scatter.default: _slice_scatter,
    aten.as_strided_scatter.default: _as_strided_scatter,
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default: _flash_attention_cpu_backward,
    aten._weight_norm_interface_backward.default: _weight_norm_backward,
    torch.ops.prims.fma.default: _fma,
}
# with a static batch size, the grouped convolution is kept: unfolded rows take more memory
SYMBOLIC_BATCH_FORMS = {**VMAP_FORMS, aten.convolution_backward.default: _convolution_backward,
                        aten.cat.default: _cat, aten.scatter_add.default: _scatter_add}
