"""Poisson batches change size every step: one static graph, then one dynamic graph for every
other size, never a recompile per size (Dynamo refuses a function after 8 recompiles). Exact
against torch.func at every step; a route that still fixes the batch size says so."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from helpers import D, run_steps

import fxclip

# more distinct sizes than Dynamo's recompile limit (8): a graph per size would be refused
SIZES = tuple(range(2, 12))


class Convs(nn.Module):
    """A convolution, a grouped one and a transposed one: per-sample weight gradients
    instantiated (tiny layers), which with a static batch size are one grouped convolution."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.g = nn.Conv2d(4, 4, 3, groups=2, padding=1)
        self.t = nn.ConvTranspose2d(4, 2, 2, stride=2)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        h = self.t(torch.tanh(self.g(torch.tanh(self.c(x)))))
        return self.fc(h.mean((2, 3)))


def test_convolutions_keep_one_dynamic_graph_over_many_sizes(model_costs):
    routes = run_steps(Convs(), lambda b: (torch.randn(b, 3, 6, 6, dtype=D),), sizes=SIZES)
    for name in ("c.weight", "g.weight", "t.weight"):
        assert (routes[name].rule, routes[name].strategy) == ("conv", "instantiate"), routes[name]


class StridedSlice(nn.Module):
    """x[:, ::2] in the backward of a parameter that takes the fallback: slice_scatter with a
    step, whose batching rule needs the batch size as a number."""

    def __init__(self):
        super().__init__()
        self.v = nn.Parameter(torch.randn(6, 8) * 0.1)

    def forward(self, x):
        return (x @ torch.exp(self.v))[:, ::2]


def test_a_route_that_fixes_the_batch_size_says_so():
    model = StridedSlice().to(D)
    pm = fxclip.privatize(model, max_grad_norm=1.0)
    for b, warned in ((4, False), (3, True)):  # the static graph has no size to fix
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pm(torch.randn(b, 6, dtype=D)).sum().backward()
        messages = [str(w.message) for w in caught if "fixed the batch size" in str(w.message)]
        assert bool(messages) == warned, messages
    assert "parameter 'v' (fallback)" in messages[0] and "pad_to_multiple" in messages[0]
    assert pm.last_report.batch_size == "3"


@pytest.mark.slow
def test_compiled_convolutions_keep_one_dynamic_graph(model_costs):
    routes = run_steps(Convs(), lambda b: (torch.randn(b, 3, 6, 6, dtype=D),), sizes=(4, 3, 5), compiled=True)
    assert routes["t.weight"].rule == "conv"
