"""Minimal reproductions of the fxclip problems the benchmark sweep found.

    python -m bench.repro_fxclip [embedding|sdpa|eager_maxpool|all]

Each case prints OK or what went wrong, compared with a float64 torch.func reference
(sum over samples of clipped per-sample gradients, C = 1.0, loss_reduction="sum").
"""

from __future__ import annotations

import copy
import sys
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F

from .configs import reference_grads
from .models import PerSampleCE
from .worker import _rel


def _run(name, model, x, y, compiled):
    import fxclip

    m = copy.deepcopy(model)
    pm = fxclip.privatize(m, max_grad_norm=1.0, loss_reduction="sum")
    f = torch.compile(pm, dynamic=False) if compiled else pm
    try:
        PerSampleCE("sum")(f(x), y).backward()
    except Exception as e:
        frames = [ln for ln in traceback.format_exc().splitlines() if "fxclip" in ln or "passes" in ln]
        msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        print(f"[{name}] {'compiled' if compiled else 'eager'}: FAILS: {msg}")
        for ln in frames[-6:]:
            print("      ", ln.strip())
        return
    clipped, _, norms = reference_grads(model, x, y)
    per = {n: _rel([p.grad], [c]) for (n, p), c in zip(m.named_parameters(), clipped)}
    total = _rel([p.grad for p in m.parameters()], clipped)
    nerr = float((pm.per_sample_norms.double() - norms).abs().max() / norms.max())
    ok = total < 1e-4 and nerr < 1e-4
    rep = getattr(pm, "last_report", None)
    routes = [(r.name, r.rule) for r in rep.params] if rep is not None else "?"
    print(f"[{name}] {'compiled' if compiled else 'eager'}: {'OK' if ok else 'WRONG GRADIENTS'} "
          f"rel.err total {total:.1e}, norms {nerr:.1e}; per param "
          + ", ".join(f"{k} {v:.1e}" for k, v in per.items()) + f"; routes {routes}")


class EmbHead(nn.Module):
    def __init__(self, vocab=50, d=16, tied=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(self.emb(idx))


class Attn(nn.Module):
    def __init__(self, d=32, h=4):
        super().__init__()
        self.h = h
        self.q = nn.Linear(d, d)
        self.o = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q = self.q(x).view(b, t, self.h, d // self.h).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


def case_embedding():
    """nn.Embedding under torch.compile: wrong per-sample gradients (eager path is right)."""
    torch.manual_seed(0)
    for tied in (False, True):
        m = EmbHead(tied=tied)
        x, y = torch.randint(0, 50, (4, 8)), torch.randint(0, 50, (4, 8))
        for compiled in (False, True):
            _run(f"embedding{' tied' if tied else ''}", m, x, y, compiled)


def case_sdpa():
    """Linear q/o around F.scaled_dot_product_attention: the fallback's per-sample replay fails on a view."""
    torch.manual_seed(0)
    m = Attn()
    x = torch.randn(2, 5, 32)
    y = torch.randint(0, 32, (2, 5))
    for compiled in (False, True):
        _run("sdpa", m, x, y, compiled)


def case_eager_maxpool():
    """Eager path (no torch.compile anywhere in the process): max_pool2d's Inductor decomposition
    needs torch._inductor.lowering, which nothing imported. Run this case in a FRESH process."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 10))
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))
    _run("eager maxpool", m, x, y, compiled=False)


CASES = {"eager_maxpool": case_eager_maxpool, "embedding": case_embedding, "sdpa": case_sdpa}

if __name__ == "__main__":
    torch.set_num_threads(2)
    which = sys.argv[1:] or ["all"]
    for k, fn in CASES.items():
        if "all" in which or k in which:
            fn()
