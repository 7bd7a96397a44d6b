"""Layers that keep samples apart must not crash the fallback or be refused: slices with
unnormalized bounds, as_strided_scatter (adaptive pooling's backward), baddbmm / addbmm
(attention with masks). Exact against torch.func in float64; each asserts the route it needs."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from helpers import Wrap, check_against_loop, run_check

import fxclip
from fxclip.passes import rule_counters
from fxclip.passes.layout import registered_layout_rules

D = torch.float64


# --- 1. slices with an end past the size (INT64_MAX) or negative, replayed by the fallback ---

class RotaryHalf(nn.Module):
    """nn.Bilinear (which only the fallback handles), a rotate-half and a shifted slice."""

    def __init__(self, negative_end):
        super().__init__()
        self.bil, self.lin = nn.Bilinear(6, 6, 8), nn.Linear(8, 3)
        self.negative_end = negative_end

    def forward(self, x):
        h = self.bil(x, x)
        n = h.shape[-1]
        h = torch.cat((-h[..., n // 2:], h[..., :n // 2]), -1)  # ends at INT64_MAX
        return self.lin(h[:, :-1] if self.negative_end else h[:, 1:])  # ends at -1


@pytest.mark.parametrize("negative_end", [False, True])
def test_fallback_replays_unnormalized_slices(negative_end):
    before = rule_counters["fallback"]
    routes = run_check(RotaryHalf(negative_end), (torch.randn(4, 5, 6, dtype=D),))
    assert routes["bil.weight"].rule == "fallback" and rule_counters["fallback"] > before
    assert routes["lin.weight"].rule == "linear"


class SelectScatterNegative(nn.Module):
    """x[:, -1] = ... : a select_scatter with a negative index in the fallback's slice."""

    def __init__(self):
        super().__init__()
        self.bil, self.lin = nn.Bilinear(6, 6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.bil(x, x).clone()
        h[:, -1] = h[:, -1] * 2
        return self.lin(h)


def test_fallback_replays_negative_select_scatter():
    routes = run_check(SelectScatterNegative(), (torch.randn(4, 5, 6, dtype=D),))
    assert routes["bil.weight"].rule == "fallback"


# --- 2. as_strided_scatter: the backward of adaptive average pooling in some layouts ---

class PoolTokens(nn.Module):
    """Linear -> transpose(1, 2) -> AdaptiveAvgPool1d(1) -> flatten -> Linear."""

    def __init__(self):
        super().__init__()
        self.a, self.pool, self.b = nn.Linear(6, 8), nn.AdaptiveAvgPool1d(1), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(self.pool(self.a(x).transpose(1, 2)).flatten(1))


class ChannelsFirstNorm(nn.Module):
    """Conv2d -> LayerNorm over channels (permute, norm, permute back) -> AdaptiveAvgPool2d(1)
    -> Linear, as in ConvNeXt and Swin."""

    def __init__(self):
        super().__init__()
        self.c, self.ln = nn.Conv2d(3, 8, 3), nn.LayerNorm(8)
        self.pool, self.b = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 3)

    def forward(self, x):
        h = self.ln(self.c(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.b(self.pool(h).flatten(1))


def test_adaptive_pool_backward_keeps_linear_rules():
    before = rule_counters["fallback"]
    routes = run_check(PoolTokens(), (torch.randn(4, 5, 6, dtype=D),))
    assert routes["a.weight"].rule == "linear" and routes["b.weight"].rule == "linear"
    assert rule_counters["fallback"] == before
    assert registered_layout_rules()["aten.as_strided_scatter.default"] == "views"


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_channels_first_norm_then_pool_keeps_the_conv_rule(compiled):
    before = rule_counters["fallback"]
    routes = run_check(ChannelsFirstNorm(), (torch.randn(4, 3, 6, 6, dtype=D),), compiled=compiled)
    assert routes["c.weight"].rule == "conv" and routes["ln.weight"].rule == "unreduce"
    assert rule_counters["fallback"] == before


class BilinearThenPool(nn.Module):
    """A fallback parameter whose backward slice holds the as_strided_scatter."""

    def __init__(self):
        super().__init__()
        self.bil, self.pool, self.b = nn.Bilinear(6, 6, 8), nn.AdaptiveAvgPool1d(1), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(self.pool(self.bil(x, x).transpose(1, 2)).flatten(1))


def test_fallback_replays_as_strided_scatter():
    routes = run_check(BilinearThenPool(), (torch.randn(4, 5, 6, dtype=D),))
    assert routes["bil.weight"].rule == "fallback"


# --- 3. baddbmm / addbmm: attention with masks, need_weights ---

class Attention(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.m, self.kind = nn.MultiheadAttention(8, 2, batch_first=True), kind

    def forward(self, x):
        B, T, _ = x.shape
        if self.kind == "attn_mask":
            return self.m(x, x, x, attn_mask=torch.triu(torch.ones(T, T, dtype=torch.bool), 1))[0]
        if self.kind == "key_padding_mask":
            pad = torch.zeros(B, T, dtype=torch.bool)
            pad[:, -1] = True
            return self.m(x, x, x, key_padding_mask=pad)[0]
        out, weights = self.m(x, x, x)  # need_weights=True (the default)
        return out + weights.sum(-1, keepdim=True)


@pytest.mark.parametrize("kind,compiled", [("attn_mask", False), ("key_padding_mask", False),
                                           ("weights", False),
                                           pytest.param("key_padding_mask", True, marks=pytest.mark.slow)])
def test_multihead_attention_with_masks_takes_the_linear_rule(kind, compiled):
    routes = run_check(Attention(kind), (torch.randn(4, 5, 8, dtype=D),), compiled=compiled)
    assert routes["m.in_proj_weight"].rule == "linear" and routes["m.out_proj.weight"].rule == "linear"
    assert registered_layout_rules()["aten.baddbmm.default"] == "matmul"


def test_baddbmm_and_addbmm_over_the_batch_are_refused():
    contract = lambda h: torch.baddbmm(h.new_zeros(4, 4, 4), h.reshape(-1, 4, 4).permute(1, 2, 0),  # noqa: E731
                                       h.reshape(-1, 4, 4).transpose(0, 1)).sum() + h
    summed = lambda h: h * torch.addbmm(h.new_zeros(4, 4), h.reshape(-1, 4, 4), h.reshape(-1, 4, 4)).sum()  # noqa: E731
    for fn, op in ((contract, "baddbmm"), (summed, "addbmm")):
        pm = fxclip.privatize(Wrap(fn, d=16), max_grad_norm=1.0)
        with pytest.raises(fxclip.PrivacyError, match=f"aten::{op}.*mixes samples"):
            pm(torch.randn(5, 3)).sum().backward()


# --- 5. nn.EmbeddingBag with 2-D bags: a ghost-norm rule ---

class Bags(nn.Module):
    def __init__(self, mode, padding_idx=None, tied=False):
        super().__init__()
        self.bag = nn.EmbeddingBag(12, 6, mode=mode, padding_idx=padding_idx)
        self.head = nn.Linear(6, 12)
        if tied:
            self.head.weight = self.bag.weight  # the table is also the output layer

    def forward(self, ids, weights=None):
        return self.head(torch.tanh(self.bag(ids, per_sample_weights=weights)))


def _bags():
    ids = torch.randint(1, 12, (4, 5))
    ids[:, 1] = ids[:, 0]  # repeated ids inside a bag
    ids[0, 3:] = 0  # padding (with padding_idx=0)
    ids[1] = 0  # a bag holding padding only
    return ids


@pytest.mark.parametrize("mode,padding_idx,weighted,tied,compiled", [
    ("sum", None, False, False, False), ("sum", 0, True, False, False), ("mean", 0, False, False, False),
    ("max", 0, False, False, False), ("max", None, False, False, False), ("sum", None, False, True, False),
    ("mean", 0, False, False, True)])
def test_embedding_bag_rule(mode, padding_idx, weighted, tied, compiled):
    ids = _bags()
    inputs = (ids, torch.rand(4, 5, dtype=D)) if weighted else (ids,)
    before = rule_counters["embedding_bag"]
    routes = run_check(Bags(mode, padding_idx, tied), inputs, compiled=compiled)
    assert "embedding_bag" in routes["bag.weight"].rule and "fallback" not in routes["bag.weight"].rule
    assert rule_counters["embedding_bag"] > before


def test_embedding_bag_with_per_sample_offsets_is_refused_with_a_hint():
    class FlatBags(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag = nn.EmbeddingBag(12, 6)

        def forward(self, ids, starts):
            return self.bag(ids.flatten(), starts[:, 0] * ids.shape[1])

    pm = fxclip.privatize(FlatBags(), max_grad_norm=1.0)
    starts = torch.arange(4)[:, None]
    with pytest.raises(fxclip.PrivacyError, match=r"module 'bag' \(EmbeddingBag\).*Pass 2-D bags"):
        pm(torch.randint(0, 12, (4, 5)), starts).sum().backward()


# --- masks built per sample (wav2vec2's feature-vector mask): index_put at arange(B), repeat,
# and an elementwise bool-mask fill ---

class LengthMasked(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x, lengths):
        B, T, _ = x.shape
        mask = torch.zeros(B, T, dtype=torch.long)
        mask[(torch.arange(B), lengths - 1)] = 1  # each sample writes its own row
        mask = mask.flip([-1]).cumsum(-1).flip([-1]).bool()
        h = self.a(x)
        h[~mask.unsqueeze(-1).repeat(1, 1, h.shape[-1])] = 0  # an elementwise fill
        return self.b(h)


def test_per_sample_length_mask_is_not_refused():
    lengths = torch.tensor([5, 3, 1, 4])
    routes = check_against_loop(LengthMasked(), (torch.randn(4, 5, 6, dtype=D), lengths))
    assert routes["a.weight"] == "linear" and routes["b.weight"] == "linear"


def test_writing_another_samples_row_is_still_refused():
    def shifted(h):
        B = h.shape[0]
        out = torch.zeros(B, h.shape[1])
        out[(torch.arange(B) + 1) % B] = h  # sample b's values land in row b + 1
        return out

    pm = fxclip.privatize(Wrap(shifted), max_grad_norm=1.0)
    with pytest.raises(fxclip.PrivacyError, match="aten::index_put.*mixes samples"):
        pm(torch.randn(5, 3)).sum().backward()


class HeadPick(nn.Module):
    """x[:, :, [k]] with a constant index list (Falcon's multi-query key/value heads): its
    backward is an index_put accumulate whose values carry the batch ahead of the index."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(6, 32), nn.Linear(16, 3)

    def forward(self, x):
        h = self.qkv(x).view(x.shape[0], x.shape[1], 4, 8)
        return self.out(torch.cat([h[:, :, [3]], h[:, :, [0]]], 2).flatten(2))


def test_constant_index_after_the_batch_keeps_the_linear_rule():
    before = rule_counters["fallback"]
    routes = run_check(HeadPick(), (torch.randn(4, 5, 6, dtype=D),))
    assert routes["qkv.weight"].rule == "linear" and rule_counters["fallback"] == before


def test_layout_rules_are_listed_by_family_file():
    import pathlib

    import fxclip.passes.layout as layout

    families = set(registered_layout_rules().values()) - {"layout"}  # "layout": the package's own
    folder = pathlib.Path(layout.__file__).parent
    assert families and all((folder / f"{f}.py").exists() for f in families)
    assert registered_layout_rules()["aten.convolution.default"] == "per_sample"
    assert registered_layout_rules()["aten.cumsum.default"] == "along"
