"""The forms the fallback replays under vmap in place of backward ops (passes/rules/vmap_forms.py):
each equals the op under vmap in float64, and traced with a symbolic batch size it leaves that
size symbolic (the ops themselves specialize it: a recompile for every Poisson batch size)."""
from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fxclip.passes.rules import vmap_forms as forms

aten = torch.ops.aten
D = torch.float64


def _per_sample_lanes(fn, g, *shared):
    """vmap of fn over the B one-hot masks of g's rows (the fallback's per-sample lanes)."""
    batch = g.shape[0]
    masks = torch.eye(batch, dtype=torch.bool)
    return torch.vmap(lambda m: fn(torch.where(m.reshape(batch, *[1] * (g.dim() - 1)), g, 0), *shared))(masks)


def _specialized(fn, *tensors, lanes=_per_sample_lanes) -> bool:
    """Whether tracing fn's lanes with symbolic shapes fixed the batch size (dim 0 of the first
    tensor) to a number."""
    gm = make_fx(lambda *a: lanes(fn, *a), tracing_mode="symbolic")(*tensors)
    fake = next(n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder")
    return fake.shape[0].node.expr.is_number


def _conv_args(transposed, groups):
    w = torch.randn(4, 4 // groups, 3, dtype=D) if transposed else torch.randn(6, 4 // groups, 3, dtype=D)
    out_channels = w.shape[1] * groups if transposed else w.shape[0]
    return w, ([2], [1], [1], transposed, [1 if transposed else 0], groups), out_channels


@pytest.mark.parametrize("transposed,groups", [(False, 1), (False, 2), (True, 1), (True, 2)])
def test_convolution_backward(transposed, groups):
    x = torch.randn(7, 4, 9, dtype=D)  # 7 rows: a size no other dim has (equal sizes share a symbol)
    w, conv, out_channels = _conv_args(transposed, groups)

    def lanes(backward, x, w):  # the output gradient's sizes follow from x's, as in a graph
        g = aten.convolution(x, w, None, *conv).cos()
        return _per_sample_lanes(lambda go: backward(go, x, w, [out_channels], *conv, [True, True, True]), g)

    op, form = aten.convolution_backward.default, forms._convolution_backward
    for want, got in zip(lanes(op, x, w), lanes(form, x, w)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert _specialized(op, x, w, lanes=lanes) and not _specialized(form, x, w, lanes=lanes)


@pytest.mark.parametrize("mask", [None, "per_sample", "shared"])
def test_flash_attention_cpu_backward(mask):
    q, k, v = (torch.randn(3, 2, 5, 4, dtype=D) for _ in range(3))
    m = torch.zeros(1, 1, 1, 1, dtype=D) if mask is None else torch.randn(
        3 if mask == "per_sample" else 1, 1, 5, 5, dtype=D)
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, attn_mask=m)
    g = torch.randn_like(out)

    def op(go, q, k, v, out, lse, m):
        return aten._scaled_dot_product_flash_attention_for_cpu_backward.default(
            go, q, k, v, out, lse, 0.0, True, attn_mask=m, scale=None)

    def form(go, q, k, v, out, lse, m):
        return forms._flash_attention_cpu_backward(go, q, k, v, out, lse, 0.0, True, m, None)

    tensors = (g, q, k, v, out, lse, m)
    for want, got in zip(_per_sample_lanes(op, *tensors), _per_sample_lanes(form, *tensors)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert _specialized(op, *tensors) and not _specialized(form, *tensors)


def test_weight_norm_backward():
    v, g = torch.randn(6, 4, 3, dtype=D), torch.randn(1, 1, 3, dtype=D)
    w, norms = torch._weight_norm_interface(v, g, 2)
    grad = torch.randn(5, *w.shape, dtype=D)  # 5 samples' weight gradients

    def lanes(fn, grad, *shared):
        return torch.vmap(fn, in_dims=(0, None, None, None))(grad, *shared)

    op = lambda gw, v, g, n: aten._weight_norm_interface_backward(gw, v, g, n, 2)  # noqa: E731
    form = lambda gw, v, g, n: forms._weight_norm_backward(gw, v, g, n, 2)  # noqa: E731
    for want, got in zip(lanes(op, grad, v, g, norms), lanes(form, grad, v, g, norms)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert _specialized(op, grad, v, g, norms, lanes=lanes)
    assert not _specialized(form, grad, v, g, norms, lanes=lanes)


@pytest.mark.parametrize("dim", [1, -1])
def test_cat(dim):
    g, shared = torch.randn(3, 4, 5, dtype=D), torch.randn(3, 4, 5, dtype=D)
    op = lambda a, b: torch.cat([a, b * 2, a], dim)  # noqa: E731
    form = lambda a, b: forms._cat([a, b * 2, a], dim)  # noqa: E731
    assert torch.equal(_per_sample_lanes(form, g, shared), _per_sample_lanes(op, g, shared))
    assert _specialized(op, g, shared) and not _specialized(form, g, shared)


@pytest.mark.parametrize("start,end", [(0, -1), (1, None), (2, 4)])
def test_slice_scatter(start, end):
    first, last, _ = slice(start, end).indices(6)
    src, base = torch.randn(3, 4, last - first, dtype=D), torch.randn(3, 4, 6, dtype=D)
    # the op itself needs bounds within the size under vmap (the form's first reason to be)
    op = lambda a, b: aten.slice_scatter.default(b, a, 2, first, last)  # noqa: E731
    form = lambda a, b: forms._slice_scatter(b, a, 2, start, end)  # noqa: E731
    assert torch.equal(_per_sample_lanes(form, src, base), _per_sample_lanes(op, src, base))
    assert _specialized(op, src, base) and not _specialized(form, src, base)


def test_fma():
    g, b, c = (torch.randn(3, 4, 5, dtype=D) for _ in range(3))
    op = lambda a, b, c: torch.ops.prims.fma.default(a, b, c)  # noqa: E731
    form = forms._fma
    torch.testing.assert_close(_per_sample_lanes(form, g, b, c), _per_sample_lanes(op, g, b, c), rtol=1e-15, atol=1e-15)
    assert _specialized(op, g, b, c) and not _specialized(form, g, b, c)


@pytest.mark.parametrize("dim", [-1, 1, 0])
def test_scatter_add(dim):
    src, base = torch.randn(3, 4, 5, dtype=D), torch.randn(3, 4, 6, dtype=D)
    index = torch.randint(0, 3 if dim == 0 else 4 if dim == 1 else 6, (3, 4, 5))
    op = lambda s, b, i: aten.scatter_add.default(b, dim, i, s)  # noqa: E731
    form = lambda s, b, i: forms._scatter_add(b, dim, i, s)  # noqa: E731
    torch.testing.assert_close(_per_sample_lanes(form, src, base, index), _per_sample_lanes(op, src, base, index),
                               rtol=1e-15, atol=1e-15)
    assert _specialized(op, src, base, index)
    assert _specialized(form, src, base, index) == (dim == 0)  # along the rows the op itself runs
