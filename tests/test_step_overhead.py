"""The per-step fixed costs: what the traced forward reads (few Dynamo guards), and the clipped
sum over the expected batch size a DPOptimizer gets straight from the graph (no gradient hook, no
extra gradient-sized tensor, no pass over the gradients to divide them)."""
import pytest
import torch
import torch.nn.functional as F
from reference import per_sample_reference
from test_real_training import _data, _mlp

import fxclip
from fxclip.passes.report import rule_counters

C = 0.3


def _assert_grads(model, ref):
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-9, atol=1e-12, msg=n)
        else:
            assert p.grad is None, n


@pytest.mark.parametrize("compiled", [False, True])
def test_a_flipped_requires_grad_respecializes_the_graph(compiled):
    model = _mlp()
    pm = fxclip.privatize(model, max_grad_norm=C, loss_reduction="sum")
    run = torch.compile(pm) if compiled else pm
    x, y = _data()
    # trainable, then the first layer's weight frozen, then trainable again
    for frozen in ((), ("0.weight",), ()):
        for n, p in model.named_parameters():
            p.requires_grad_(n not in frozen)
            p.grad = None
        F.cross_entropy(run(x), y, reduction="sum").backward()
        ref, _ = per_sample_reference(model, (x,), y, F.cross_entropy, C, loss_reduction="sum")
        _assert_grads(model, ref)
        if compiled:  # the graph's own report: the one of these trainable parameters
            report = pm.last_report
            assert report is not None and report.frozen == list(frozen)
            assert sorted(r.name for r in report.params) == sorted(
                n for n, p in model.named_parameters() if p.requires_grad)


def _expected_sum(model, x, y):
    ref, _ = per_sample_reference(model, (x,), y, F.cross_entropy, C, loss_reduction="sum")
    return ref


@pytest.mark.parametrize("compiled", [False, True])
def test_an_owning_dp_optimizer_gets_its_update_sum_from_the_graph_itself(compiled):
    """loss_reduction="mean": while a DPOptimizer owns the module, the backward leaves
    sum_i R_i grad_i / expected_batch_size (each backward scaled by its own B over the expected
    one, micro-batches of different sizes), with no gradient hook (a hook's grad * B is a second
    gradient-sized tensor per parameter) and no pass over the gradients in the step to divide
    them; a changed expected batch size holds from the next backward, without a recompile;
    without an owner, or after remove_hooks(), it leaves the mean."""
    model = _mlp()
    pm = fxclip.privatize(model, max_grad_norm=C, loss_reduction="mean")
    run = torch.compile(pm) if compiled else pm
    x, y = _data(b=7)
    F.cross_entropy(run(x), y).backward()
    _assert_grads(model, {n: g / 7 for n, g in _expected_sum(model, x, y).items()})
    rewrites = sum(rule_counters.values())

    opt = fxclip.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), pm, noise_multiplier=0.0,
                             expected_batch_size=5)
    assert all(not p._backward_hooks for p in model.parameters())
    opt.zero_grad()
    F.cross_entropy(run(x), y).backward()
    _assert_grads(model, {n: g / 5 for n, g in _expected_sum(model, x, y).items()})
    assert sum(rule_counters.values()) == rewrites  # a runtime value: the same graph, no rewrite
    opt.zero_grad()
    for xb, yb in zip(x.split([3, 4]), y.split([3, 4])):
        F.cross_entropy(run(xb), yb).backward()
    _assert_grads(model, {n: g / 5 for n, g in _expected_sum(model, x, y).items()})
    opt.expected_batch_size = 6
    opt.zero_grad()
    F.cross_entropy(run(x), y).backward()
    expected = _expected_sum(model, x, y)
    _assert_grads(model, {n: g / 6 for n, g in expected.items()})
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()  # sigma = 0: the update is the clipped sum / 6 as it stands
    for p, w, (n, g) in zip(model.parameters(), before, expected.items()):
        torch.testing.assert_close(w - p.detach(), 0.1 * g / 6, rtol=1e-9, atol=1e-12, msg=n)
    assert pm.read_state()["owners"] == 1
    opt.zero_grad()  # resetting the counts keeps the owner
    assert pm.read_state()["owners"] == 1

    opt.remove_hooks()
    F.cross_entropy(run(x), y).backward()
    _assert_grads(model, {n: g / 7 for n, g in _expected_sum(model, x, y).items()})
