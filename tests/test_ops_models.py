"""Whole models (issue 3): exact against torch.func (float64), eager; a few compiled (slow).
One test lists which rule each parameter of each model got."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import D, run_check, run_steps
from test_ops_rules import ConvNet, TextNet, Twice, _tokens

import fxclip


class TextCNN(nn.Module):
    def __init__(s):
        super().__init__()
        s.e = nn.Embedding(30, 8, padding_idx=0)
        s.c = nn.Conv1d(8, 6, 3, padding=1)
        s.fc = nn.Linear(6, 2)

    def forward(s, x):
        return s.fc(torch.relu(s.c(s.e(x).transpose(1, 2))).amax(2))


class TiedLM(nn.Module):
    def __init__(s):
        super().__init__()
        s.e = nn.Embedding(40, 8)
        s.pos = nn.Parameter(torch.randn(6, 8) * 0.1)
        s.ln = nn.LayerNorm(8)
        s.h = nn.Linear(8, 40, bias=False)
        s.h.weight = s.e.weight

    def forward(s, x):
        return s.h(s.ln(torch.tanh(s.e(x) + s.pos[: x.shape[1]])))


class Sdpa(nn.Module):
    def __init__(s, causal=True):
        super().__init__()
        s.qkv = nn.Linear(8, 24)
        s.o = nn.Linear(8, 8)
        s.causal = causal

    def forward(s, x):
        B, T, _ = x.shape
        q, k, v = s.qkv(x).view(B, T, 3, 2, 4).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=s.causal)
        return s.o(y.transpose(1, 2).reshape(B, T, 8))


class Mha(nn.Module):
    def __init__(s, batch_first=True):
        super().__init__()
        s.a = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        s.batch_first = batch_first

    def forward(s, x):
        if not s.batch_first:
            x = x.transpose(0, 1)
        y = s.a(x, x, x, need_weights=False)[0]
        return y if s.batch_first else y.transpose(0, 1)


class CausalEncoder(nn.Module):
    def __init__(s, T=5):
        super().__init__()
        s.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=True)
        s.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(T))

    def forward(s, x):
        return s.layer(x, src_mask=s.mask, is_causal=True)


class Norms(nn.Module):
    def __init__(s):
        super().__init__()
        s.fc = nn.Linear(8, 8)
        s.rms = nn.RMSNorm(8)
        s.w = nn.Parameter(torch.ones(8))
        s.gn = nn.GroupNorm(2, 4)

    def forward(s, x):
        y = s.rms(s.fc(x))
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * s.w  # hand-written RMSNorm
        return s.gn(y.reshape(x.shape[0], 4, -1)).reshape(y.shape)


class GatedConvPools(nn.Module):
    """GLU over channels, InstanceNorm, ConvTranspose, adaptive max pooling (ViT-free image path)."""

    def __init__(s):
        super().__init__()
        s.c = nn.Conv2d(3, 8, 3, bias=False)  # a bias before InstanceNorm has a zero gradient
        s.inorm = nn.InstanceNorm2d(4, affine=True)
        s.ct = nn.ConvTranspose2d(4, 4, 2, stride=2)
        s.fc = nn.Linear(4, 3)

    def forward(s, x):
        h = s.ct(torch.relu(s.inorm(F.glu(s.c(x), dim=1))))
        return s.fc(F.adaptive_max_pool2d(h, 1).flatten(1))


class MaskedPooled(nn.Module):
    """The HF patterns around attention: a padding mask gathered as mask[arange(B)[:, None], kv]
    in the forward, and last-token pooling h[arange(B), lengths - 1] (whose backward is an
    index_put into each sample's own row)."""

    def __init__(s):
        super().__init__()
        s.e = nn.Embedding(20, 8)
        s.qkv = nn.Linear(8, 24)
        s.head = nn.Linear(8, 3)

    def forward(s, ids, mask):
        b, t = ids.shape
        rows = torch.arange(b)
        keep = mask[rows[:, None, None], torch.arange(t)[None, None, :]].bool()  # (B, 1, T)
        q, k, v = s.qkv(s.e(ids)).chunk(3, -1)
        scores = (q @ k.transpose(1, 2)).masked_fill(~keep, float("-inf"))
        h = scores.softmax(-1) @ v
        return s.head(h[rows, mask.sum(1) - 1])


def _masked_inputs(b=4):
    ids = torch.randint(1, 20, (b, 6))
    mask = torch.ones(b, 6, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return ids, mask


class CrossAttention(nn.Module):
    """nn.TransformerDecoderLayer: its cross-attention splits the packed in_proj_weight into a
    query piece and a key/value piece, so the weight's gradient is a cat of two matmuls."""

    def __init__(s):
        super().__init__()
        s.d = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True)

    def forward(s, x, memory):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype)
        return s.d(x, memory, tgt_mask=mask, tgt_is_causal=True)


class HF(nn.Module):
    def __init__(s, m):
        super().__init__()
        s.m = m

    def forward(s, ids):
        return s.m(input_ids=ids).last_hidden_state


def gpt2():
    from transformers import GPT2Config, GPT2Model

    cfg = GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=1, n_head=2, attn_pdrop=0.0,
                     resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return HF(GPT2Model(cfg))


def bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=16, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return HF(BertModel(cfg, add_pooling_layer=False))


def x3(b=3):
    return torch.randn(b, 5, 8, dtype=D)


def x3_inputs(b=3):
    return (x3(b),)


# name: (model builder, inputs of a batch of b samples; by default the batch the tests use)
MODELS = {
    "convnet": (ConvNet, lambda b=4: (torch.randn(b, 3, 12, 12, dtype=D),)),
    "textcnn": (TextCNN, lambda b=4: (_tokens(b),)),
    "tied_lm": (TiedLM, lambda b=4: (_tokens(b) % 40,)),
    "text_tied": (lambda: TextNet(tie=True), lambda b=4: (_tokens(b),)),
    "twice": (Twice, lambda b=4: (torch.randn(b, 3, 6, dtype=D),)),
    "sdpa_causal": (Sdpa, x3_inputs),
    "mha": (Mha, x3_inputs),
    "mha_seq_first": (lambda: Mha(batch_first=False), x3_inputs),
    "encoder": (lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), x3_inputs),
    "encoder_causal": (CausalEncoder, x3_inputs),
    "norms": (Norms, x3_inputs),
    "gated_conv_pools": (GatedConvPools, lambda b=3: (torch.randn(b, 3, 7, 7, dtype=D),)),
    "masked_pooled": (MaskedPooled, _masked_inputs),
    "cross_attention": (CrossAttention, lambda b=3: (x3(b), torch.randn(b, 4, 8, dtype=D))),
    "gpt2": (gpt2, lambda b=3: (torch.randint(0, 50, (b, 5)),)),
    "bert": (bert, lambda b=3: (torch.randint(0, 50, (b, 5)),)),
}

@pytest.mark.parametrize("name", list(MODELS))
def test_model_runs_exact_eager(name):
    """Batch sizes 4, 3, 5 in turn, exact at every step."""
    make, inputs = MODELS[name]
    routes = run_steps(make(), inputs)
    fallbacks = [n for n, r in routes.items() if "fallback" in r.rule]
    assert not fallbacks, fallbacks


def test_rules_per_parameter_listing():
    """Which rule each parameter of each whole model gets (printed with -s; asserted where it
    matters: projections use the linear ghost rule, tables the embedding rule)."""
    listing = {}
    for name, (make, inputs) in MODELS.items():
        routes = run_check(make(), inputs())
        listing[name] = {n: f"{r.rule}/{r.strategy}" for n, r in routes.items()}
    for name, rows in listing.items():
        print(f"\n{name}")
        for n, how in rows.items():
            print(f"  {n:40s} {how}")
    assert listing["gpt2"]["m.h.0.attn.c_attn.weight"].startswith("linear")
    assert listing["gpt2"]["m.wte.weight"].startswith("embedding")
    assert listing["gpt2"]["m.wpe.weight"].startswith("embedding")
    assert listing["bert"]["m.embeddings.word_embeddings.weight"].startswith("embedding")
    assert listing["mha"]["a.in_proj_weight"].startswith("linear")
    assert listing["cross_attention"]["d.multihead_attn.in_proj_weight"].startswith("linear")
    assert listing["mha_seq_first"]["a.out_proj.weight"].startswith("linear")
    assert listing["tied_lm"]["e.weight"].startswith("embedding+linear")
    assert listing["tied_lm"]["pos"].startswith("unreduce")  # pos[:T]: its slice_scatter is a padding
    assert listing["bert"]["m.embeddings.token_type_embeddings.weight"].startswith("embedding")
    assert listing["convnet"]["dw.weight"].startswith("conv")
    assert listing["norms"]["rms.weight"].startswith("unreduce") or listing["norms"]["rms.weight"].startswith("norm")


def test_recurrent_layers_are_traced_into_cell_ops():
    """nn.LSTM/GRU are no longer refused: their weights take the linear rule (exactness against
    a per-sample loop: tests/test_breadth_models.py)."""
    import fxclip

    class Steps(nn.Module):  # the per-step outputs only: h_n is (layers, B, hidden), not per sample
        def __init__(self, cls):
            super().__init__()
            self.inp, self.rnn = nn.Linear(4, 4), cls(4, 3, batch_first=True)

        def forward(self, x):
            return self.rnn(self.inp(x))[0]

    for cls in (nn.LSTM, nn.GRU):
        m = Steps(cls)
        pm = fxclip.privatize(m, max_grad_norm=1.0)
        pm(torch.randn(4, 5, 4)).sum().backward()
        assert all(p.grad is not None for p in m.parameters())
        assert pm.last_report.route("rnn.weight_hh_l0").rule == "linear"


def test_autocast_bf16_matches_float32():
    import fxclip

    torch.manual_seed(0)
    m = TextCNN()
    m2 = TextCNN()
    m2.load_state_dict(m.state_dict())
    x = _tokens()
    y = torch.randn(4, 2)
    ref_pm = fxclip.privatize(m2, max_grad_norm=0.5)
    ((ref_pm(x) - y) ** 2).sum(1).mean().backward()
    pm = fxclip.privatize(m, max_grad_norm=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pm(x)
    ((out.float() - y) ** 2).sum(1).mean().backward()
    assert pm.per_sample_norms.dtype == torch.float32
    for (n, p), p2 in zip(m.named_parameters(), m2.parameters()):
        assert p.grad.dtype == torch.float32
        err = ((p.grad - p2.grad).abs().max() / p2.grad.abs().max()).item()
        assert err < 5e-2, (n, err)


@pytest.fixture(scope="module")
def compiled_results():
    """One compiled run per model (batch sizes 4, 3, 5), shared by the compiled tests (cold
    compiles are slow)."""
    out = {}
    for name in ("tied_lm", "convnet", "gpt2"):
        make, inputs = MODELS[name]
        out[name] = run_steps(make(), inputs, compiled=True)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tied_lm", "convnet", "gpt2"])
def test_model_exact_compiled(compiled_results, name):
    routes = compiled_results[name]
    assert not [n for n, r in routes.items() if "fallback" in r.rule]


def test_gpt2_with_attention_dropout_at_a_second_batch_size():
    # the second batch size recompiles with a symbolic B; with dropout on the attention weights
    # the bmm's operand layouts hold SymInt sizes, which must not be hashed (TypeError before)
    from transformers import GPT2Config, GPT2Model

    cfg = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2, attn_pdrop=0.1,
                     resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = HF(GPT2Model(cfg)).to(D).train()
    pm = fxclip.privatize(model, max_grad_norm=0.5)
    for b in (3, 5):
        pm(torch.randint(0, 50, (b, 6))).sum().backward()
        assert pm.per_sample_norms.shape == (b,)
    routes = pm.last_report.params
    assert pm.last_report.batch_size != "5"  # the dynamic graph, not a second static one
    assert not [r.name for r in routes if "fallback" in r.rule]
