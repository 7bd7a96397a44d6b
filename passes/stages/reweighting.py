"""Stages "reweight" and "clean up": each trainable parameter's gradient output becomes
sum_i R_i grad_i (zeros for an empty batch), then dead nodes and unused outputs go."""
from __future__ import annotations

import torch

from ..layout import same_shape
from ..prune import prune_unused_outputs
from ..rules.shared import shared_reweighted
from .clipping import warn_if_specialized


def reweight(state) -> None:
    output = state.graph.output_node()
    new_outputs = list(output.args[0])
    if state.empty_batch:
        _zero_gradients(state, new_outputs)
    group_of = dict(zip(state.params, state.spec.groups))
    builder, ctx = state.builder, state.ctx
    for param, found in state.routes.items():
        name = state.params[param]
        clip = state.clip_of[group_of[param]]
        builder.tag = {"param": name, "role": "reweight"}
        new = found[0].reweighted(ctx, clip) if len(found) == 1 else shared_reweighted(found, ctx, clip)
        want = new_outputs[state.grad_slots[param]].meta["val"]
        if new.meta["val"].dtype != want.dtype or not same_shape(new.meta["val"].shape, want.shape):
            new = builder.call(_as(want), new)
        new.meta["fxclip"] = {"param": name, "role": "reweight"}
        new_outputs[state.grad_slots[param]] = new
        state.specialized = state.specialized or warn_if_specialized(state.batch_size, name, found)
    output.args = (tuple(new_outputs),) + tuple(output.args[1:])


def _as(want):
    """t -> t in want's dtype and shape (a traced fn takes only tensors: no default arguments)."""
    return lambda t: t.to(want.dtype).reshape(want.shape)


def _zero_gradients(state, new_outputs: list) -> None:
    """No samples: every gradient is exactly zero (computed after the recorded state)."""
    recorded = state.clip_of[None]
    for param, pos in state.grad_slots.items():
        if param in state.params:
            state.builder.tag = {"param": state.params[param], "role": "reweight"}
            new = state.builder.call(lambda g, r: torch.zeros_like(g) + r.sum().to(g.dtype), new_outputs[pos],
                                     recorded)
            new.meta["fxclip"] = dict(state.builder.tag)
            new_outputs[pos] = new


def clean_up(state) -> None:
    state.graph.eliminate_dead_code()
    if state.routes:
        prune_unused_outputs(state.graph)
        state.graph.lint()
