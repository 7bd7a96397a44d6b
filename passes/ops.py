"""Custom ops that mark a privatized model's boundary in the traced graph.

The markers carry the clipping spec into the joint graph, where the pass reads and removes
them. If one ever executes, the pass did not run on that graph (e.g. a compile backend that
skips Inductor's joint-graph passes), so its gradients would be unclipped: refuse.
"""
from __future__ import annotations

import torch

from .errors import PrivacyError

# per-sample norms of the latest backward, by the data pointer of the privatized module's token
# (a tensor passed through the graph, so instances of one model class share compiled graphs)
last_norms: dict[int, torch.Tensor] = {}

_NOT_REWRITTEN = (
    "this privatized model ran without fxclip's graph rewrite, so its gradients would not be "
    "clipped. Call it eagerly or compile it with the default Inductor backend: torch.compile(pm)."
)


@torch.library.custom_op("fxclip::batch_input", mutates_args=())
def batch_input(x: torch.Tensor) -> torch.Tensor:
    raise PrivacyError(_NOT_REWRITTEN)


@batch_input.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("fxclip::batch_output", mutates_args=())
def batch_output(y: torch.Tensor, params: list[torch.Tensor], token: torch.Tensor, names: str,
                 frozen: str, groups: str, thresholds: str, mean: bool,
                 nonfinite: str) -> torch.Tensor:
    """Marks a model output. `params`: the trainable parameters, `names` theirs ("\n"-joined);
    `token`: the privatized module's token tensor, where the norms are recorded; `groups`: each
    parameter's clipping group index, `thresholds`: each group's C_g (comma-separated);
    `nonfinite`: "refuse" or "drop", what to do with a sample whose gradient is inf/NaN."""
    raise PrivacyError(_NOT_REWRITTEN)


@batch_output.register_fake
def _(y, params, token, names, frozen, groups, thresholds, mean, nonfinite):
    return torch.empty_like(y)


def _identity_backward(ctx, grad):
    return grad


batch_input.register_autograd(_identity_backward)


@torch.library.custom_op("fxclip::record_norms", mutates_args=())
def record_norms(norms: torch.Tensor, clip_factor: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """Stores the per-sample norms for `pm.per_sample_norms`; returns the clip factor.

    Passing R through keeps this op on the data path, so no pass can drop it as dead code.
    """
    last_norms[token.data_ptr()] = norms.detach().clone()
    return clip_factor.clone()


@record_norms.register_fake
def _(norms, clip_factor, token):
    return torch.empty_like(clip_factor)


BATCH_INPUT = torch.ops.fxclip.batch_input.default
BATCH_OUTPUT = torch.ops.fxclip.batch_output.default
RECORD_NORMS = torch.ops.fxclip.record_norms.default


@torch.library.custom_op("fxclip::output_grad", mutates_args=())
def output_grad(g: torch.Tensor) -> torch.Tensor:
    """Marks the gradient arriving at the privatized model's output: the backward's seed."""
    raise PrivacyError(_NOT_REWRITTEN)


@output_grad.register_fake
def _(g):
    return torch.empty_like(g)


def _output_setup(ctx, inputs, output):
    ctx.n_params = len(inputs[1])


def _output_backward_marked(ctx, grad):
    return (output_grad(grad), [None] * ctx.n_params) + (None,) * 7


batch_output.register_autograd(_output_backward_marked, setup_context=_output_setup)
OUTPUT_GRAD = torch.ops.fxclip.output_grad.default


NONFINITE = (
    "sample(s) {samples} of this batch have a non-finite gradient (inf or NaN), so no clipped "
    "gradient exists for them; the step was refused and no .grad was changed. Find the cause "
    "(e.g. log(0) in the loss, float16 overflow, a too large learning rate), or pass "
    "nonfinite=\"drop\" to fxclip.privatize to give such samples zero weight."
)
NONFINITE_DROPPED = (
    "a sample's non-finite values reached the reweighted gradient of {what} even though its "
    "clip factor was set to 0 (0 * inf is NaN); the step was refused and no .grad was changed. "
    "Find the cause of the inf/NaN (see pm.per_sample_norms)."
)


@torch.library.custom_op("fxclip::refuse_nonfinite", mutates_args=())
def refuse_nonfinite(norms: torch.Tensor, clip_factor: torch.Tensor) -> torch.Tensor:
    """Raises PrivacyError if any per-sample norm is inf/NaN; returns the clip factor."""
    bad = ~torch.isfinite(norms)
    if bool(bad.any()):
        raise PrivacyError(NONFINITE.format(samples=bad.nonzero().flatten().tolist()))
    return clip_factor.clone()


@refuse_nonfinite.register_fake
def _(norms, clip_factor):
    return torch.empty_like(clip_factor)


@torch.library.custom_op("fxclip::require_finite", mutates_args=())
def require_finite(grad: torch.Tensor, what: str) -> torch.Tensor:
    """Raises PrivacyError if a reweighted gradient holds inf/NaN (nonfinite="drop")."""
    if not bool(torch.isfinite(grad).all()):
        raise PrivacyError(NONFINITE_DROPPED.format(what=what))
    return grad.clone()


@require_finite.register_fake
def _(grad, what):
    return torch.empty_like(grad)
