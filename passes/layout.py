"""Where the batch lives in every tensor of the joint graph.

A Layout says: dimension `dim` of this tensor has size outer * B * inner, and sample b owns the
index range (o * B + b) * inner + [0, inner) for each o < outer. Plain (B, ...) tensors are
Layout(0, 1, 1); a (B*T, d) view of a (B, T, d) tensor is Layout(0, 1, T).

Forward tensors start from the marked model inputs, backward tensors from the tangents (model
outputs carry the batch in dim 0). MIXED marks a tensor in which samples were combined (a
reduction or contraction over the batch); UNKNOWN marks an op this analysis has no rule for.
Rules use layouts to find per-sample structure; an UNKNOWN only makes them decline.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten

SHAPE_OPS = {aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default,
             aten.sym_storage_offset.default}


@dataclass(frozen=True)
class Layout:
    dim: int
    outer: object = 1  # int or SymInt
    inner: object = 1

    @property
    def batch_major(self) -> bool:
        return known_equal(self.outer, 1)


class _Mark:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


MIXED = _Mark("MIXED")
UNKNOWN = _Mark("UNKNOWN")


def known_equal(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return statically_known_true(a == b)


def size_hint(x) -> int:
    """A concrete value for a (possibly symbolic) size, for cost estimates only: never a guard."""
    if isinstance(x, int):
        return x
    hint = x.node.hint
    return int(hint) if hint is not None else 8


def same_shape(a, b) -> bool:
    """Shape equality that never installs a guard on symbolic sizes."""
    return len(a) == len(b) and all(known_equal(x, y) for x, y in zip(a, b))


def exact_div(a, b):
    """a / b when b divides a for every value of the symbols, else None."""
    if isinstance(a, int) and isinstance(b, int):
        return a // b if b and a % b == 0 else None
    q = a // b
    return q if statically_known_true(q * b == a) else None


def _prod(xs):
    return math.prod(xs) if all(isinstance(x, int) for x in xs) else _sym_prod(xs)


def _sym_prod(xs):
    out = 1
    for x in xs:
        out = out * x
    return out


def fits(lay, shape, B) -> bool:
    """Whether a tensor of `shape` can carry the batch as `lay` says."""
    return (shape is not None and lay.dim < len(shape)
            and known_equal(shape[lay.dim], lay.outer * B * lay.inner))


def _shape(node):
    v = node.meta.get("val")
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


LAYOUT_RULES: dict = {}


def layout_rule(*targets):
    def register(fn):
        for t in targets:
            LAYOUT_RULES[t] = fn
        return fn

    return register


def analyze(graph: fx.Graph, batched: dict[fx.Node, Layout], batch_size) -> dict:
    """Layouts of every node reachable from the `batched` seeds; others are absent (no batch)."""
    layouts: dict = dict(batched)
    for node in graph.nodes:
        if node in layouts or node.op != "call_function" or node.target in SHAPE_OPS:
            continue  # sizes of a batched tensor carry no sample's values
        inputs = [a for a in node.all_input_nodes if a in layouts]
        if not inputs:
            continue
        if any(layouts[a] is MIXED for a in inputs):
            layouts[node] = MIXED
            continue
        if any(layouts[a] is UNKNOWN for a in inputs):
            layouts[node] = UNKNOWN
            continue
        rule = LAYOUT_RULES.get(node.target) or _pointwise_rule(node)
        out = rule(node, layouts, batch_size) if rule else UNKNOWN
        if out is NO_BATCH:
            continue  # e.g. an unused output of a multi-output op
        layouts[node] = UNKNOWN if out is None else out
    return layouts


def _pointwise_rule(node):
    target = node.target
    if isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
        return _broadcast
    return None


def _broadcast(node, layouts, B):
    out_shape = _shape(node)
    if out_shape is None:
        return None
    result = None
    for a in node.all_input_nodes:
        lay = layouts.get(a)
        if lay is None:
            continue
        in_shape = _shape(a)
        d = lay.dim + len(out_shape) - len(in_shape)
        if not known_equal(out_shape[d], in_shape[lay.dim]):
            return None  # the batch dim was broadcast: not a per-sample op
        cand = Layout(d, lay.outer, lay.inner)
        if result is not None and result != cand:
            return None
        result = cand
    return result


layout_rule(aten.where.self, aten.clone.default, aten.alias.default, aten._to_copy.default,
            aten.copy.default, aten.masked_fill.Scalar, aten.masked_fill.Tensor,
            aten.native_dropout_backward.default, aten.threshold_backward.default,
            aten.gelu_backward.default, aten.silu_backward.default, aten.sigmoid_backward.default,
            aten.tanh_backward.default, aten.lift_fresh_copy.default,
            torch.ops.prims.convert_element_type.default)(_broadcast)


@layout_rule(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _view(node, layouts, B):
    lay = layouts[node.args[0]]
    in_shape, out_shape = _shape(node.args[0]), _shape(node)
    # flat index = (p * B + b) * Q + q: find the output dim whose index range holds the B digit
    Q = _prod(in_shape[lay.dim + 1:]) * lay.inner
    below = 1
    for k in range(len(out_shape) - 1, -1, -1):
        inner = exact_div(Q, below)
        if inner is not None:
            outer = exact_div(below * out_shape[k], Q * B)
            if outer is not None:
                return Layout(k, outer, inner)
        below = below * out_shape[k]
    return None


@layout_rule(aten.permute.default)
def _permute(node, layouts, B):
    lay = layouts[node.args[0]]
    perm = [p % len(_shape(node)) for p in node.args[1]]
    return Layout(perm.index(lay.dim), lay.outer, lay.inner)


@layout_rule(aten.t.default, aten.transpose.int)
def _transpose(node, layouts, B):
    lay = layouts[node.args[0]]
    ndim = len(_shape(node))
    d0, d1 = (0, 1) if node.target == aten.t.default else (node.args[1] % ndim, node.args[2] % ndim)
    swap = {d0: d1, d1: d0}
    return Layout(swap.get(lay.dim, lay.dim), lay.outer, lay.inner)


@layout_rule(aten.unsqueeze.default)
def _unsqueeze(node, layouts, B):
    lay = layouts[node.args[0]]
    d = node.args[1] % len(_shape(node))
    return Layout(lay.dim + (1 if d <= lay.dim else 0), lay.outer, lay.inner)


@layout_rule(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def _squeeze(node, layouts, B):
    lay = layouts[node.args[0]]
    in_shape = _shape(node.args[0])
    if node.target == aten.squeeze.default:
        dims = [i for i, s in enumerate(in_shape) if known_equal(s, 1)]
    else:
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        dims = [d % len(in_shape) for d in dims if known_equal(in_shape[d % len(in_shape)], 1)]
    if lay.dim in dims:
        return None
    return Layout(lay.dim - sum(1 for d in dims if d < lay.dim), lay.outer, lay.inner)


@layout_rule(aten.expand.default)
def _expand(node, layouts, B):
    lay = layouts[node.args[0]]
    d = lay.dim + len(_shape(node)) - len(_shape(node.args[0]))
    if not known_equal(_shape(node)[d], _shape(node.args[0])[lay.dim]):
        return None
    return Layout(d, lay.outer, lay.inner)


def _reduced_dims(node):
    ndim = len(_shape(node.args[0]))
    dims = node.args[1] if len(node.args) > 1 else None
    if dims is None or dims == []:
        return list(range(ndim)), False
    dims = [dims] if isinstance(dims, int) else list(dims)
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    return [d % ndim for d in dims], keepdim


@layout_rule(aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default,
             aten.sum.default, aten.mean.default, aten.var_mean.correction, aten.var.correction,
             aten.prod.dim_int, aten.any.dim, aten.argmax.default, aten.logsumexp.default)
def _reduction(node, layouts, B):
    lay = layouts[node.args[0]]
    if node.target in (aten.sum.default, aten.mean.default):
        return MIXED
    dims, keepdim = _reduced_dims(node)
    if lay.dim in dims:
        return MIXED
    return Layout(lay.dim if keepdim else lay.dim - sum(1 for d in dims if d < lay.dim),
                  lay.outer, lay.inner)


@layout_rule(operator.getitem)
def _getitem(node, layouts, B):
    lay = layouts[node.args[0]]
    return lay if fits(lay, _shape(node), B) else None  # e.g. an op's non-batched extra outputs


def _matmul_layout(a_lay, b_lay, contract_a, contract_b, out_a, out_b):
    if (a_lay is not None and a_lay.dim == contract_a) or (b_lay is not None and b_lay.dim == contract_b):
        return MIXED
    if a_lay is not None and b_lay is not None:
        return None
    if a_lay is not None:
        return Layout(out_a(a_lay.dim), a_lay.outer, a_lay.inner)
    return Layout(out_b(b_lay.dim), b_lay.outer, b_lay.inner)


@layout_rule(aten.mm.default)
def _mm(node, layouts, B):
    a, b = node.args[:2]
    return _matmul_layout(layouts.get(a), layouts.get(b), 1, 0, lambda d: 0, lambda d: 1)


@layout_rule(aten.addmm.default)
def _addmm(node, layouts, B):
    bias, a, b = node.args[:3]
    out = _matmul_layout(layouts.get(a), layouts.get(b), 1, 0, lambda d: 0, lambda d: 1)
    if bias in layouts and out not in (MIXED, None) and _broadcast(node, layouts, B) != out:
        return None
    return out


@layout_rule(aten.bmm.default)
def _bmm(node, layouts, B):
    a, b = node.args[:2]
    la, lb = layouts.get(a), layouts.get(b)
    if (la is not None and la.dim == 2) or (lb is not None and lb.dim == 1):
        return MIXED  # contracts the batch
    # dim 0 or 1 of a stays dim 0 or 1 of the output; dim 0 or 2 of b stays put. Compared, not
    # hashed: under dynamic shapes a layout's sizes can be SymInts, which do not hash
    outs = [lay for lay in (la, None if lb is None else Layout(lb.dim, lb.outer, lb.inner)) if lay is not None]
    return outs[0] if outs and all(o == outs[0] for o in outs) else None



# --- Ops that keep samples apart along some dims and combine values along others (issue 4). ---
# Each rule returns MIXED when the batch sits in a dim the op combines, so the mixing check
# (passes/mixing.py) can name the op; otherwise the layout of the output.


def _op(name: str, overload: str = "default"):
    """aten.<name>.<overload>, or None where this torch build has no such op."""
    packet = getattr(aten, name, None)
    return getattr(packet, overload, None) if packet is not None else None


def _register(rule, *ops):
    for op in ops:
        if op is not None:
            LAYOUT_RULES[op] = rule


def _one(lays):
    """The layout all of `lays` share, else None (lists: symbolic layouts are unhashable)."""
    lays = list(lays)
    return lays[0] if lays and all(l == lays[0] for l in lays[1:]) else None


def _dim(d, ndim):
    return d % ndim if ndim else 0


def _arg(node, i, name, default):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _as_list(d):
    return list(d) if isinstance(d, (list, tuple)) else [d]


def _out_shape(node):
    v = node.meta.get("val")
    if isinstance(v, (tuple, list)):
        v = v[0] if v and isinstance(v[0], torch.Tensor) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _along(mixed_dims_of):
    """Rule for an op that combines values along `mixed_dims_of(node, ndim)` of its first input
    and keeps every other dim in place (all batched inputs share one layout)."""

    def rule(node, layouts, B):
        lay = _one(layouts[a] for a in node.all_input_nodes if a in layouts)
        if lay is None:
            return None
        ndim = len(_shape(node.args[0]) or ())
        if lay.dim in {_dim(d, ndim) for d in mixed_dims_of(node, ndim)}:
            return MIXED
        return lay if fits(lay, _out_shape(node), B) else None

    return rule


_register(_along(lambda n, nd: [_arg(n, 1, "dim", -1)]),
          aten.cumsum.default, aten.cumprod.default, aten.logcumsumexp.default,
          aten.cummax.default, aten.cummin.default, aten._softmax.default,
          aten._log_softmax.default, aten.sort.default, aten.argsort.default)
_register(_along(lambda n, nd: [n.kwargs.get("dim", -1)]), aten.sort.stable, aten.argsort.stable)
_register(_along(lambda n, nd: [_arg(n, 1, "dim", -1)]), aten.glu.default)
_register(_along(lambda n, nd: [_arg(n, 2, "dim", -1)]), aten.glu_backward.default)
_register(_along(lambda n, nd: [_arg(n, 2, "dim", -1)]), aten.topk.default, aten.kthvalue.default)
_register(_along(lambda n, nd: _as_list(n.args[1])), aten.flip.default, torch.ops.prims.rev.default)
_register(_along(lambda n, nd: _as_list(_arg(n, 2, "dims", [])) or range(nd)), aten.roll.default)
# padding changes the size of the padded dims: padding the batch adds samples
_register(_along(lambda n, nd: [nd - 1 - i // 2 for i, p in enumerate(n.args[1]) if p != 0]),
          aten.constant_pad_nd.default)


def _reduction_over(dims_of, keepdim_of):
    def rule(node, layouts, B):
        lay = layouts[node.args[0]]
        ndim = len(_shape(node.args[0]))
        dims = dims_of(node)
        dims = list(range(ndim)) if dims is None or dims == [] else [_dim(d, ndim) for d in _as_list(dims)]
        if lay.dim in dims:
            return MIXED
        keep = keepdim_of(node)
        return Layout(lay.dim if keep else lay.dim - sum(1 for d in dims if d < lay.dim),
                      lay.outer, lay.inner)

    return rule


_register(_reduction_over(lambda n: _arg(n, 1, "dim", None), lambda n: _arg(n, 2, "keepdim", False)),
          aten.median.dim, aten.nanmedian.dim, aten.mode.default, aten.max.dim, aten.min.dim,
          aten.all.dim, aten.any.dims, aten.argmin.default, aten.count_nonzero.dim_IntList,
          aten.std.correction)
_register(_reduction_over(lambda n: None, lambda n: False),
          aten.median.default, aten.nanmedian.default, aten.max.default, aten.min.default,
          aten.all.default, aten.any.default, aten.nansum.default)
_register(_reduction_over(lambda n: _arg(n, 2, "dim", None), lambda n: _arg(n, 3, "keepdim", False)),
          aten.linalg_vector_norm.default)


@layout_rule(aten.select.int)
def _select(node, layouts, B):
    lay = layouts[node.args[0]]
    d = _dim(node.args[1], len(_shape(node.args[0])))
    if d == lay.dim:
        return MIXED  # one sample's values, handed on without a batch
    return Layout(lay.dim - (1 if d < lay.dim else 0), lay.outer, lay.inner)


@layout_rule(aten.slice.Tensor)
def _slice(node, layouts, B):
    lay = layouts[node.args[0]]
    in_shape = _shape(node.args[0])
    d = _dim(_arg(node, 1, "dim", 0), len(in_shape))
    if d == lay.dim and not same_shape(_shape(node), in_shape):
        return MIXED  # drops samples
    return lay


@layout_rule(aten.unbind.int, aten.split.Tensor, aten.split_with_sizes.default)
def _split(node, layouts, B):
    lay = layouts[node.args[0]]
    unbind = node.target == aten.unbind.int
    d = _dim(_arg(node, 1 if unbind else 2, "dim", 0), len(_shape(node.args[0])))
    if d == lay.dim:
        return MIXED
    if unbind:
        return Layout(lay.dim - (1 if d < lay.dim else 0), lay.outer, lay.inner)
    return lay  # the layout of every piece


@layout_rule(aten.cat.default)
def _cat(node, layouts, B):
    lay = _one(layouts[t] for t in node.args[0] if t in layouts)
    if lay is None:
        return None
    if _dim(_arg(node, 1, "dim", 0), len(_shape(node))) == lay.dim:
        return MIXED  # joins along the batch: rows are no longer one per sample
    return lay if fits(lay, _shape(node), B) else None


@layout_rule(aten.stack.default)
def _stack(node, layouts, B):
    lay = _one(layouts[t] for t in node.args[0] if t in layouts)
    if lay is None:
        return None
    d = _dim(_arg(node, 1, "dim", 0), len(_shape(node)))
    return Layout(lay.dim + (1 if d <= lay.dim else 0), lay.outer, lay.inner)


@layout_rule(aten.index_select.default)
def _index_select(node, layouts, B):
    x, d, index = node.args[:3]
    d = _dim(d, len(_shape(x)))
    if x in layouts and index in layouts:
        return None
    if x in layouts:
        return MIXED if d == layouts[x].dim else layouts[x]
    lay = layouts[index]  # rows of a shared table picked per sample (like an embedding)
    return Layout(d, lay.outer, lay.inner)


@layout_rule(aten.gather.default)
def _gather(node, layouts, B):
    x, d, index = node.args[:3]
    lay = _one(layouts[a] for a in (x, index) if a in layouts)
    if lay is None:
        return None
    if x in layouts and _dim(d, len(_shape(x))) == lay.dim:
        return MIXED  # reads other samples' values
    return lay if fits(lay, _shape(node), B) else None


@layout_rule(aten.embedding.default)
def _embedding(node, layouts, B):
    weight, indices = node.args[:2]
    if weight in layouts:
        return None
    if _arg(node, 3, "scale_grad_by_freq", False):
        return MIXED  # the gradient is divided by each token's count over the whole batch
    return layouts[indices]  # output shape = indices.shape + (embedding_dim,)


_SAME_VALUES = (aten.expand.default, aten.clone.default, aten._to_copy.default,
                torch.ops.prims.convert_element_type.default)


def _batch_arange_axis(node, B):
    """The axis holding arange(B) when `node` is arange(B) with unit dims added (HF builds
    attention masks as mask[arange(B)[:, None, None, None], kv_idx]); else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target == torch.ops.prims.iota.default:
        whole = (node.kwargs.get("start", 0) == 0 and node.kwargs.get("step", 1) == 1
                 and known_equal(node.args[0], B))
        return 0 if whole else None
    inner = _batch_arange_axis(node.args[0], B) if node.args else None
    if inner is None:
        return None
    if node.target == aten.unsqueeze.default:
        return inner + (1 if _dim(node.args[1], len(_shape(node))) <= inner else 0)
    if node.target in _SAME_VALUES:  # expand may add leading dims
        return inner + len(_shape(node)) - len(_shape(node.args[0]))
    return None


def _advanced_layout(indices):
    """(rank of the broadcast advanced-index shape, output dim where it starts) for x[indices]:
    consecutive advanced indices stay in place, separated ones move to the front."""
    present = [i for i, idx in enumerate(indices) if idx is not None]
    width = max(len(_shape(indices[i])) for i in present)
    first = present[0] if present == list(range(present[0], present[-1] + 1)) else 0
    return width, first


def _per_sample_rows(x_lay, indices, B, layouts):
    """For x[indices] with x batched in dim d (batch-major) and indices[d] = arange(B): the
    output dim holding the batch, when every index picks within each sample's own rows."""
    d = x_lay.dim
    if not (x_lay.batch_major and known_equal(x_lay.inner, 1)) or d >= len(indices):
        return None
    idx = indices[d]
    if idx is None:
        return None
    axis = _batch_arange_axis(idx, B)
    if axis is None:
        return None
    width, first = _advanced_layout(indices)
    pos = width - len(_shape(idx)) + axis
    for other in indices:
        if other is None or other is idx or other not in layouts:
            continue
        lay = layouts[other]
        if not (isinstance(lay, Layout) and lay.batch_major
                and width - len(_shape(other)) + lay.dim == pos):
            return None  # another sample's index would pick from this sample's rows
    return first + pos


@layout_rule(aten.index.Tensor, aten._unsafe_index.Tensor)
def _index(node, layouts, B):
    x, indices = node.args[:2]
    batched_idx = [i for i in indices if i is not None and i in layouts]
    if x in layouts:
        lay = layouts[x]
        if lay.dim < len(indices) and indices[lay.dim] is not None:
            out = _per_sample_rows(lay, indices, B, layouts)
            if out is not None and fits(Layout(out), _shape(node), B):
                return Layout(out)  # sample b reads row b of x only
            return MIXED if not batched_idx else None  # picks rows along the batch
        if batched_idx:
            return None
        # advanced indices only after the batch dim: the leading dims stay in place
        if all(i is None for i in indices[:lay.dim]):
            return lay if fits(lay, _shape(node), B) else None
        return None
    if len(indices) == 1 and batched_idx:
        return layouts[batched_idx[0]]  # a shared table indexed per sample
    return None


@layout_rule(aten.as_strided.default)
def _as_strided(node, layouts, B):
    """A strided view inside each sample's slice of a contiguous dim-0 batch keeps samples apart."""
    x = node.args[0]
    sym = lambda v: v.meta.get("val") if isinstance(v, fx.Node) else v  # noqa: E731
    size, stride = [sym(v) for v in node.args[1]], [sym(v) for v in node.args[2]]
    offset = sym(_arg(node, 3, "storage_offset", 0)) or 0
    xv = x.meta.get("val")
    if layouts[x] != Layout(0) or not size or not isinstance(xv, torch.Tensor) or not xv.is_contiguous():
        return None
    per_sample = xv.stride()[0]
    if not (known_equal(size[0], B) and known_equal(stride[0], per_sample)):
        return None
    extent = offset + sum((s - 1) * st for s, st in zip(size[1:], stride[1:]))
    return Layout(0) if statically_known_true(extent < per_sample) else None


_DIM0 = _along(lambda n, nd: range(1, nd))  # dim 0 is treated sample by sample


def register_per_sample(*ops):
    """Declare ops that treat dim 0 of their tensor inputs sample by sample (like a
    convolution): a batch in dim 0 stays in dim 0 of the outputs; a batch elsewhere is refused as
    mixing. In a privatized model's forward, ops without a layout rule are refused."""
    _register(_DIM0, *ops)


register_per_sample(
    aten.convolution.default, aten.native_group_norm.default,
    aten._native_batch_norm_legit_no_training.default, aten.max_pool2d_with_indices.default,
    aten.max_pool3d_with_indices.default, aten.avg_pool2d.default, aten.avg_pool3d.default,
    aten._adaptive_avg_pool2d.default, aten._adaptive_avg_pool3d.default,
    aten.adaptive_max_pool2d.default, aten.upsample_nearest2d.default,
    aten.upsample_bilinear2d.default, aten.im2col.default, aten.pixel_shuffle.default,
    aten.pixel_unshuffle.default, _op("avg_pool1d"), _op("_low_memory_max_pool2d_with_offsets"),
    getattr(getattr(torch.ops.prims, "_low_memory_max_pool2d_with_offsets", None), "default", None),
)

# layer norm and attention combine values along their last dims only
_register(_along(lambda n, nd: range(nd - len(n.args[1]), nd)), aten.native_layer_norm.default)
_register(_along(lambda n, nd: range(nd - 2, nd)), *[
    _op(name) for name in ("_scaled_dot_product_flash_attention_for_cpu",
                           "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                           "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_attention_math",
                           "scaled_dot_product_attention")])


@layout_rule(aten._native_batch_norm_legit_functional.default, aten.native_batch_norm.default,
             aten._native_batch_norm_legit.default)
def _batch_norm(node, layouts, B):
    if node.args[5]:  # training: statistics over every dim but the channels
        return MIXED if layouts.get(node.args[0]) is not None and layouts[node.args[0]].dim != 1 else None
    return _DIM0(node, layouts, B)


_register(_broadcast, aten.native_dropout.default, aten.rand_like.default, aten.randn_like.default,
          aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default,
          aten.full_like.default, aten.bernoulli.default, aten.bernoulli.p, aten.detach.default,
          aten.tril.default, aten.triu.default)


@layout_rule(aten._trilinear.default)
def _trilinear(node, layouts, B):
    """_trilinear(i1, i2, i3, expand1, expand2, expand3, sumdim): each input is unsqueezed at
    its expand dims, the three are multiplied, and `sumdim` is summed (nn.Bilinear)."""
    inputs, expands, sumdim = node.args[:3], node.args[3:6], set(node.args[6])
    ndim = len(_shape(inputs[0])) + len(expands[0])
    placed = []
    for x, expand in zip(inputs, expands):
        if x not in layouts:
            continue
        lay = layouts[x]
        kept = [d for d in range(ndim) if d not in set(expand)]
        placed.append(Layout(kept[lay.dim], lay.outer, lay.inner))
    lay = _one(placed)
    if lay is None:
        return None
    if lay.dim in sumdim:
        return MIXED
    return Layout(lay.dim - sum(1 for d in sumdim if d < lay.dim), lay.outer, lay.inner)


# --- Backward ops of per-sample forward ops (issue 3): gradients w.r.t. per-sample inputs keep
# the batch where the forward had it; gradients w.r.t. parameters sum over it (MIXED). Multi-
# output ops get an Outputs tuple, which the getitem rule below unpacks element by element.


class Outputs(tuple):
    """Per-output layouts of a multi-output op: a Layout, MIXED, UNKNOWN or NO_BATCH each."""


NO_BATCH = _Mark("NO_BATCH")  # an output that carries no sample's values (left out of layouts)


def _unpack_getitem(node, layouts, B):
    lays = layouts[node.args[0]]
    if isinstance(lays, Outputs):
        i = node.args[1]
        return lays[i] if i < len(lays) else UNKNOWN
    return _getitem(node, layouts, B)


LAYOUT_RULES[operator.getitem] = _unpack_getitem


def _shared_dim0(nodes, layouts, B):
    """The one batch-major dim-0 layout of the batched `nodes`, else None."""
    lay = _one(layouts[a] for a in nodes if isinstance(a, fx.Node) and a in layouts)
    if not isinstance(lay, Layout) or lay.dim != 0 or not lay.batch_major:
        return None
    return lay


@layout_rule(aten.convolution_backward.default)
def _convolution_backward(node, layouts, B):
    grad_out, x, weight = node.args[:3]
    if weight in layouts:
        return None
    if grad_out not in layouts or x not in layouts:
        return None
    lay = _shared_dim0((grad_out, x), layouts, B)
    if lay is None:
        return None  # a batch that is not in dim 0: no rule
    mask = node.args[10]
    return Outputs(tuple(out if m else NO_BATCH for out, m in zip((lay, MIXED, MIXED), mask)))


def _sdpa_backward(node, layouts, B):
    """Attention backward: (grad_q, grad_k, grad_v) keep the batch dim of q, k, v (dim 0)."""
    tensors = [a for a in node.args[:6] if isinstance(a, fx.Node)]
    mask = node.kwargs.get("attn_mask")
    if isinstance(mask, fx.Node):
        tensors.append(mask)
    lay = _shared_dim0(tensors, layouts, B)
    if lay is None:
        return None
    return Outputs((lay, lay, lay))


_register(_sdpa_backward, _op("_scaled_dot_product_flash_attention_for_cpu_backward"))


def _sdpa_forward_outputs(node, layouts, B):
    """Attention forward with several outputs (output, logsumexp, ...): each per sample."""
    tensors = [a for a in node.args[:3] if isinstance(a, fx.Node)]
    mask = node.kwargs.get("attn_mask")
    if isinstance(mask, fx.Node):
        tensors.append(mask)
    lay = _one(layouts[a] for a in tensors if a in layouts)
    if lay is None:
        return None
    for a in tensors:
        if a in layouts and layouts[a].dim >= len(_shape(a)) - 2:
            return MIXED
    vals = node.meta.get("val")
    if not isinstance(vals, (tuple, list)):
        return lay if fits(lay, _shape(node), B) else None
    return Outputs(tuple(lay if isinstance(v, torch.Tensor) and fits(lay, tuple(v.shape), B) else NO_BATCH
                         for v in vals))


_register(_sdpa_forward_outputs, _op("_scaled_dot_product_flash_attention_for_cpu"))


@layout_rule(aten._fused_rms_norm.default)
def _fused_rms_norm(node, layouts, B):
    x = node.args[0]
    if x not in layouts or any(a in layouts for a in node.all_input_nodes if a is not x):
        return None
    lay = layouts[x]
    ndim = len(_shape(x))
    if lay.dim >= ndim - len(node.args[1]):
        return MIXED
    return Outputs((lay, lay))  # (output, rstd): rstd keeps the leading dims


@layout_rule(aten._fused_rms_norm_backward.default)
def _fused_rms_norm_backward(node, layouts, B):
    grad, x = node.args[:2]
    lay = _one(layouts[a] for a in (grad, x) if a in layouts)
    if lay is None:
        return None
    return Outputs((lay, MIXED))  # (grad_input, grad_weight)


@layout_rule(aten.embedding_dense_backward.default)
def _embedding_dense_backward(node, layouts, B):
    return MIXED  # a (num_weights, dim) table gradient summed over every sample's tokens


@layout_rule(aten._unsafe_masked_index_put_accumulate.default, aten.index_put.default,
             aten._unsafe_index_put.default)
def _index_put_accumulate(node, layouts, B):
    base = node.args[0]
    if base in layouts:
        return None
    masked = node.target == aten._unsafe_masked_index_put_accumulate.default
    indices, values = node.args[2:4] if masked else node.args[1:3]
    lay = layouts.get(values)
    if isinstance(lay, Layout) and lay.batch_major and known_equal(lay.inner, 1):
        for d, idx in enumerate(indices):
            # the backward of x[arange(B), ...]: each sample's values go back to its own row d
            if (idx is not None and known_equal(_shape(base)[d], B)
                    and _per_sample_rows(Layout(d), indices, B, layouts) == lay.dim):
                return Layout(d)
    return MIXED  # rows of a shared table written from (possibly) every sample


@layout_rule(aten.select_scatter.default)
def _select_scatter(node, layouts, B):
    """select_scatter(base, src, dim, index): src (one dim fewer) written into base at index."""
    base, src, dim = node.args[:3]
    ndim = len(_shape(node))
    dim = _dim(dim, ndim)
    out = None
    if src in layouts:
        lay = layouts[src]
        out = Layout(lay.dim + (1 if dim <= lay.dim else 0), lay.outer, lay.inner)
    if base in layouts:
        if layouts[base].dim == dim or (out is not None and layouts[base] != out):
            return None
        out = layouts[base]
    return out if out is not None and fits(out, _shape(node), B) else None


@layout_rule(aten.slice_scatter.default)
def _slice_scatter(node, layouts, B):
    """slice_scatter(base, src, dim, ...): src written into a slice of base along dim."""
    base, src = node.args[:2]
    dim = _dim(_arg(node, 2, "dim", 0), len(_shape(node)))
    lay = _one(layouts[a] for a in (base, src) if a in layouts)
    if lay is None or (lay.dim == dim and not same_shape(_shape(src), _shape(node))):
        return None
    return lay if fits(lay, _shape(node), B) else None


def _prims_op(name: str):
    """prims.<name>.default, registered by Inductor (loaded by passes._torch), or None."""
    packet = getattr(torch.ops.prims, name, None)
    return getattr(packet, "default", None) if packet is not None else None


# Inductor decomposes max pooling into these: each sample's window maxima, sample by sample.
register_per_sample(
    _prims_op("_low_memory_max_pool_with_offsets"),
    _prims_op("_low_memory_max_pool_offsets_to_indices"),
    aten.max_pool2d_with_indices_backward.default, aten.max_pool3d_with_indices_backward.default,
    aten.avg_pool2d_backward.default, aten.avg_pool3d_backward.default,
    aten._adaptive_avg_pool2d_backward.default, aten._adaptive_avg_pool3d_backward.default,
    aten.adaptive_max_pool2d_backward.default, aten.adaptive_max_pool3d.default,
    aten.adaptive_max_pool3d_backward.default,
)


@layout_rule(aten.scatter_add.default, aten.scatter.src, aten.scatter.value, aten.scatter_reduce.two)
def _scatter(node, layouts, B):
    """scatter*(base, dim, index, src): rows of dim 0... are written within each sample when the
    batch dim is not the scatter dim and every batched operand (and the output) agree on it."""
    dim = _dim(node.args[1], len(_shape(node)))
    lay = _one(layouts[a] for a in node.all_input_nodes if a in layouts)
    if lay is None or lay.dim == dim:
        return None
    if not known_equal(_shape(node)[lay.dim], _shape(node.args[2])[lay.dim]):
        return None
    return lay if fits(lay, _shape(node), B) else None
