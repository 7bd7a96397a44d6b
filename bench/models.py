"""Benchmark models and synthetic data.

Every model is described by a :class:`ModelSpec`: a builder, a batch maker and a per-sample loss.
All configurations train on the same objective, a SUM over samples of a per-sample loss ``L_i``
(for the language models ``L_i`` is the mean token cross-entropy of sequence ``i``), so that every
configuration computes ``sum_i R_i * grad L_i`` with ``R_i = min(1, C / (||grad L_i|| + 1e-6))``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------
# per-sample loss shared by every configuration
# --------------------------------------------------------------------------------------------
class PerSampleCE(nn.Module):
    """Cross-entropy with a per-SAMPLE ``reduction="none"``.

    ``logits`` is ``[B, K]`` (classification) or ``[B, T, V]`` (language model, token mean per
    sequence). ``reduction`` is an attribute so that Opacus' ``DPLossFastGradientClipping`` can
    switch it to ``"none"`` and get one loss per sample back.
    """

    def __init__(self, reduction: str = "sum"):
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.dim() == 3:
            b, t, v = logits.shape
            tok = F.cross_entropy(logits.reshape(b * t, v), target.reshape(b * t), reduction="none")
            per_sample = tok.view(b, t).mean(1)
        else:
            per_sample = F.cross_entropy(logits, target, reduction="none")
        if self.reduction == "none":
            return per_sample
        if self.reduction == "sum":
            return per_sample.sum()
        if self.reduction == "mean":
            return per_sample.mean()
        raise ValueError(self.reduction)


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """The synthetic MLP of the Opacus fast-gradient-clipping blog post."""

    def __init__(self, d_in=5120, d_hidden=2560, d_out=1280):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.n_head

        def heads(z):
            return z.view(b, t, h, d // h).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, n_head)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """Small causal GPT: token + position embedding, plain-Linear attention with SDPA, MLP, LayerNorm."""

    def __init__(self, vocab=1000, d=128, n_layer=2, n_head=4, block_size=64):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(block_size, d)
        self.blocks = nn.ModuleList([Block(d, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        b, t = idx.shape
        # positions as a contiguous [B, T] tensor so every module input carries the batch dimension
        # (Opacus' ghost embedding rule calls .view(-1, 1) on the ids: an .expand()ed tensor fails)
        pos = torch.arange(t, device=idx.device).repeat(b, 1)
        x = self.tok(idx) + self.pos(pos)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


class TiedLM(nn.Module):
    """Embedding + 1 MLP block + LM head whose weight IS the embedding weight (tied)."""

    def __init__(self, vocab=16000, d=256):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, idx):
        x = self.emb(idx)
        x = x + self.proj(F.gelu(self.fc(self.ln(x))))
        return self.head(self.ln_f(x))


class GroupNormCNN(nn.Module):
    """CIFAR-sized CNN with GroupNorm (the DP-friendly replacement for BatchNorm)."""

    def __init__(self, n_classes=10, width=32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GroupNorm(8, w), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(8, w), nn.ReLU(),
            nn.MaxPool2d(2),                                            # 16x16
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GroupNorm(8, 2 * w), nn.ReLU(),
            nn.MaxPool2d(2),                                            # 8x8
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.GroupNorm(8, 4 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(4 * w, n_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


class HFGPT2Logits(nn.Module):
    """HF ``GPT2LMHeadModel`` built offline from a config; returns the logits tensor only."""

    def __init__(self, vocab=1000, d=128, n_layer=2, n_head=4, block_size=64):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(
            vocab_size=vocab, n_positions=block_size, n_embd=d, n_layer=n_layer, n_head=n_head,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
            tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
        )
        try:
            cfg._attn_implementation = "sdpa"
        except Exception:  # pragma: no cover - older/newer transformers
            pass
        self.gpt2 = GPT2LMHeadModel(cfg)

    def forward(self, idx):
        return self.gpt2(input_ids=idx, use_cache=False, return_dict=True).logits


def DigitsMLP():
    """The model of examples/demo.py (scikit-learn digits, 8x8 pixels): a sub-millisecond step,
    so fixed per-step costs dominate."""
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------
@dataclass
class ModelSpec:
    name: str
    description: str
    build: Callable[[], nn.Module]
    make_batch: Callable[[int, torch.Generator], tuple]  # (batch_size, gen) -> (x, y)
    batch_sizes: list[int]  # default sweep
    quick_batch_sizes: list[int]
    notes: str = ""
    extra: dict = field(default_factory=dict)


def _cls_batch(d_in, n_cls):
    def make(b, gen):
        return torch.randn(b, d_in, generator=gen), torch.randint(0, n_cls, (b,), generator=gen)
    return make


def _lm_batch(vocab, t):
    def make(b, gen):
        idx = torch.randint(0, vocab, (b, t + 1), generator=gen)
        return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    return make


def _img_batch(n_cls):
    def make(b, gen):
        return torch.randn(b, 3, 32, 32, generator=gen), torch.randint(0, n_cls, (b,), generator=gen)
    return make


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec(
        "mlp", "Opacus-blog MLP: Linear 5120->2560, ReLU, Linear 2560->1280 (16.4M params), CE",
        MLP, _cls_batch(5120, 1280), [16, 32, 64], [16],
    ),
    "gpt": ModelSpec(
        "gpt", "causal GPT: tok+pos Embedding, 2 blocks (Linear q/k/v/o + SDPA causal, GELU MLP, "
        "LayerNorm), d=128, T=64, vocab 1000",
        TinyGPT, _lm_batch(1000, 64), [8, 16], [8],
    ),
    "gpt_wide": ModelSpec(
        "gpt_wide", "the causal GPT at width d=512 (8 heads, 4d MLP), T=64, vocab 1000: the ghost-norm "
        "work B T^2 (m+k) shrinks relative to the weight gradients' B T m k as the width grows",
        lambda: TinyGPT(d=512, n_head=8), _lm_batch(1000, 64), [8, 16], [16],
    ),
    "hf_gpt2": ModelSpec(
        "hf_gpt2", "HF GPT2LMHeadModel from GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab 1000), "
        "T=64, untied head, no download",
        HFGPT2Logits, _lm_batch(1000, 64), [8, 16], [8],
    ),
    "cnn": ModelSpec(
        "cnn", "GroupNorm CNN, 4 conv (32-32-64-128 ch) + GroupNorm + ReLU + pools + Linear, 3x32x32",
        GroupNormCNN, _img_batch(10), [16, 32], [16],
    ),
    "digits": ModelSpec(
        "digits", "the demo's digits MLP: Linear 64->128, ReLU, Linear 128->10 (9,610 params), CE; "
        "random 8x8 inputs",
        DigitsMLP, _cls_batch(64, 10), [64], [64],
    ),
    "tied_lm": ModelSpec(
        "tied_lm", "tied-embedding LM: Embedding(16000, 256) = LM head weight, LayerNorm + GELU MLP "
        "block, T=32",
        TiedLM, _lm_batch(16000, 32), [8, 16], [16],
    ),
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
