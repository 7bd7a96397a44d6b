"""Sensitivity audit: with loss_reduction="sum", removing any one sample changes the clipped
gradient sum by at most C, even for inputs scaled by 1e3 (every sample clipped hard)."""
import pytest
import torch
from helpers import sq_loss
from reference import per_sample_reference
from torch import nn

import fxclip

C = 0.5


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)


class ConvGN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.conv(x))).mean((2, 3)))


class EmbAttn(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(self.attn(h, h, h, need_weights=False)[0])


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.mid = nn.Linear(6, 6)
        self.lm_head = nn.Linear(6, 11, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.mid(self.emb(ids))))


class BilinearNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bilinear = nn.Bilinear(4, 4, 3)

    def forward(self, x):
        return self.bilinear(x, torch.tanh(self.lin(x)))


def _inputs(name, B):
    if name in ("emb_attn", "tied_lm"):
        return torch.randint(0, 11, (B, 5))
    if name == "conv_gn":
        return torch.randn(B, 2, 5, 5, dtype=torch.float64) * 1e3
    return torch.randn(B, 4, dtype=torch.float64) * 1e3


MODELS = {"mlp": MLP, "conv_gn": ConvGN, "emb_attn": EmbAttn, "tied_lm": TiedLM, "bilinear": BilinearNet}


def _clipped_sum(model, pm, x, y):
    model.zero_grad()
    sq = (pm(x) - y).square()
    sq.reshape(sq.shape[0], -1).sum(1).sum().backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_removing_one_sample_moves_the_clipped_sum_by_at_most_C(name):
    torch.manual_seed(1)
    model = MODELS[name]().double()
    pm = fxclip.privatize(model, max_grad_norm=C, loss_reduction="sum")
    B = 5
    x = _inputs(name, B)
    out_shape = model(x).shape
    y = torch.randn(out_shape, dtype=torch.float64) * 1e3
    full = _clipped_sum(model, pm, x, y)
    # exact against vanilla per-sample gradients (torch.func), clipped by hand
    expected, norms = per_sample_reference(model, (x,), y, sq_loss, C, "sum")
    got = {n: p.grad for n, p in model.named_parameters()}
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], atol=1e-9, rtol=1e-6, msg=n)
    assert (norms > C).all()  # every sample is clipped: the audit is not vacuous
    for i in range(B):
        keep = [j for j in range(B) if j != i]
        without = _clipped_sum(model, pm, x[keep], y[keep])
        assert (full - without).norm() <= C * (1 + 1e-9)
