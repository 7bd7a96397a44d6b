"""Random small models: one batch-mixing op inserted anywhere is always refused; models built
from per-sample ops only are never refused (eager path; few examples under the CI profile)."""
import pytest
import torch
from helpers import Lambda
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxclip

D = 4
PER_SAMPLE = {
    "linear": lambda: nn.Linear(D, D),
    "tanh": lambda: nn.Tanh(),
    "layernorm": lambda: nn.LayerNorm(D),
    "softmax": lambda: Lambda(lambda h: h.softmax(-1)),
    "cumsum": lambda: Lambda(lambda h: h.cumsum(-1)),
    "sort": lambda: Lambda(lambda h: h.sort(-1).values),
    "flip": lambda: Lambda(lambda h: h.flip(-1)),
    "cat": lambda: Lambda(lambda h: torch.cat([h, 2 * h], -1)[:, :D]),
    "gelu": lambda: nn.GELU(),
    "scale": lambda: Lambda(lambda h: h * torch.arange(D, dtype=h.dtype)),
}
MIXING = {
    "mean0": lambda h: h - h.mean(0, keepdim=True),
    "batchnorm": None,
    "cumsum0": lambda h: h.cumsum(0),
    "sort0": lambda h: h.sort(0).values,
    "flip0": lambda h: h.flip(0),
    "gram": lambda h: h @ (h.t() @ h),
    "first": lambda h: h + h[0],
    "max0": lambda h: h + h.max(0).values,
    "sum_all": lambda h: h + h.sum(),
    "topk0": lambda h: h + h.topk(1, 0).values,
}


def build(blocks, mixer=None, at=0):
    layers = [nn.Linear(3, D)] + [PER_SAMPLE[b]() for b in blocks]
    if mixer is not None:
        layers.insert(1 + at, nn.BatchNorm1d(D) if mixer == "batchnorm" else Lambda(MIXING[mixer]))
    return nn.Sequential(*layers, nn.Linear(D, 2))


blocks_st = st.lists(st.sampled_from(sorted(PER_SAMPLE)), min_size=0, max_size=4)


@settings(max_examples=8, deadline=None)
@given(blocks=blocks_st, mixer=st.sampled_from(sorted(MIXING)), at=st.integers(0, 4),
       batch=st.integers(2, 6))
def test_any_inserted_mixing_op_is_refused(blocks, mixer, at, batch):
    model = build(blocks, mixer, min(at, len(blocks)))
    pm = fxclip.privatize(model, max_grad_norm=1.0)
    with pytest.raises(fxclip.PrivacyError, match="mixes samples"):
        pm(torch.randn(batch, 3)).square().sum().backward()
    assert all(p.grad is None for p in model.parameters())


@settings(max_examples=8, deadline=None)
@given(blocks=blocks_st, batch=st.integers(1, 6))
def test_per_sample_models_are_never_refused(blocks, batch):
    model = build(blocks)
    pm = fxclip.privatize(model, max_grad_norm=1.0)
    pm(torch.randn(batch, 3)).square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
