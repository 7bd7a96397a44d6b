"""A run of a privatized zoo model (batch sizes that change, keyword tensors) against float64
per-sample gradients at every step (autograd, one sample at a time)."""
from __future__ import annotations

import contextlib

import torch
from zoo_models import SIZES

import fxclip

C = 1e-3  # small enough that every sample is clipped


def squared_error(key):
    """Per-sample loss on the model output's `key`: sum of squared errors, shape (B,)."""
    return lambda out, target: (getattr(out, key) - target).square().flatten(1).sum(1)


def reference_grads(model, loss_fn, inputs, target):
    """{name: (B, *shape)} per-sample gradients of the batch loss's terms mean_i L_i, one sample
    at a time with plain autograd (HF models branch on their inputs' values, e.g. an all-ones
    mask, which vmap cannot trace, and BLOOM's GELU is an autograd.Function torch.func rejects).
    Each term keeps the 1/B of the mean, so the output gradient entering the backward is the same
    number as in the batched backward."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    batch = target.shape[0]
    per = []
    for i in range(batch):
        one = {k: v[i:i + 1] for k, v in inputs.items()}
        loss = loss_fn(model(**one), target[i:i + 1]).sum() / batch
        per.append(torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True))
    return {n: torch.stack([g[k] for g in per]) for k, n in enumerate(names)}


def check(case, sizes=SIZES, compiled=False, tol=1e-9, float64_islands=True):
    """A run of one privatized model over batches of `sizes` (keyword tensors, padding masks),
    each step's .grad and per-sample norms against the reference; returns {parameter name:
    rule} of the last step. With float64_islands, HF's float32 upcasts stay float64."""
    with Float64Islands() if float64_islands else contextlib.nullcontext():
        return _check(case, sizes, compiled, tol)


def _check(case, sizes, compiled, tol):
    model, loss_fn = case.model, squared_error(case.key)
    pm = fxclip.privatize(model, max_grad_norm=C, loss_fn=loss_fn)
    run = torch.compile(pm) if compiled else pm
    for b in sizes:
        inputs = case.inputs(b)
        with torch.no_grad():
            target = torch.randn_like(getattr(model(**inputs), case.key))
        model.zero_grad(set_to_none=True)
        run(**inputs, target=target).mean().backward()
        _compare(model, pm, reference_grads(model, loss_fn, inputs, target), b, tol)
    if len(set(sizes)) > 1:  # the later sizes ran one graph with a symbolic batch size
        assert not pm.last_report.batch_size.isdigit(), pm.last_report.batch_size
    return {r.name: r.rule for r in pm.last_report.params}


def _compare(model, pm, per, batch, tol):
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in per.values())) * batch
    assert (C / norms).max() < 1, "every sample should be clipped"
    factor = (C / (norms + 1e-6)).clamp(max=1.0)
    want = {n: torch.einsum("b,b...->...", factor, g) for n, g in per.items()}
    # A gradient that is zero in exact arithmetic (a key projection's bias: softmax ignores a
    # shift of all scores) is rounding noise: measure it against the model's largest gradient.
    floor = 1e-6 * max(w.abs().max() for w in want.values())
    for n, p in model.named_parameters():
        if p.requires_grad:
            got = p.grad if p.grad is not None else torch.zeros_like(p)
            err = ((got - want[n]).abs().max() / want[n].abs().max().clamp(min=floor)).item()
            assert err < tol, (batch, n, err)
    got = pm.per_sample_norms.to(norms.dtype)
    assert torch.allclose(got, norms, rtol=tol * 10, atol=0), (batch, got, norms)


class Float64Islands(torch.overrides.TorchFunctionMode):
    """Keeps float64 tensors float64 where HF models upcast to float32 ("compute softmax and
    RMSNorm in at least float32"): in a float64 test that upcast is a downcast, and float32
    roundings in the backward would differ between any two correct ways of computing it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dtype == torch.float64:
            if func is torch.Tensor.float:
                return x
            if func is torch.Tensor.to and (torch.float32 in args[1:] or kwargs.get("dtype") is torch.float32):
                args = tuple(torch.float64 if a is torch.float32 else a for a in args)
                if kwargs.get("dtype") is torch.float32:
                    kwargs["dtype"] = torch.float64
            if kwargs.get("dtype") is torch.float32:
                kwargs["dtype"] = torch.float64
        return func(*args, **kwargs)
