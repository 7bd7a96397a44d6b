"""Custom ops that mark a privatized model's boundary in the traced graph.

The markers carry the clipping spec (protocol.ClipSpec) into the joint graph, where the pass
reads and removes them. If one ever executes, the pass did not run on that graph (e.g. a compile backend that
skips Inductor's joint-graph passes), so its gradients would be unclipped: refuse.
"""
from __future__ import annotations

import torch

from .protocol import ClipSpec, store_norms
from .refusals import refusal


@torch.library.custom_op("fxclip::batch_input", mutates_args=())
def batch_input(x: torch.Tensor) -> torch.Tensor:
    raise refusal("not-rewritten")


@batch_input.register_fake
def _(x):
    return torch.empty_like(x)


# The output marker's schema comes from ClipSpec's fields: y, the trainable parameters, the
# runtime tensors the graph reads (the device state, each clipping group's threshold C_g, the
# loss scale S of a connected GradScaler, else 1, the (B,) privacy-unit ids or None), then the spec.
_LIB = torch.library.Library("fxclip", "FRAGMENT")
_LIB.define("batch_output(Tensor y, Tensor[] params, Tensor state, Tensor thresholds, Tensor scale, "
            "Tensor? units, "
            f"{ClipSpec.schema_args()}) -> Tensor")


def _batch_output(y, params, state, thresholds, scale, units, *spec):
    raise refusal("not-rewritten")


_LIB.impl("batch_output", _batch_output, "CompositeExplicitAutograd")


@torch.library.register_fake("fxclip::batch_output", lib=_LIB)
def _(y, params, state, thresholds, scale, units, *spec):
    return torch.empty_like(y)


def _identity_backward(ctx, grad):
    return grad


batch_input.register_autograd(_identity_backward)


BATCH_INPUT = torch.ops.fxclip.batch_input.default
BATCH_OUTPUT = torch.ops.fxclip.batch_output.default


@torch.library.custom_op("fxclip::output_grad", mutates_args=())
def output_grad(g: torch.Tensor) -> torch.Tensor:
    """Marks the gradient arriving at the privatized model's output: the backward's seed."""
    raise refusal("not-rewritten")


@output_grad.register_fake
def _(g):
    return torch.empty_like(g)


def _output_setup(ctx, inputs, output):
    ctx.n_params = len(inputs[1])


def _output_backward_marked(ctx, grad):
    return (output_grad(grad), [None] * ctx.n_params) + (None,) * (4 + ClipSpec.arity())


torch.library.register_autograd("fxclip::batch_output", _output_backward_marked,
                                setup_context=_output_setup, lib=_LIB)
OUTPUT_GRAD = torch.ops.fxclip.output_grad.default


def _record_step(norms: torch.Tensor, updated: torch.Tensor, state: torch.Tensor,
                 clip_factor: torch.Tensor) -> torch.Tensor:
    """Writes the backward's results into the module's device state: `updated` (computed in the
    graph) into `state`, the per-sample norms into their store. Returns the clip factor, which
    keeps this op on the data path (no pass may drop it as dead code)."""
    store_norms(state, norms)
    state.copy_(updated)
    return clip_factor.clone()  # an op's output may not alias its input


# Defined with torch.library.Library rather than custom_op: it runs once per backward as
# Inductor's only fallback kernel, and a call costs half of what it does through custom_op's
# Python wrappers. The schema declares no mutation: the graph reads the state only to compute
# `updated`, before this op runs, and never reads the norms' store.
_LIB.define("record_step(Tensor norms, Tensor updated, Tensor state, Tensor clip_factor) -> Tensor")
_LIB.impl("record_step", _record_step, "CompositeExplicitAutograd")


@torch.library.register_fake("fxclip::record_step", lib=_LIB)
def _(norms, updated, state, clip_factor):
    return torch.empty_like(clip_factor)


RECORD_STEP = torch.ops.fxclip.record_step.default
record_step = RECORD_STEP
