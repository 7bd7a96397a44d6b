"""The protocol between a privatized module, its traced graph and the optimizer.

- ClipSpec: what the module tells the graph pass, carried by the output marker (passes/ops.py).
  The marker's schema and autograd are derived from its fields.
- DeviceState: the float vector on the module's device that the backward writes (norm counts,
  flags, the batch size) and the host reads once per optimizer step.
- ReportKey: which compiled graphs' reports are interchangeable.

A leaf module: it imports torch only.
"""
from __future__ import annotations

import dataclasses
import itertools
import typing
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ClipSpec:
    """How one privatized model's gradients are clipped, fixed for a compiled graph."""

    names: tuple[str, ...]  # the trainable parameters, as in model.named_parameters()
    frozen: tuple[str, ...]  # parameters with requires_grad=False
    groups: tuple[int, ...]  # each trainable parameter's clipping group (an index into thresholds)
    mean: bool  # loss_reduction="mean": the output gradient carries 1/B
    checked_loss: bool  # the outputs are the per-sample losses of privatize(loss_fn=...)
    owner: str  # the privatized module's number in this process (see ReportKey)
    units: bool = False  # pm(x, privacy_unit=ids): rows with equal ids are clipped as one unit
    unit_mean: bool = False  # unit_reduction="mean": a unit's gradient is its rows' MEAN, not sum

    # How each field travels in the marker op's schema (str[] is no schema type: joined).
    _WIRE = {tuple[str, ...]: ("str", "\n".join, lambda s: tuple(s.split("\n")) if s else ()),
             tuple[int, ...]: ("int[]", list, tuple),
             bool: ("bool", bool, bool),
             str: ("str", str, str)}

    @classmethod
    def schema_args(cls) -> str:
        """The fields as op-schema arguments: 'str names, str frozen, int[] groups, ...'."""
        return ", ".join(f"{cls._wire(f)[0]} {f.name}" for f in dataclasses.fields(cls))

    def to_args(self) -> tuple:
        return tuple(self._wire(f)[1](getattr(self, f.name)) for f in dataclasses.fields(self))

    @classmethod
    def from_args(cls, args) -> "ClipSpec":
        return cls(*(cls._wire(f)[2](a) for f, a in zip(dataclasses.fields(cls), args)))

    @classmethod
    def _wire(cls, f):
        return cls._WIRE[typing.get_type_hints(cls)[f.name]]

    @classmethod
    def arity(cls) -> int:
        return len(dataclasses.fields(cls))


_owners = itertools.count(1)


def new_owner() -> str:
    """A privatized module's number: its n-th creation in this process. Stable across runs of
    the same script, so graphs cached on disk by Inductor stay reusable."""
    return str(next(_owners))


@dataclass(frozen=True)
class ReportKey:
    """Two compiled graphs are interchangeable when one privatized module traced both with the
    same trainable parameters: reports are kept per (module, trainable parameters), so two
    models with the same parameter names never see each other's, and freezing a layer and
    unfreezing it again finds the first graph's report."""

    owner: str
    names: tuple[str, ...]

    @classmethod
    def of(cls, spec: ClipSpec) -> "ReportKey":
        return cls(spec.owner, spec.names)


class DeviceState:
    """A privatized module's device state: one float32 vector the backward updates in place
    (device writes only, so CUDA-graph replay keeps it current and nothing syncs with the
    host). Counts are cumulative until the optimizer step resets them.

    Host side: DeviceState(tensor) reads, resets and sets fields (each read is a host sync).
    Graph side: `updated(...)` computes the vector a backward writes, inside traced code.
    """

    FIELDS = (
        "nonfinite",    # real samples whose gradient had an inf/NaN (given weight 0)
        "bad_seed",     # backwards whose loss gradient was not the declared sum/mean
        "batch_size",   # rows of the latest backward, padding included (the B a mean divided by)
        "samples",      # real samples seen
        "backwards",    # backward passes seen
        "valid_rows",   # how many leading rows of the coming batches are real (inf: all)
        "unclipped",    # real samples whose norm was <= C (adaptive clipping's count)
        "owners",       # DPOptimizers that own the module: while > 0, the backward leaves the
                        # clipped SUM divided by sum_divisor (R_i scaled by this backward's rows
                        # for loss_reduction="mean"), which they noise
        "units",        # real privacy units seen (= samples without privacy_unit ids): what a
                        # DPOptimizer noising per unit divides by (its expected count)
        "sum_divisor",  # what the owning DPOptimizer divides its update by: its expected batch
                        # size (an integer, exact in float32), 1 for loss_reduction="sum"
    )
    INDEX = {name: i for i, name in enumerate(FIELDS)}
    CUMULATIVE = ("nonfinite", "bad_seed", "samples", "backwards", "unclipped", "units")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    @classmethod
    def new_tensor(cls, device=None) -> torch.Tensor:
        state = torch.zeros(len(cls.FIELDS), dtype=torch.float32, device=device)
        state[cls.INDEX["valid_rows"]] = float("inf")
        state[cls.INDEX["sum_divisor"]] = 1.0
        return state

    # --- host side ---
    def read(self) -> dict:
        """The fields as Python numbers (one host sync)."""
        return self.as_dict(self.tensor.tolist())

    @classmethod
    def as_dict(cls, values) -> dict:
        return dict(zip(cls.FIELDS, values))

    @classmethod
    def read_all(cls, states: list, extra: list = ()) -> tuple[list[dict], list]:
        """Several modules' states and `extra` 1-element tensors in ONE host sync: (the states
        as dicts, the extras as numbers)."""
        device = states[0].tensor.device
        values = torch.cat([s.tensor.to(device) for s in states]
                           + [t.reshape(1).to(device, torch.float32) for t in extra]).tolist()
        width = len(cls.FIELDS)
        return ([cls.as_dict(values[i * width:(i + 1) * width]) for i in range(len(states))],
                values[len(states) * width:])

    def reset(self) -> None:
        """Zero the cumulative counts and flags: one multiply by a 0/1 mask (the optimizer resets
        at every step; one write per field was 5 small ops). The state never requires a gradient:
        no autograd context is needed."""
        self.tensor.mul_(self._keep_mask(self.tensor.device))

    _keep_masks: dict = {}

    @classmethod
    def _keep_mask(cls, device) -> torch.Tensor:
        """1 for the fields a reset keeps, 0 for the cumulative ones (cached per device)."""
        mask = cls._keep_masks.get(device)
        if mask is None:
            keep = [0.0 if name in cls.CUMULATIVE else 1.0 for name in cls.FIELDS]
            mask = cls._keep_masks[device] = torch.tensor(keep, dtype=torch.float32, device=device)
        return mask

    def add(self, name: str, count: float) -> None:
        with torch.no_grad():
            self.tensor[self.INDEX[name]] += count

    def set(self, name: str, value: float) -> None:
        with torch.no_grad():
            self.tensor[self.INDEX[name]] = float(value)

    def norms(self, rows: int) -> torch.Tensor | None:
        """The per-sample norms the latest backward of `rows` rows stored, or None."""
        return _norm_stores.get((self.tensor.data_ptr(), rows))

    # --- graph side (inside traced code) ---
    @classmethod
    def updated(cls, state: torch.Tensor, per_row: dict, totals: dict, rows_like: torch.Tensor) -> torch.Tensor:
        """The state after a backward of the batch of `rows_like` (any (B,) tensor): each of
        `per_row` ((B,) 0/1 per row) added summed over the rows, each of `totals` (a number or a
        0-d tensor) added as is, batch_size set to B.

        Written as one (B, fields) expression summed over the rows, so that Inductor makes it one
        reduction into one buffer: a stack of per-field scalars compiled to a buffer and a view
        per field, which the backward's wrapper allocates at every call."""
        index = torch.arange(len(cls.FIELDS), device=state.device)

        def at(name: str) -> torch.Tensor:
            return (index == cls.INDEX[name]).to(state.dtype)

        rows = at("batch_size") * torch.ones_like(rows_like, dtype=state.dtype)[:, None]
        for name, flags in per_row.items():
            rows = rows + at(name) * flags.to(state.dtype)[:, None]
        out = state * (1 - at("batch_size")) + rows.sum(0)
        for name, value in totals.items():
            out = out + at(name) * (value.to(state.dtype) if isinstance(value, torch.Tensor) else value)
        return out

    @classmethod
    def field(cls, state: torch.Tensor, name: str) -> torch.Tensor:
        return state[cls.INDEX[name]]


# per-sample norms of each (state tensor, batch size): written in place by the backward into a
# buffer allocated once per size, so its address is stable under CUDA-graph replay
_norm_stores: dict[tuple[int, int], torch.Tensor] = {}


def store_norms(state: torch.Tensor, norms: torch.Tensor) -> None:
    key = (state.data_ptr(), norms.shape[0])
    store = _norm_stores.get(key)
    if store is None or store.dtype != norms.dtype or store.device != norms.device:
        store = _norm_stores[key] = torch.empty_like(norms)
    store.copy_(norms)
