"""Helpers the test files share: losses, a small MLP and its data, wrapper modules, and the
one-step checks against the oracles in reference.py (torch.func per-sample gradients) or a loop
of one backward per sample. Import them (`from helpers import run_check`); tests/README.md lists
what each is for. Each check keeps the tolerance it had where it was first written."""
from __future__ import annotations

import copy

import torch
from reference import per_sample_reference
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fxclip

D = torch.float64


# --- losses ---

def sq_loss(out, y):
    """One sample's loss for the oracles: its summed squared error."""
    return (out - y).square().sum()


def mse(o, t):
    """A batch's loss: the mean over samples of each sample's summed squared error."""
    return ((o - t) ** 2).sum(tuple(range(1, o.dim()))).mean()


def batch_loss(out, y, reduction):
    """The batch's loss whose per-sample terms are sq_loss: their mean or their sum."""
    per_sample = (out - y).square().reshape(out.shape[0], -1).sum(1)
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


# --- a small model and its data ---

class MaskedBag(nn.Module):
    """Token embeddings, averaged over the unpadded tokens (attention_mask), a hidden layer, a head."""

    def __init__(self):
        super().__init__()
        self.emb, self.hidden, self.head = nn.Embedding(30, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).to(self.emb.weight.dtype)
        pooled = (self.emb(input_ids) * m).sum(1) / m.sum(1).clamp(min=1)
        return self.head(torch.tanh(self.hidden(pooled)))


def masked_rows(n=24, seed=0):
    """MaskedBag's data: token ids right-padded with an attention mask, float64 targets."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 7, (n,), generator=g)
    mask = (torch.arange(6)[None, :] < lengths[:, None]).long()
    tokens = torch.randint(1, 30, (n, 6), generator=g) * mask
    return TensorDataset(tokens, mask, torch.randn(n, 3, dtype=D, generator=g) * 3)


def per_row_loss(out, y):
    """Per-sample losses (B,) of a (B, k) output: each row's summed squared error (a loss_fn)."""
    return (out - y).square().sum(1)


def mlp(out=3):
    """Linear(6, 8), Tanh, Linear(8, out) in float64, seeded."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, out)).double()


def mlp_data(b=5, seed=1, classes=3):
    """(x, labels) for mlp(): b rows of 6 float64 features, labels in [0, classes)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 6, dtype=torch.float64, generator=g), torch.randint(0, classes, (b,), generator=g)


# --- wrapper modules ---

class Lambda(nn.Module):
    """`fn` as a module (with a module path, for messages that name it)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class Wrap(nn.Module):
    """Linear, then `fn(h)`, then Linear: a mixing op inside a model with a module path."""

    def __init__(self, fn, d=4):
        super().__init__()
        self.a = nn.Linear(3, d)
        self.inner = Lambda(fn)
        self.b = nn.Linear(d, 2)

    def forward(self, x):
        return self.b(self.inner(self.a(x)))


# --- one step against an oracle ---

LAST = {}  # "report": the last_report of the last run_check / run_steps / check_against_loop


def assert_grads(model, ref):
    """Every parameter's .grad equals ref[name] (float64 tolerances)."""
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-9, atol=1e-12, msg=n)


def check_step(model, pm, x, y, C, reduction, atol=1e-10):
    """One eager step of `pm` on batch_loss against per_sample_reference (sq_loss): gradients
    and norms; frozen parameters get no .grad. Returns the report."""
    expected, norms = per_sample_reference(model, (x,), y, sq_loss, C, reduction)
    batch_loss(pm(x), y, reduction).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[name], atol=atol, rtol=1e-7, msg=name)
        else:
            assert p.grad is None, name
    torch.testing.assert_close(pm.per_sample_norms, norms, atol=atol, rtol=1e-7)
    return pm.last_report


def run_check(model, inputs, targets=None, loss_fn=mse, C=0.5, reduction="mean", compiled=False,
              dtype=D, tol=1e-9):
    """Privatize, step once, compare with the torch.func reference; returns the report rows."""
    model = model.to(dtype)
    pm = fxclip.privatize(model, max_grad_norm=C, loss_reduction=reduction)
    run = torch.compile(pm) if compiled else pm
    _step_matches_reference(model, pm, run, inputs, targets, loss_fn, C, reduction, tol)
    return {r.name: r for r in pm.last_report.params}


def run_steps(model, make_inputs, sizes=(4, 3, 5), compiled=False, C=0.5, tol=1e-9):
    """A run of one privatized model: a batch of each size in turn (a static graph, then one
    dynamic graph for the others), every step against the torch.func reference; returns the
    report rows of the last step."""
    model = model.to(D)
    pm = fxclip.privatize(model, max_grad_norm=C)
    run = torch.compile(pm) if compiled else pm
    for b in sizes:
        model.zero_grad(set_to_none=True)
        _step_matches_reference(model, pm, run, make_inputs(b), None, mse, C, "mean", tol)
    assert not pm.last_report.batch_size.isdigit(), pm.last_report.batch_size  # one dynamic graph
    return {r.name: r for r in pm.last_report.params}


def _step_matches_reference(model, pm, run, inputs, targets, loss_fn, C, reduction, tol):
    out = run(*inputs)
    if targets is None:
        targets = torch.randn_like(out)
    loss = loss_fn(out, targets) if reduction == "mean" else loss_fn(out, targets) * out.shape[0]
    loss.backward()
    lf = loss_fn if reduction == "mean" else (lambda o, t: loss_fn(o, t) * o.shape[0])
    ref, norms = per_sample_reference(model, inputs, targets, lf, C, reduction)
    assert (C / norms).min() < 1, "test should clip some samples"
    for n, p in model.named_parameters():
        if p.requires_grad:
            scale = ref[n].abs().max().clamp(min=1e-12)
            grad = p.grad if p.grad is not None else torch.zeros_like(p)  # unused in forward
            err = ((grad - ref[n]).abs().max() / scale).item()
            assert err < tol, (len(targets), n, err)
    got = pm.per_sample_norms
    assert torch.allclose(got.to(norms.dtype), norms, rtol=tol * 10, atol=1e-12)
    LAST["report"] = pm.last_report


def loop_reference(model, inputs, targets, C):
    """Per-sample gradients by one backward per sample (torch.func cannot vmap nn.LSTM or a
    bool-mask index_put), then fxclip's contract: (1/B) sum_i R_i grad_i and the norms."""
    grads = []
    for i in range(targets.shape[0]):
        m = copy.deepcopy(model)
        mse(m(*(t[i:i + 1] for t in inputs)), targets[i:i + 1]).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    norms = torch.stack([sum(g.square().sum() for g in gi.values()).sqrt() for gi in grads])
    factor = (C / (norms + 1e-6)).clamp(max=1.0)
    expected = {n: sum(f * gi[n] for f, gi in zip(factor, grads)) / len(grads) for n in grads[0]}
    return expected, norms


def check_against_loop(model, inputs, compiled=False, C=0.5):
    """run_check's exactness test with the loop reference; returns {parameter: rule}."""
    model = model.to(D)
    reference_model = copy.deepcopy(model)
    pm = fxclip.privatize(model, max_grad_norm=C)
    out = (torch.compile(pm) if compiled else pm)(*inputs)
    targets = torch.randn_like(out)
    mse(out, targets).backward()
    expected, norms = loop_reference(reference_model, inputs, targets, C)
    assert (C / norms).min() < 1
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert (p.grad - expected[n]).abs().max() < 1e-9 * expected[n].abs().max(), n
    assert torch.allclose(pm.per_sample_norms.to(D), norms, rtol=1e-8)
    LAST["report"] = pm.last_report
    return {r.name: r.rule for r in pm.last_report.params}


def unit_clipped_sum(model, pm, x, y, ids) -> torch.Tensor:
    """The flat clipped gradient sum of one sum-reduced backward of pm(x, target=y,
    privacy_unit=ids): the quantity whose change under removing a unit is the sensitivity."""
    model.zero_grad(set_to_none=True)
    pm(x, target=y, privacy_unit=ids).sum().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def masked_private_run(compiled: bool, noise_for, C: float, sigma: float, batch: int, seed: int = 3,
                       **make_private_options) -> tuple:
    """Two epochs of make_private's Poisson loader over masked_rows as a user's loop makes them
    (token ids with the attention mask as a keyword, empty batches included, eager or compiled).
    After every step the update must be, in float64, (the oracle's clipped sum + sigma C z) / batch,
    z = noise_of_step(step, model) -> {name: values}, noise_of_step = noise_for(opt) made right
    after make_private. Returns (opt, parameters, sizes, steps)."""
    torch.manual_seed(0)
    model = MaskedBag().to(D)
    oracle = copy.deepcopy(model)
    pm, opt, loader = fxclip.make_private(
        model, torch.optim.SGD(model.parameters(), lr=1.0), DataLoader(masked_rows(), batch_size=batch),
        noise_multiplier=sigma, max_grad_norm=C, loss_fn=per_row_loss,
        generator=torch.Generator().manual_seed(seed), **make_private_options)
    noise_of_step = noise_for(opt)
    run = torch.compile(pm) if compiled else pm
    sizes, step = set(), 0
    for _ in range(2):  # epochs
        for tokens, mask, y in loader:
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            oracle.load_state_dict(model.state_dict())
            opt.zero_grad()
            if len(y):
                run(tokens, attention_mask=mask, target=y).mean().backward()
            opt.step()
            sizes.add(len(y))
            z = noise_of_step(step, model)
            step += 1
            if len(y):
                clipped, _ = per_sample_reference(oracle, (tokens, mask), y, sq_loss, C, loss_reduction="sum")
            else:  # an empty batch: noise alone
                clipped = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
            for n, p in model.named_parameters():
                want = (clipped[n] + sigma * C * z[n]) / batch
                torch.testing.assert_close(before[n] - p.detach(), want, rtol=1e-9, atol=1e-12, msg=n)
    opt.noise_source._wait()
    return opt, [p.detach().clone() for p in model.parameters()], sizes, step
