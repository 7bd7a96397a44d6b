"""Op-coverage rules (issue 3): conv, embedding, shared parameters — exact against torch.func in
float64, and each test asserts that the rule it targets FIRED (not a silent fallback)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import LAST, D, run_check

import fxclip
import fxclip.passes.rules.conv as conv_rule
import fxclip.passes.rules.embedding as emb_rule
from fxclip.passes import rule_counters


def _last_graph():
    """The rewritten joint graph of the latest run_check."""
    return LAST["report"].graph


def fired(rule):
    return rule_counters[rule]


# --- linear ------------------------------------------------------------------------------------

class QKV(nn.Module):
    """Three projections of one input, as in attention: they can share its Gram matrices."""

    def __init__(s):
        super().__init__()
        s.q, s.k, s.v = nn.Linear(16, 12), nn.Linear(16, 12), nn.Linear(16, 12)

    def forward(s, x):
        return torch.tanh(s.q(x)) * s.k(x) + s.v(x)


def test_linear_ghost_shares_the_input_gram_across_projections(model_costs):
    before = fired("linear")
    routes = run_check(QKV(), (torch.randn(4, 3, 16, dtype=D),))
    assert all(routes[f"{n}.weight"].strategy == "ghost" for n in "qkv")  # T=3: T^2 (m+k) < T m k
    assert fired("linear") >= before + 3
    grams = [n for n in _last_graph().nodes
             if n.target == torch.ops.aten.bmm.default]
    assert len(grams) == 4  # x's Gram once, plus one per output gradient


class SlicedPositions(nn.Module):
    """minGPT-style positional parameter, sliced (here from an offset and with a batch-1 dim)."""

    def __init__(s):
        super().__init__()
        s.pos = nn.Parameter(torch.randn(1, 9, 6) * 0.1)
        s.lin = nn.Linear(6, 6)

    def forward(s, x):
        return s.lin(torch.tanh(x + s.pos[:, 2:2 + x.shape[1]]))


@pytest.mark.parametrize("compiled", [False, True])
def test_sliced_parameter_is_unreduced_not_instantiated_by_fallback(compiled):
    before = fired("unreduce")
    routes = run_check(SlicedPositions(), (torch.randn(4, 5, 6, dtype=D),), compiled=compiled)
    assert routes["pos"].rule == "unreduce"
    assert fired("unreduce") >= before + 1


class Einsum(nn.Module):
    """einsum contracts through bmm over a batch of one: written back as mm for the linear rule."""

    def __init__(s):
        super().__init__()
        s.w = nn.Parameter(torch.randn(4, 5) * 0.5)

    def forward(s, x):
        return torch.tanh(torch.einsum("btd,de->bte", x, s.w))


def test_einsum_with_a_parameter_takes_the_linear_rule():
    routes = run_check(Einsum(), (torch.randn(3, 6, 4, dtype=D),))
    assert routes["w"].rule == "linear"


class FrozenStatsBatchNorm(nn.Module):
    """BatchNorm in eval mode (running statistics): its weight gradient is
    sum(g * (x - running_mean)) * rsqrt(running_var + eps), a sum scaled by a per-channel factor
    that is the same for every sample."""

    def __init__(s):
        super().__init__()
        s.c = nn.Conv2d(3, 4, 3)
        s.bn2 = nn.BatchNorm2d(4)
        s.fc = nn.Linear(4, 5)
        s.bn1 = nn.BatchNorm1d(5)
        for bn in (s.bn2, s.bn1):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.normal_()
            bn.eval()

    def forward(s, x):
        return s.bn1(s.fc(s.bn2(s.c(x)).mean((2, 3))))


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_eval_batchnorm_weight_is_unreduced(compiled):
    before = fired("unreduce")
    routes = run_check(FrozenStatsBatchNorm(), (torch.randn(4, 3, 6, 6, dtype=D),), compiled=compiled)
    assert all(routes[f"{bn}.{p}"].rule == "unreduce" for bn in ("bn1", "bn2") for p in ("weight", "bias"))
    assert fired("unreduce") >= before + 4


class PackedBiases(nn.Module):
    """Separate biases packed with a cat and chunked again (HF WavLM packs q/k/v biases so for
    F.multi_head_attention_forward): each bias's gradient is a slice of the packed gradient."""

    def __init__(s):
        super().__init__()
        s.q, s.v = nn.Linear(8, 6), nn.Linear(8, 6)

    def forward(s, x):
        bq, bv = torch.cat((s.q.bias, s.v.bias)).chunk(2)
        return torch.tanh(F.linear(x, s.q.weight, bq)) * F.linear(x, s.v.weight, bv)


def test_biases_packed_with_cat_are_unreduced():
    before = fired("unreduce")
    routes = run_check(PackedBiases(), (torch.randn(3, 5, 8, dtype=D),))
    assert routes["q.bias"].rule == routes["v.bias"].rule == "unreduce"
    assert routes["q.weight"].rule == routes["v.weight"].rule == "linear"
    assert fired("unreduce") >= before + 2


# --- convolutions ------------------------------------------------------------------------------

class ConvNet(nn.Module):
    def __init__(s):
        super().__init__()
        s.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        s.gn = nn.GroupNorm(2, 8)
        s.dw = nn.Conv2d(8, 8, 3, groups=8, dilation=2)
        s.c3 = nn.Conv1d(8, 4, 2, groups=2, stride=2)
        s.fc = nn.Linear(4, 4)

    def forward(s, x):
        h = s.dw(torch.relu(s.gn(s.c1(x))))
        h = s.c3(h.flatten(2))
        return s.fc(h.mean(2))


class Conv3dNet(nn.Module):
    def __init__(s):
        super().__init__()
        s.c4 = nn.Conv3d(1, 2, (2, 3, 2), padding=(1, 0, 1), dilation=(1, 2, 1))
        s.ct = nn.ConvTranspose2d(2, 2, 3, stride=2)

    def forward(s, x):
        return s.ct(s.c4(x).flatten(2, 3))


@pytest.mark.parametrize("force", [None, "ghost", "instantiate"])
def test_conv_rule_exact_each_strategy(force, monkeypatch):
    if force:
        monkeypatch.setattr(conv_rule, "choose", lambda *a: (force, 0, 0))
    before = fired("conv")
    routes = run_check(ConvNet(), (torch.randn(4, 3, 12, 12, dtype=D),))
    for name in ("c1.weight", "c1.bias", "dw.weight", "dw.bias", "c3.weight", "c3.bias"):
        assert routes[name].rule == "conv", name
        if force and name.endswith("weight"):
            assert routes[name].strategy == force
    assert routes["gn.weight"].rule == "unreduce" and routes["gn.bias"].rule == "unreduce"
    assert fired("conv") >= before + 6


def test_conv_backward_skips_the_replaced_weight_gradient():
    """The rule supplies the weight gradient, so the original convolution_backward that still
    computes input gradients must not also compute the (dead) weight and bias gradients."""
    pm = fxclip.privatize(ConvNet().to(D), max_grad_norm=0.5)
    pm(torch.randn(4, 3, 12, 12, dtype=D)).sum().backward()
    conv_bw = [n for n in pm.last_report.graph.nodes
               if n.target == torch.ops.aten.convolution_backward.default]
    input_grads = [n for n in conv_bw if n.args[-1][0]]
    assert len(input_grads) >= 2  # dw and c3 pass gradients on
    for n in conv_bw:
        used = {u.args[1] for u in n.users}
        assert [i for i, on in enumerate(n.args[-1]) if on] == sorted(used), n.format_node()


@pytest.mark.parametrize("force", ["ghost", "instantiate"])
def test_conv3d_and_transposed(force, monkeypatch):
    monkeypatch.setattr(conv_rule, "choose", lambda *a: (force, 0, 0))
    routes = run_check(Conv3dNet(), (torch.randn(3, 1, 2, 7, 7, dtype=D),))
    assert routes["c4.weight"].rule == "conv" and routes["c4.weight"].strategy == force
    assert routes["ct.weight"].rule == "conv" and routes["ct.weight"].strategy == "instantiate"


def test_conv_cost_model_beats_fastdp():
    # fastDP: ghost iff 2 T^2 <= p d. Late ResNet layer (T=49, d=4608, p=512): ghost.
    assert conv_rule.choose(32, 49, 1, 4608, 512)[0] == "ghost"
    # Stem (T=112^2, d=147, p=64): instantiate.
    assert conv_rule.choose(32, 112 * 112, 1, 147, 64)[0] == "instantiate"
    # Depthwise 3x3 over 56^2 positions: per-sample grads are tiny, instantiate.
    assert conv_rule.choose(32, 56 * 56, 128, 9, 1)[0] == "instantiate"


# --- embeddings --------------------------------------------------------------------------------

class TextNet(nn.Module):
    def __init__(s, tie=False):
        super().__init__()
        s.e = nn.Embedding(20, 6, padding_idx=0)
        s.pos = nn.Embedding(5, 6)
        s.h = nn.Linear(6, 20, bias=False)
        if tie:
            s.h.weight = s.e.weight

    def forward(s, x):
        return s.h(torch.tanh(s.e(x) + s.pos(torch.arange(x.shape[1]))))


def _tokens(b=4):
    x = torch.randint(0, 20, (b, 5))
    x[:, -1] = 0  # padding
    x[0, :3] = 7  # a repeated token
    return x


@pytest.mark.parametrize("method", [None, "gram", "segment", "instantiate"])
def test_embedding_rule_padding_and_positional(method, monkeypatch):
    if method:
        monkeypatch.setattr(emb_rule, "choose", lambda *a: (method, 0, 0))
    before = fired("embedding")
    routes = run_check(TextNet(), (_tokens(),))
    assert routes["e.weight"].rule == "embedding"
    assert routes["pos.weight"].rule == "embedding"  # ids = arange(T): no batch dim
    if method:
        assert routes["e.weight"].shapes["method"] == method
    assert fired("embedding") >= before + 2


class RepeatedPositions(nn.Module):
    """Position ids built without the batch but batch-shaped: arange(T).repeat(B, 1) / .expand."""

    def __init__(s, how):
        super().__init__()
        s.how = how
        s.e = nn.Embedding(20, 6)
        s.pos = nn.Embedding(5, 6)
        s.h = nn.Linear(6, 20, bias=False)

    def forward(s, x):
        b, t = x.shape
        pos = torch.arange(t).repeat(b, 1) if s.how == "repeat" else torch.arange(t).expand(b, t)
        return s.h(torch.tanh(s.e(x) + s.pos(pos)))


@pytest.mark.parametrize("how", ["repeat", "expand"])
@pytest.mark.parametrize("method", ["gram", "segment", "instantiate"])
def test_embedding_rule_batch_shaped_constant_ids(how, method, monkeypatch):
    monkeypatch.setattr(emb_rule, "choose", lambda *a: (method, 0, 0))
    before = fired("embedding")
    routes = run_check(RepeatedPositions(how), (_tokens(),))
    assert routes["pos.weight"].rule == "embedding"
    assert routes["pos.weight"].shapes["method"] == method
    assert fired("embedding") >= before + 2


class RelativeBias(nn.Module):
    """T5-style attention bias: a table looked up with a constant (T, T) bucket matrix, then
    permuted to (1, H, T, T) and broadcast over the batch of attention scores."""

    def __init__(s):
        super().__init__()
        s.bias = nn.Embedding(7, 2)
        s.qk = nn.Linear(4, 4)

    def forward(s, x):
        t = x.shape[1]
        pos = torch.arange(t)
        buckets = (pos[None, :] - pos[:, None]).clamp(-3, 3) + 3
        bias = s.bias(buckets).permute(2, 0, 1).unsqueeze(0)  # (1, H, T, T)
        q = s.qk(x).view(x.shape[0], t, 2, 2).transpose(1, 2)
        scores = q @ q.transpose(-1, -2) + bias
        return (scores.softmax(-1) * scores).sum(-1).transpose(1, 2)


def test_embedding_rule_relative_position_bias():
    before = fired("embedding")
    routes = run_check(RelativeBias(), (torch.randn(3, 5, 4, dtype=D),))
    assert routes["bias.weight"].rule == "embedding"
    assert fired("embedding") >= before + 1


def test_embedding_refuses_scale_grad_by_freq():
    m = nn.Sequential(nn.Embedding(10, 4, scale_grad_by_freq=True), nn.Linear(4, 2))
    pm = fxclip.privatize(m, max_grad_norm=1.0)
    with pytest.raises(fxclip.PrivacyError, match=r"module '0' \(Embedding\) mixes samples"):
        pm(torch.randint(0, 10, (3, 4))).sum().backward()


def test_embedding_sparse_is_refused():
    m = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
    with pytest.raises(fxclip.PrivacyError, match="Embedding at '0'.*sparse=True"):
        fxclip.privatize(m, max_grad_norm=1.0)


# --- shared parameters -------------------------------------------------------------------------

def test_tied_embedding_head_ghost_cross_terms():
    before = fired("embedding"), fired("linear")
    routes = run_check(TextNet(tie=True), (_tokens(),))
    r = routes["e.weight"]
    assert r.uses == 2 and r.rule == "embedding+linear"
    assert fired("embedding") > before[0] and fired("linear") > before[1]


def test_tied_lm_never_instantiates_table(monkeypatch, model_costs):
    """Large vocabulary: every use and the cross term are ghost (no B x V x d tensor)."""

    class LM(nn.Module):
        def __init__(s):
            super().__init__()
            s.e = nn.Embedding(500, 8)
            s.h = nn.Linear(8, 500, bias=False)
            s.h.weight = s.e.weight

        def forward(s, x):
            return s.h(torch.tanh(s.e(x)))

    x = torch.randint(0, 500, (3, 6))
    x[1, :3] = 11
    routes = run_check(LM(), (x,), targets=torch.randn(3, 6, 500, dtype=D))
    assert routes["e.weight"].strategy == "ghost" and routes["e.weight"].uses == 2


class Twice(nn.Module):
    def __init__(s):
        super().__init__()
        s.l = nn.Linear(6, 6)

    def forward(s, x):
        return s.l(torch.tanh(s.l(x)))


@pytest.mark.parametrize("shape", [(5, 6), (4, 3, 6)])
def test_layer_used_twice(shape):
    routes = run_check(Twice(), (torch.randn(*shape, dtype=D),))
    assert routes["l.weight"].uses == 2 and routes["l.weight"].rule == "linear"


def test_shared_conv_used_twice():
    class M(nn.Module):
        def __init__(s):
            super().__init__()
            s.c = nn.Conv2d(2, 2, 3, padding=1)

        def forward(s, x):
            return s.c(torch.tanh(s.c(x)))

    routes = run_check(M(), (torch.randn(3, 2, 5, 5, dtype=D),))
    assert routes["c.weight"].uses == 2 and routes["c.weight"].rule == "conv"
