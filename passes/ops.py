"""Custom ops that mark a privatized model's boundary in the traced graph.

The markers carry the clipping spec into the joint graph, where the pass reads and removes
them. If one ever executes, the pass did not run on that graph (e.g. a compile backend that
skips Inductor's joint-graph passes), so its gradients would be unclipped: refuse.
"""
from __future__ import annotations

import torch

from .errors import PrivacyError


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
def batch_output(y: torch.Tensor, params: list[torch.Tensor], state: torch.Tensor,
                 thresholds: torch.Tensor, scale: torch.Tensor, names: str, frozen: str, groups: str,
                 mean: bool, checked_loss: bool) -> torch.Tensor:
    """Marks a model output. `params`: the trainable parameters, `names` theirs ("\n"-joined);
    `state`: the privatized module's device state (see STATE_FIELDS), where the graph records
    norms, counts and flags; `thresholds`: each clipping group's C_g (runtime values, read by the
    graph); `scale`: the loss scale S of a connected GradScaler (else 1); `groups`: each
    parameter's clipping group index (comma-separated); `checked_loss`: y is the per-sample loss
    vector of the privatized loss_fn, whose incoming gradient the graph checks."""
    raise PrivacyError(_NOT_REWRITTEN)


@batch_output.register_fake
def _(y, params, state, thresholds, scale, names, frozen, groups, mean, checked_loss):
    return torch.empty_like(y)


def _identity_backward(ctx, grad):
    return grad


batch_input.register_autograd(_identity_backward)


BATCH_INPUT = torch.ops.fxclip.batch_input.default
BATCH_OUTPUT = torch.ops.fxclip.batch_output.default


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
    return (output_grad(grad), [None] * ctx.n_params) + (None,) * 8


batch_output.register_autograd(_output_backward_marked, setup_context=_output_setup)
OUTPUT_GRAD = torch.ops.fxclip.output_grad.default




# The privatized module's device state: one float32 vector the backward updates in place (device
# writes only, so CUDA-graph replay keeps it current and nothing syncs with the host). Counts
# are cumulative until the optimizer step resets them.
STATE_FIELDS = (
    "nonfinite",    # real samples whose gradient had an inf/NaN (given weight 0)
    "bad_seed",     # backwards whose loss gradient was not the declared sum/mean
    "batch_size",   # rows of the latest backward, padding included (the B a mean divided by)
    "samples",      # real samples seen
    "backwards",    # backward passes seen
    "valid_rows",   # how many leading rows of the coming batches are real (inf: all)
    "unclipped",    # real samples whose norm was <= C (adaptive clipping's count)
    "owners",       # DPOptimizers that own the module: while > 0, loss_reduction="mean" leaves the
                    # clipped SUM (R_i scaled by this backward's rows), which they noise and divide
)
STATE = {name: i for i, name in enumerate(STATE_FIELDS)}
CUMULATIVE = ("nonfinite", "bad_seed", "samples", "backwards", "unclipped")

# per-sample norms of each (state tensor, batch size): written in place by the backward into a
# buffer allocated once per size, so its address is stable under CUDA-graph replay
_norm_stores: dict[tuple[int, int], torch.Tensor] = {}


def new_state(device=None) -> torch.Tensor:
    state = torch.zeros(len(STATE_FIELDS), dtype=torch.float32, device=device)
    state[STATE["valid_rows"]] = float("inf")
    return state


def norm_store(state: torch.Tensor, batch_size: int) -> torch.Tensor | None:
    return _norm_stores.get((state.data_ptr(), batch_size))


def _record_step(norms: torch.Tensor, updated: torch.Tensor, state: torch.Tensor,
                 clip_factor: torch.Tensor) -> torch.Tensor:
    """Writes the backward's results into the module's device state: `updated` (computed in the
    graph) into `state`, the per-sample norms into their store. Returns the clip factor, which
    keeps this op on the data path (no pass may drop it as dead code)."""
    key = (state.data_ptr(), norms.shape[0])
    store = _norm_stores.get(key)
    if store is None or store.dtype != norms.dtype or store.device != norms.device:
        store = _norm_stores[key] = torch.empty_like(norms)
    store.copy_(norms)
    state.copy_(updated)
    return clip_factor.clone()  # an op's output may not alias its input


# Defined with torch.library.Library rather than custom_op: it runs once per backward as
# Inductor's only fallback kernel, and a call costs half of what it does through custom_op's
# Python wrappers. The schema declares no mutation: the graph reads the state only to compute
# `updated`, before this op runs, and never reads the norms' store.
_LIB = torch.library.Library("fxclip", "FRAGMENT")
_LIB.define("record_step(Tensor norms, Tensor updated, Tensor state, Tensor clip_factor) -> Tensor")
_LIB.impl("record_step", _record_step, "CompositeExplicitAutograd")


@torch.library.register_fake("fxclip::record_step", lib=_LIB)
def _(norms, updated, state, clip_factor):
    return torch.empty_like(clip_factor)


RECORD_STEP = torch.ops.fxclip.record_step.default
record_step = RECORD_STEP
