"""Stages "norms" and "clip": each sample's squared gradient norm per clipping group, then the
clip factors R_g = min(1, C_g / (n_g + 1e-6)), computed on the device with the device state
(protocol.DeviceState) updated in the same graph.

With privacy units (pm(x, privacy_unit=ids)), the "sample" is a unit: every row holds its
unit's squared norm (rules/units.py) and its unit's clip factor."""
from __future__ import annotations

import warnings

import torch

from .. import ops
from ..layout import as_int
from ..protocol import DeviceState
from ..rules.shared import shared_norm_sq
from ..rules.units import unit_index, unit_norm_sq, unit_sizes


def add_norms(state) -> None:
    """For each clipping group, the per-parameter squared-norm nodes of its parameters."""
    ctx, group_of = state.ctx, dict(zip(state.params, state.spec.groups))
    if state.spec.units and state.routes:
        state.builder.tag = {"param": None, "role": "norm"}
        device_state, ids = state.runtime[0], state.runtime[3]
        state.unit_index = state.builder.call(unit_index, ids, device_state)
    for param, found in state.routes.items():
        name = state.params[param]
        ctx.for_param(param)
        state.builder.tag = {"param": name, "role": "norm"}
        if state.unit_index is not None:
            term = unit_norm_sq(found, ctx, state.unit_index)
        elif len(found) == 1:
            term = found[0].norm_sq(ctx)
        else:  # a shared parameter: the norm of its TOTAL per-sample gradient, cross terms included
            term = shared_norm_sq(found, ctx)
        state.norm_terms.setdefault(group_of[param], []).append(term)
        state.specialized = state.specialized or warn_if_specialized(state.batch_size, name, found)


def add_clip_factors(state) -> None:
    """The (B,) clip factors of each group; with an empty batch, the state records a backward."""
    builder, spec = state.builder, state.spec
    builder.tag = {"param": None, "role": "clip"}
    bref = state.batch_inputs[0]
    device_state, thresholds, scale, _ = state.runtime
    if state.empty_batch:
        state.clip_of = {None: builder.call(_zero_norms, bref, device_state)}
        return
    if not state.norm_terms:  # no trainable parameter reached the output
        return
    groups = sorted(state.norm_terms)
    group_sq = [builder.call(lambda *ts: sum(ts), *state.norm_terms[g]) for g in groups]
    seed = state.seeds[0] if spec.checked_loss else bref
    units = [state.unit_index] if state.unit_index is not None else []
    factors = builder.call(clip_fn(groups, spec.mean, spec.checked_loss, bool(units), spec.unit_mean), bref,
                           device_state, thresholds, scale, seed, *units, *group_sq)
    state.clip_of = {g: builder.call(_row(i), factors) for i, g in enumerate(groups)}


def clip_fn(groups: list, mean: bool, checked_loss: bool, units: bool = False, unit_mean: bool = False):
    """(state, thresholds, scale, loss seed, [unit index,] per-group squared norms) -> (G, B)
    clip factors R_g = min(1, C_g / (n_g + 1e-6)), recording norms, counts and flags in the
    device state. With units, the norms are the units' (each row holds its unit's), a unit
    is counted once, and unit_mean divides each row's gradient by its unit's size.

    All of it runs on the device: thresholds and the loss scale are runtime tensors (no
    recompile when they change) and problems become flags, never a host sync. A sample that is
    padding, or whose norm is inf/NaN, gets R = 0 (the optimizer step refuses the latter).
    """
    field = DeviceState.field

    def clip(bref, state, thresholds, scale, seed, *rest):
        batch = bref.shape[0]
        index, group_sq = (rest[0], rest[1:]) if units else (None, rest)
        norms = torch.stack(group_sq).sqrt()  # norms of the gradient as it arrived
        if mean:  # the output gradient carried 1/B: undo it to clip grad L_i itself
            norms = norms * batch
        norms = norms / scale.to(norms.dtype).reshape(())  # a connected GradScaler's S
        if unit_mean:  # g_u = mean of the unit's rows: each row's gradient / the unit's size
            sizes = unit_sizes(index).to(norms.dtype)
            norms = norms / sizes
        limit = torch.stack([thresholds[g] for g in groups]).to(norms.dtype)
        total = norms.square().sum(0).sqrt()
        real = torch.arange(batch, device=norms.device) < field(state, "valid_rows")
        finite = torch.isfinite(total)
        factor = (limit[:, None] / (norms + 1e-6)).clamp(max=1.0)
        factor = torch.where(real & finite, factor, torch.zeros_like(factor))
        if unit_mean:
            factor = factor / sizes
        # a unit is counted once: at its first real row (every row, without units)
        first = real if index is None else real & (index == torch.arange(batch, device=index.device))
        # a DPOptimizer owns the module: leave its update's clipped sum, divided by its expected
        # batch size (the gradient carried this backward's 1/B for a mean: undo that instead)
        owned = (field(state, "owners") > 0).to(factor.dtype)
        per_owner = field(state, "sum_divisor").to(factor.dtype).reciprocal() * (batch if mean else 1)
        factor = factor * (1 + (per_owner - 1) * owned)
        per_row = {
            "nonfinite": real & ~finite,
            "samples": real,
            "unclipped": first & (total <= limit.square().sum().sqrt()),
            "units": first,
        }
        totals = {"backwards": 1, "bad_seed": _bad_seed(seed, batch, mean, scale) if checked_loss else 0}
        updated = DeviceState.updated(state, per_row, totals, total)
        return ops.record_step(total.where(real, torch.zeros_like(total)), updated, state, factor)

    return clip


def _zero_norms(bref, state):
    """No samples: no norms to record, one backward to count."""
    empty = bref.new_zeros((0,), dtype=torch.float32)
    updated = DeviceState.updated(state, {}, {"backwards": 1}, empty)
    return ops.record_step(empty, updated, state, empty)


def _bad_seed(seed, batch, mean, scale):
    """1 if the gradient arriving at the per-sample losses is not the same for every sample and
    equal to what a plain sum (1) or mean (1/B) gives, times the loss scale; else 0."""
    expected = scale.to(seed.dtype).reshape(()) / (batch if mean else 1)
    tolerance = 4 * torch.finfo(seed.dtype).eps * expected.abs()
    return ((seed - expected).abs() > tolerance).any().to(torch.int64)


def _row(i: int):
    return lambda t: t[i]


SPECIALIZED = (
    "fxclip: computing the per-sample gradients of parameter {name!r} ({rule}) fixed the batch size "
    "of this graph to {size}: every new batch size compiles again, and Dynamo refuses the model "
    "after its recompile limit (8 sizes by default). Give the batches fixed shapes "
    "(make_private(..., pad_to_multiple=k)), and please report the model."
)


def warn_if_specialized(B, name, routes) -> bool:
    """Warn when building a parameter's routes turned a symbolic batch size into a number (an
    op whose per-sample form needs the size as a number): correct, but a recompile per size."""
    if not (isinstance(B, torch.SymInt) and isinstance(size := as_int(B), int)):
        return False
    warnings.warn(SPECIALIZED.format(name=name, rule="+".join(sorted({r.rule for r in routes})), size=size),
                  stacklevel=2)
    return True
