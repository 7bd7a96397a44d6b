"""Architectures that keep samples apart must train, not be refused: time-first stacks of
per-step states, recurrent layers (frozen or trainable), an empty batch ending in LayerNorm.
Tracing failures and refusals name the user's line or module and what to change."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from helpers import LAST, D, check_against_loop, run_check

import fxclip
from fxclip.passes import rule_counters

# --- 4. per-step states stacked time-first ---

class TimeFirstRecurrence(nn.Module):
    """A Linear-cell recurrence whose states are stacked (or concatenated) along dim 0."""

    def __init__(self, join):
        super().__init__()
        self.inp, self.cell, self.out = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.join = join

    def forward(self, x):
        h = torch.tanh(self.inp(x[:, 0]))
        states = [h]
        for t in range(1, x.shape[1]):
            h = torch.tanh(self.inp(x[:, t]) + self.cell(h))
            states.append(h)
        T, B = len(states), x.shape[0]
        if self.join == "stack":
            steps = torch.stack(states, 0)  # (T, B, 8)
        else:
            steps = torch.cat(states, 0).reshape(T, B, 8)  # (T * B, 8): pieces each carry the batch
        return self.out(steps).transpose(0, 1)


@pytest.mark.parametrize("join,compiled", [("stack", False), ("cat", False),
                                           pytest.param("stack", True, marks=pytest.mark.slow)])
def test_time_first_stack_of_states_is_per_sample(join, compiled):
    routes = run_check(TimeFirstRecurrence(join), (torch.randn(4, 3, 4, dtype=D),), compiled=compiled)
    assert routes["out.weight"].rule == "linear" and routes["cell.weight"].rule == "linear"


def test_cat_along_the_batch_with_a_shared_row_is_still_refused():
    class AddsRow(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.row = nn.Linear(3, 4), nn.Parameter(torch.randn(1, 4))

        def forward(self, x):
            h = torch.cat([self.a(x), self.row], 0)  # a row that belongs to no sample
            return (h - h.mean(0)).narrow(0, 0, x.shape[0])

    with pytest.raises(fxclip.PrivacyError, match="aten::cat.*mixes samples"):
        fxclip.privatize(AddsRow(), max_grad_norm=1.0)(torch.randn(4, 3)).sum().backward()


# --- 6. recurrent layers: frozen next to trainable layers, and trainable, untouched ---

class Recurrent(nn.Module):
    def __init__(self, kind, trainable):
        super().__init__()
        self.rnn, self.head = kind(4, 8, batch_first=True), nn.Linear(8, 2)
        self.rnn.requires_grad_(trainable)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


@pytest.mark.parametrize("kind,trainable,compiled", [
    (nn.LSTM, False, False), (nn.LSTM, True, False), (nn.GRU, True, False), (nn.RNN, True, False),
    pytest.param(nn.GRU, True, True, marks=pytest.mark.slow)])
def test_recurrent_layers_are_clipped_exactly(kind, trainable, compiled):
    routes = check_against_loop(Recurrent(kind, trainable), (torch.randn(4, 3, 4, dtype=D),), compiled)
    if trainable:
        assert routes["rnn.weight_ih_l0"] == "linear" and routes["rnn.weight_hh_l0"] == "linear"
        hidden = LAST["report"].route("rnn.weight_hh_l0")  # one use per step, h0 = 0 included
        assert hidden.uses == 3 and hidden.shapes["uses"] == "3 stacked: one Gram over 3 rows"


class SharedDepth(nn.Module):
    """One layer applied at every depth (ALBERT, Universal Transformer): 6 uses."""

    def __init__(self, width):
        super().__init__()
        self.inp, self.layer, self.out = nn.Linear(4, width), nn.Linear(width, width), nn.Linear(width, 2)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for _ in range(6):
            h = h + torch.tanh(self.layer(h))
        return self.out(h)


@pytest.mark.parametrize("width,method", [(64, "Gram"), (4, "per-sample bmm")])
def test_weight_reused_many_times_is_one_stacked_linear_op(width, method):
    before = rule_counters["fallback"]
    routes = run_check(SharedDepth(width), (torch.randn(4, 3, 4, dtype=D),))
    layer = routes["layer.weight"]
    assert layer.rule == "linear" and layer.uses == 6 and rule_counters["fallback"] == before
    assert layer.shapes["uses"] == f"6 stacked: one {method} over 18 rows"
    assert layer.strategy == ("ghost" if method == "Gram" else "instantiate")


def test_packed_sequence_input_is_named():
    model = nn.LSTM(4, 8, batch_first=True)
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(3, 5, 4), [5, 3, 2], batch_first=True)
    with pytest.raises(fxclip.PrivacyError, match="PackedSequence.*padded batch"):
        fxclip.privatize(model, max_grad_norm=1.0)(packed)


# --- 7. an empty batch whose last layer's gradient is a constant zero ---

def test_empty_batch_ending_in_layer_norm_gives_zero_gradients():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    pm = fxclip.privatize(model, max_grad_norm=1.0, loss_reduction="sum")
    pm(torch.randn(0, 3)).sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    assert pm.per_sample_norms.shape == (0,)


# --- 8, 9. tracing failures name the line; refusals name the module and the cause ---

class SetsRequiresGrad(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 2)

    def forward(self, x):
        h = self.l(x)
        h.requires_grad = True
        return h


class ExpertLoop(nn.Module):
    """Mixture-of-Experts routing with a loop over the experts the batch hit."""

    def __init__(self):
        super().__init__()
        self.gate, self.experts = nn.Linear(4, 3), nn.ModuleList(nn.Linear(4, 2) for _ in range(3))

    def forward(self, x):
        route = self.gate(x).argmax(-1)
        out = x.new_zeros(x.shape[0], 2)
        expert_hit = torch.unique(route)
        for expert_idx in expert_hit:
            hit = route == expert_idx
            out[hit] = self.experts[int(expert_idx)](x[hit])
        return out


def test_setting_requires_grad_in_forward_names_the_line():
    with pytest.raises(fxclip.PrivacyError, match=r"sets `requires_grad`.*test_breadth_models.py:\d+ "
                                                  r"in forward: `h.requires_grad = True`"):
        fxclip.privatize(SetsRequiresGrad(), max_grad_norm=1.0)(torch.randn(4, 4))


def test_data_dependent_loop_is_a_privacy_error_naming_the_loop():
    with pytest.raises(fxclip.PrivacyError, match=r"control flow.*`for expert_idx in expert_hit:`"
                                                  r".*depends on tensor values.*masks"):
        fxclip.privatize(ExpertLoop(), max_grad_norm=1.0)(torch.randn(4, 4))


def test_instance_norm_running_stats_are_named():
    model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.InstanceNorm1d(4, affine=True, track_running_stats=True))
    with pytest.raises(fxclip.PrivacyError, match=r"module '1' \(InstanceNorm1d\) updates its running "
                                                  r"statistics \(running_mean") as info:
        fxclip.privatize(model, max_grad_norm=1.0)(torch.randn(4, 3, 6)).sum().backward()
    assert "primals" not in str(info.value)


@pytest.mark.parametrize("make", [lambda: nn.Embedding(10, 4, max_norm=1.0),
                                  lambda: nn.EmbeddingBag(10, 4, max_norm=1.0)])
def test_embedding_max_norm_is_named(make):
    with pytest.raises(fxclip.PrivacyError, match="max_norm=1.0 renormalizes rows of the weight in place"):
        fxclip.privatize(nn.Sequential(make()), max_grad_norm=1.0)


def test_fused_recurrent_op_is_refused_by_name():
    """Where a platform runs nn.LSTM as one fused op (cuDNN), the refusal names it and says
    where its cell ops are traced instead (a hand-built graph: this CPU build never fuses)."""
    from fxclip.passes.layout import UNKNOWN, Layout
    from fxclip.passes.mixing import check_batch_independence

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    fused = graph.call_function(torch.ops.aten._cudnn_rnn.default, (x,))
    fused.meta["nn_module_stack"] = {"r": ("L['self'].module.rnn", nn.LSTM)}
    with pytest.raises(fxclip.PrivacyError, match=r"module 'rnn' \(LSTM\).*one fused op.*cuDNN off"):
        check_batch_independence(graph, {x: Layout(0), fused: UNKNOWN}, {x, fused})
