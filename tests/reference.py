"""Vanilla per-sample gradients with torch.func: the reference every fxclip result is checked against."""
from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap


def per_sample_grads(model, inputs, targets, loss_fn):
    """{name: (B, *shape)} gradients of each sample's loss L_i = loss_fn(model(x_i), y_i)."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b for n, b in model.named_buffers()}

    def loss_of_sample(p, x, y):
        x = tuple(t.unsqueeze(0) for t in x)
        out = functional_call(model, (p, buffers), x)
        return loss_fn(out, y.unsqueeze(0))

    return vmap(grad(loss_of_sample), in_dims=(None, 0, 0))(params, tuple(inputs), targets)


def per_sample_reference(model, inputs, targets, loss_fn, max_grad_norm, loss_reduction="mean"):
    """(expected .grad per parameter, per-sample norms) under fxclip's contract (README.md, "Use").

    `inputs` is a tuple of batched tensors; loss_fn(out, y) is the loss of ONE sample
    (a batch of one), reduced to a scalar.
    """
    grads = per_sample_grads(model, inputs, targets, loss_fn)
    norms = torch.sqrt(sum(g.reshape(g.shape[0], -1).square().sum(1) for g in grads.values()))
    factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    scale = 1.0 / targets.shape[0] if loss_reduction == "mean" else 1.0
    expected = {n: torch.einsum("b,b...->...", factor, g) * scale for n, g in grads.items()}
    return expected, norms
