"""The loss inside the proof (privatize(loss_fn=...)) and inputs in any memory layout."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import mlp, mlp_data, sq_loss
from reference import per_sample_reference
from torch import nn

import fxclip


def _per_sample_ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def contrastive(out, y):
    return -F.log_softmax(out @ out.T, 1).diagonal()


def batch_centered(out, y):
    return ((out - out.mean(0)) ** 2).sum(1)


# --- mixing losses are refused by name -----------------------------------------------------------

@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("loss,op", [(contrastive, "aten::mm"), (batch_centered, "aten::mean")])
def test_a_loss_that_mixes_samples_is_refused_naming_op_and_line(loss, op, compiled):
    model = mlp(4)
    pm = fxclip.privatize(model, max_grad_norm=0.5, loss_fn=loss)
    x, y = mlp_data(6, classes=4)
    with pytest.raises(fxclip.PrivacyError, match=rf"{op}.*loss_fn.*test_loss_fn.py, line \d+"):
        (torch.compile(pm) if compiled else pm)(x, target=y).sum().backward()
    assert all(p.grad is None for p in model.parameters())


# --- per-sample losses are exact ------------------------------------------------------------------

def _lm():
    torch.manual_seed(0)

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 8)
            self.mix = nn.Linear(8, 8)
            self.head = nn.Linear(8, 11)

        def forward(self, ids):
            return self.head(torch.tanh(self.mix(self.emb(ids))))

    return LM().double()


def _token_mean(logits, labels):
    """Causal-LM loss of each sequence: mean over its own non-ignored next tokens."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                          reduction="none").view(labels.shape)
    keep = (labels != -100).to(tok.dtype)
    return (tok * keep).sum(1) / keep.sum(1).clamp(min=1)


def _smooth(out, y):
    return F.cross_entropy(out, y, reduction="none", label_smoothing=0.1)


def _regression(out, y):
    return F.smooth_l1_loss(out, y, reduction="none").sum(1)


def _cases():
    ids = torch.randint(0, 11, (5, 7), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[1, 4:] = -100
    labels[3, :2] = -100
    x, y = mlp_data(5, classes=4)
    return {
        "cross_entropy": (lambda: mlp(4), x, y, _per_sample_ce),
        "token_lm_ignore_index": (_lm, ids, labels, _token_mean),
        "label_smoothing": (lambda: mlp(4), x, y, _smooth),
        "regression": (lambda: mlp(3), x, torch.randn(5, 3, dtype=torch.float64), _regression),
    }


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", sorted(_cases()))
def test_per_sample_losses_are_accepted_and_exact(case, reduction):
    build, x, y, loss = _cases()[case]
    model = build()
    pm = fxclip.privatize(model, max_grad_norm=0.05, loss_reduction=reduction, loss_fn=loss)
    losses = pm(x, target=y)
    assert losses.shape == (x.shape[0],)
    getattr(losses, reduction)().backward()
    one = lambda out, t: loss(out, t).sum()  # noqa: E731  the loss of a batch of one
    ref, norms = per_sample_reference(model, (x,), y, one, 0.05, reduction)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-9, atol=1e-12, msg=n)
    torch.testing.assert_close(pm.per_sample_norms, norms)
    assert pm.check_step()["bad_seed"] == 0
    assert pm.last_report.loss_checked


@pytest.mark.slow
def test_compiled_token_loss_is_exact():
    build, x, y, loss = _cases()["token_lm_ignore_index"]
    model = build()
    cpm = torch.compile(fxclip.privatize(model, max_grad_norm=0.05, loss_fn=loss))
    cpm(x, target=y).mean().backward()
    ref, _ = per_sample_reference(model, (x,), y, lambda o, t: loss(o, t).sum(), 0.05)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-9, atol=1e-12, msg=n)


@pytest.mark.parametrize("case", ["cross_entropy", "token_lm_ignore_index"])
def test_accepted_losses_keep_the_sensitivity_bound(case):
    """Drop any one sample: the clipped gradient sum moves by at most C."""
    build, x, y, loss = _cases()[case]
    x = x * 1e3 if x.is_floating_point() else x
    c = 0.05

    def clipped_sum(keep):
        model = build()
        pm = fxclip.privatize(model, max_grad_norm=c, loss_reduction="sum", loss_fn=loss)
        pm(x[keep], target=y[keep]).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    full = clipped_sum(list(range(x.shape[0])))
    for drop in range(x.shape[0]):
        rest = [i for i in range(x.shape[0]) if i != drop]
        assert float((full - clipped_sum(rest)).norm()) <= c * (1 + 1e-9)


# --- only a plain sum or mean may follow outside ------------------------------------------------

@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("reduce", ["weighted_by_batch", "scaled", "mean_declared_sum"])
def test_a_reduction_other_than_the_declared_sum_or_mean_is_refused_at_the_step(reduce, compiled):
    model = mlp(4)
    before = copy.deepcopy(model.state_dict())
    reduction = "sum" if reduce == "mean_declared_sum" else "mean"
    pm = fxclip.privatize(model, max_grad_norm=0.5, loss_reduction=reduction, loss_fn=_per_sample_ce)
    opt = fxclip.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), pm, noise_multiplier=0.0,
                             expected_batch_size=6)
    x, y = mlp_data(6, classes=4)
    losses = (torch.compile(pm) if compiled else pm)(x, target=y)
    if reduce == "weighted_by_batch":  # each weight depends on the other samples
        (losses * torch.softmax(losses.detach(), 0)).sum().backward()
    elif reduce == "scaled":
        (losses.mean() * 3).backward()
    else:
        losses.mean().backward()
    with pytest.raises(fxclip.PrivacyError, match=rf"losses.{reduction}\(\).*no parameter changed"):
        opt.step()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --- without loss_fn: unchecked, and said so -----------------------------------------------------

def test_without_loss_fn_the_loss_is_unchecked_and_a_warning_says_so():
    model = mlp(4)
    pm = fxclip.privatize(model, max_grad_norm=0.5)
    x, y = mlp_data(6, classes=4)
    with pytest.warns(UserWarning, match="computed outside it.*loss_fn"):
        F.cross_entropy(pm(x), y).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per privatized module
        F.cross_entropy(pm(x), y).backward()
    assert not pm.last_report.loss_checked
    assert "unchecked" in str(fxclip.explain(model, x))


def test_make_private_takes_loss_fn():
    from torch.utils.data import DataLoader, TensorDataset

    model = mlp(4)
    x, y = mlp_data(20, classes=4)
    pm, opt, loader = fxclip.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                          DataLoader(TensorDataset(x, y), batch_size=5),
                                          noise_multiplier=1.0, max_grad_norm=0.5, loss_fn=_per_sample_ce)
    for xb, yb in loader:
        opt.zero_grad()
        pm(xb, target=yb).mean().backward()
        opt.step()
    assert pm.loss_fn is _per_sample_ce and opt.steps == len(loader)


def test_loss_fn_must_return_per_sample_losses():
    pm = fxclip.privatize(mlp(4), max_grad_norm=0.5, loss_fn=lambda o, t: F.cross_entropy(o, t))
    x, y = mlp_data(6, classes=4)
    with pytest.raises(fxclip.PrivacyError, match=r"shape \(B,\)"):
        pm(x, target=y)


# --- inputs in any memory layout ------------------------------------------------------------------

class _SeqConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 8)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, seq, img):
        h = torch.tanh(self.lin(seq)).mean(1)
        return self.head(h) + self.conv(img).mean((1, 2, 3))[:, None]


def _layouts():
    g = torch.Generator().manual_seed(3)
    seq = torch.randn(8, 5, 6, dtype=torch.float64, generator=g)
    img = torch.randn(8, 2, 6, 6, dtype=torch.float64, generator=g)
    return {
        "contiguous": (seq[:4].clone(), img[:4].clone()),
        "step_sliced": (seq[::2], img[::2]),
        "expanded": (seq[:1].expand(4, -1, -1), img[:1].expand(4, -1, -1, -1)),
        "batch_strided": (seq.transpose(0, 1).contiguous().transpose(0, 1)[:4], img[:4]),
        "channels_last": (seq[:4], img[:4].contiguous(memory_format=torch.channels_last)),
        "requires_grad": (seq[:4].clone().requires_grad_(), img[:4].clone().requires_grad_()),
    }


@pytest.mark.parametrize("compiled", [False, True])
def test_inputs_in_any_layout_give_the_same_clipped_gradients(compiled):
    torch.manual_seed(0)
    model = _SeqConv().double()
    pm = fxclip.privatize(model, max_grad_norm=0.05, loss_reduction="sum")
    run = torch.compile(pm) if compiled else pm
    y = torch.randn(4, 2, dtype=torch.float64)

    for name, (seq, img) in _layouts().items():
        model.zero_grad()
        sq_loss(run(seq, img), y).backward()
        ref, _ = per_sample_reference(model, (seq.detach().contiguous(), img.detach().contiguous()), y,
                                      sq_loss, 0.05, "sum")
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-9, atol=1e-12, msg=f"{name}: {n}")
        if name == "requires_grad":  # input gradients are the plain ones (data, not parameters)
            s, i = seq.detach().clone().requires_grad_(), img.detach().clone().requires_grad_()
            want = torch.autograd.grad(sq_loss(model(s, i), y), [s, i])
            torch.testing.assert_close(seq.grad, want[0])
            torch.testing.assert_close(img.grad, want[1])
