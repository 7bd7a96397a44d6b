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


def per_unit_reference(model, inputs, targets, loss_fn, max_grad_norm, ids, loss_reduction="mean",
                       unit_reduction="sum"):
    """(expected .grad per parameter, each row's unit norm) under privacy units
    (docs/privacy-units.md): rows with equal `ids` form a unit u, g_u = the sum (unit_reduction
    "sum") or mean ("mean") of its rows' gradients, R_u = min(1, C / (||g_u|| + 1e-6)), and the
    gradient is sum_u R_u g_u (divided by B for loss_reduction="mean")."""
    grads = per_sample_grads(model, inputs, targets, loss_fn)
    units = [ids == u for u in ids.unique()]
    unit_grads = []
    for rows in units:
        unit_grads.append({n: g[rows].mean(0) if unit_reduction == "mean" else g[rows].sum(0)
                           for n, g in grads.items()})
    unit_norms = [torch.sqrt(sum(g.square().sum() for g in ug.values())) for ug in unit_grads]
    scale = 1.0 / targets.shape[0] if loss_reduction == "mean" else 1.0
    expected = {n: sum((max_grad_norm / (nu + 1e-6)).clamp(max=1.0) * ug[n]
                       for nu, ug in zip(unit_norms, unit_grads)) * scale for n in grads}
    row_norms = torch.zeros(ids.shape[0], dtype=unit_norms[0].dtype)
    for rows, nu in zip(units, unit_norms):
        row_norms[rows] = nu
    return expected, row_norms
