"""Augmentation multiplicity (docs/privacy-units.md): each sample appears k times with different
augmentations and the k gradients are averaged before clipping, so the unit is still the sample
and its sensitivity is C however large k is. Two recipes, each run over several steps with
changing batch sizes, eager and compiled, exact in float64 against torch.func:

- copies as rows: the k copies are rows of the batch (anywhere in it) with the sample's id,
  `pm(x, target=y, privacy_unit=ids)` with unit_reduction="mean";
- copies inside the row: a batch (n, k, ...) whose model averages over the copies itself; the
  model may then mix the copies of one sample freely (attend across them), never two samples.
"""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import D, sq_loss, unit_clipped_sum
from reference import per_sample_reference, per_unit_reference
from torch import nn

import fxclip

C = 0.4


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).to(D)


def augment(x, k, g):
    """k augmented copies of each row: noise and a random scale."""
    n = x.shape[0]
    scale = 1 + 0.3 * torch.randn(n, k, 1, dtype=D, generator=g)
    return x[:, None] * scale + 0.2 * torch.randn(n, k, x.shape[1], dtype=D, generator=g)


def row_losses(out, y):
    return (out - y).square().sum(-1)


@pytest.mark.parametrize("compiled", [False, True])
def test_copies_as_rows_are_exact_over_a_run(compiled):
    model = net()
    oracle = copy.deepcopy(model)
    pm = fxclip.privatize(model, max_grad_norm=C, loss_reduction="sum", loss_fn=row_losses, unit_reduction="mean")
    run = torch.compile(pm) if compiled else pm
    g = torch.Generator().manual_seed(0)
    for n, k in ((4, 3), (6, 3), (3, 5), (5, 2)):
        x, y = torch.randn(n, 5, dtype=D, generator=g) * 2, torch.randn(n, 3, dtype=D, generator=g)
        order = torch.randperm(n * k, generator=g)  # a sample's copies spread through the batch
        rows = augment(x, k, g).reshape(n * k, 5)[order]
        ids = torch.arange(n).repeat_interleave(k)[order]
        targets = y.repeat_interleave(k, 0)[order]
        model.zero_grad(set_to_none=True)
        run(rows, target=targets, privacy_unit=ids).sum().backward()
        expected, norms = per_unit_reference(oracle, (rows,), targets, sq_loss, C, ids, "sum", "mean")
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-9, atol=1e-12, msg=f"n={n} k={k} {name}")
        assert (norms > C).any()
        assert pm.read_state()["units"] == n
        pm.reset_state()


@pytest.mark.parametrize("k", [1, 2, 8, 32])
def test_a_samples_sensitivity_is_C_for_any_multiplicity(k):
    """Removing one sample (all k of its copies) moves the clipped sum by at most C, and by
    nearly C for some draws: k copies never multiply the sensitivity."""
    model = net()
    pm = fxclip.privatize(model, max_grad_norm=C, loss_reduction="sum", loss_fn=row_losses, unit_reduction="mean")
    g = torch.Generator().manual_seed(k)

    worst = 0.0
    for _ in range(12):
        n = int(torch.randint(2, 6, (), generator=g))
        x, y = torch.randn(n, 5, dtype=D, generator=g) * 4, torch.randn(n, 3, dtype=D, generator=g) * 6
        order = torch.randperm(n * k, generator=g)
        rows, ids = augment(x, k, g).reshape(n * k, 5)[order], torch.arange(n).repeat_interleave(k)[order]
        targets = y.repeat_interleave(k, 0)[order]
        keep = ids != int(torch.randint(0, n, (), generator=g))
        diff = (unit_clipped_sum(model, pm, rows, targets, ids)
                - unit_clipped_sum(model, pm, rows[keep], targets[keep], ids[keep]))
        worst = max(worst, float(diff.norm()))
    assert C * 0.5 < worst <= C * (1 + 1e-9), worst


class CopiesInRow(nn.Module):
    """A batch (n, k, 5): the k copies of a sample attend to each other (mixing inside the sample),
    each copy is classified, and the logits are averaged over the copies."""

    def __init__(self):
        super().__init__()
        self.inp, self.qk, self.head = nn.Linear(5, 8), nn.Linear(8, 16), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))                     # (n, k, 8)
        q, kk = self.qk(h).chunk(2, -1)
        att = torch.softmax(q @ kk.transpose(1, 2), -1)  # (n, k, k): across the copies of one sample
        h = h + att @ h
        flat = h.reshape(-1, 8)                          # (n k, 8): copies as rows of one matrix
        return self.head(flat).view(x.shape[0], x.shape[1], 3).mean(1)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_copies_inside_the_row_may_mix_and_are_exact(compiled):
    torch.manual_seed(0)
    model = CopiesInRow().to(D)
    oracle = copy.deepcopy(model)
    pm = fxclip.privatize(model, max_grad_norm=C, loss_reduction="mean", loss_fn=row_losses)
    run = torch.compile(pm) if compiled else pm
    g = torch.Generator().manual_seed(1)
    for n in (4, 7, 3, 5):
        x, y = torch.randn(n, 5, dtype=D, generator=g) * 2, torch.randn(n, 3, dtype=D, generator=g) * 3
        batch = augment(x, 4, g)
        model.zero_grad(set_to_none=True)
        run(batch, target=y).mean().backward()
        expected, norms = per_sample_reference(oracle, (batch,), y, sq_loss, C)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-9, atol=1e-12, msg=f"n={n} {name}")
        torch.testing.assert_close(pm.per_sample_norms, norms, rtol=1e-9, atol=1e-12)
        assert (norms > C).any()
        pm.reset_state()
    rules = {r.name: r.rule for r in pm.last_report.params}
    assert all(rules[f"{m}.weight"] == "linear" for m in ("inp", "qk", "head")), rules  # no fallback
