"""TEST-ONLY stand-in for fxclip.privatize, computed the slow obvious way with torch.func.

It honours the same contract (design.md section 2): after backward every trainable p has
p.grad += (1/B if "mean" else 1) * sum_i R_i grad_i(p), R_i = min(1, C / (n_i + 1e-6)),
and .per_sample_norms holds the last n_i. One tensor in, one tensor out, models without buffers
that mix samples. Used to cross-check the real implementation, never shipped.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap


class _ClippedCall(torch.autograd.Function):
    @staticmethod
    def forward(ctx, owner, x, *params):
        ctx.owner = owner
        ctx.save_for_backward(x, *params)
        with torch.enable_grad():  # plain forward on detached params; gradients come in backward
            return owner._call(params, x).detach()

    @staticmethod
    def backward(ctx, g):
        owner = ctx.owner
        x, *params = ctx.saved_tensors
        B = x.shape[0]
        if B == 0:
            owner.per_sample_norms = torch.zeros(0)
            return (None, None, *[torch.zeros_like(p) for p in params])

        def one(xi, gi):  # grad of sample i's contribution to the loss, w.r.t. all params
            _, pull = vjp(lambda *ps: owner._call(ps, xi[None]), *params)
            return pull(gi[None])

        per = vmap(one)(x, g)
        if owner.loss_reduction == "mean":  # g carries 1/B: clip grad L_i, not grad L_i / B
            per = [t * B for t in per]
        norms = torch.sqrt(sum(t.flatten(1).pow(2).sum(1) for t in per))
        owner.per_sample_norms = norms.detach()
        R = (owner.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        scale = 1.0 / B if owner.loss_reduction == "mean" else 1.0
        grads = [torch.einsum("b,b...->...", R, t) * scale for t in per]
        return (None, None, *grads)


class ReferencePrivatized(nn.Module):
    def __init__(self, model: nn.Module, max_grad_norm: float, loss_reduction: str = "mean"):
        super().__init__()
        assert loss_reduction in ("mean", "sum")
        self.module = model
        self.max_grad_norm = float(max_grad_norm)
        self.loss_reduction = loss_reduction
        self.per_sample_norms = None
        self._names = [n for n, p in model.named_parameters() if p.requires_grad]

    def _call(self, params, x):
        return functional_call(self.module, dict(zip(self._names, params)), (x,))

    def forward(self, x):
        params = [p for p in self.module.parameters() if p.requires_grad]
        return _ClippedCall.apply(self, x, *params)


def reference_privatize(model, max_grad_norm, loss_reduction="mean"):
    return ReferencePrivatized(model, max_grad_norm, loss_reduction)
