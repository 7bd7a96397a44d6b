"""privatize(): wrap a model so its backward clips every sample's gradient.

The wrapper marks the model's inputs and outputs with fxclip ops. Under torch.compile, the
joint-graph pass (installed into Inductor) finds the marks and rewrites the graph; called
eagerly, the wrapper compiles the model itself with a backend that runs the same pass and
executes the rewritten graph without code generation. Either way, one backward.
"""
from __future__ import annotations

import enum
import math

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from . import _compile
from .passes import PrivacyError, _torch, ops
from .passes.protocol import ClipSpec, DeviceState, ReportKey, new_owner
from .passes.refusals import refusal

LOSS_REDUCTIONS = ("mean", "sum")
NONFINITE_POLICIES = ("refuse", "drop")
UNIT_REDUCTIONS = ("sum", "mean")

# Non-tensor inputs taken as constants shared by every sample (flags, sizes, names).
_CONSTANTS = (type(None), bool, int, float, complex, str, torch.dtype, torch.device, enum.Enum, slice,
              type(Ellipsis))

class PrivatizedModule(nn.Module):
    """`model` with per-sample clipped gradients; shares the model's parameters and buffers."""

    def __init__(self, model: nn.Module, max_grad_norm: float, loss_reduction: str, clipping="flat",
                 nonfinite: str = "refuse", loss_fn=None, grad_scaler=None, unit_reduction: str = "sum"):
        super().__init__()
        self.module = model
        self.loss_reduction = loss_reduction
        self.clipping = clipping
        self.nonfinite = nonfinite
        self.loss_fn = loss_fn
        self.grad_scaler = grad_scaler
        self.unit_reduction = unit_reduction
        self._scaled = grad_scaler is not None and grad_scaler.is_enabled()
        self._group_of = _clipping_groups(model, clipping)
        self._labels = list(dict.fromkeys(self._group_of.values()))
        self._table = _ParamTable([n for n, _ in model.named_parameters()], self._group_of, self._labels,
                                  loss_reduction == "mean", new_owner(), unit_reduction == "mean")
        device = _device_of(model)
        # Runtime values the graph reads and writes on the device (non-persistent: not in
        # state_dict). Tensors, not Python numbers, so that changing them never recompiles.
        self.register_buffer("_fxclip_state", DeviceState.new_tensor(device), persistent=False)
        self.register_buffer("_fxclip_thresholds", torch.zeros(len(self._labels), dtype=torch.float64,
                                                                device=device), persistent=False)
        self._limits = [0.0] * len(self._labels)  # host copy of the thresholds: no sync to read
        self._groups_of_pattern = {}  # trainable pattern -> clipping groups holding trainable parameters
        self.max_grad_norm = max_grad_norm
        self._eager = None
        self._eager_report = None
        self._loss_warned = False  # the unchecked-loss warning was given (eager path)
        self.requires_units = False  # unit-level training: a training forward without ids is refused
        self._loader_units = None  # the current batch's unit ids, set by a unit-level loader
        self.forward = _compile.own_code(self, "forward")

    # --- the clipping threshold: a runtime value ---
    @property
    def max_grad_norm(self) -> float:
        """The bound C on every sample's whole clipped gradient: sqrt(sum of C_g^2) over the
        clipping groups holding trainable parameters (for flat clipping, the threshold itself).
        Assigning C sets every group to C / sqrt(G); it takes effect at the next backward, eager
        or compiled, without a recompile."""
        return math.sqrt(sum(self._limits[i] ** 2 for i in self._trainable_groups()))

    @max_grad_norm.setter
    def max_grad_norm(self, value: float) -> None:
        _check_threshold(value)
        share = float(value) / max(len(self._trainable_groups()), 1) ** 0.5
        self._set_limits([share] * len(self._labels))

    @property
    def group_max_grad_norms(self) -> dict:
        """{clipping group: its threshold C_g}; assign a dict (some or all groups) to change them."""
        return dict(zip(self._labels, self._limits))

    @group_max_grad_norms.setter
    def group_max_grad_norms(self, values: dict) -> None:
        unknown = sorted(map(str, set(values) - set(self._labels)))
        if unknown:
            raise ValueError(f"unknown clipping groups {unknown}; the groups are {self._labels}")
        for v in values.values():
            _check_threshold(v)
        self._set_limits([float(values.get(g, c)) for g, c in zip(self._labels, self._limits)])

    def _set_limits(self, limits: list) -> None:
        self._limits = limits
        with torch.no_grad():
            self._fxclip_thresholds.copy_(torch.tensor(limits, dtype=torch.float64))

    def _trainable_groups(self) -> list:
        """The clipping groups (indices) holding trainable parameters, cached per trainable
        pattern: DPOptimizer reads the bound at every step."""
        trainable = _trainable(self._current_params())
        groups = self._groups_of_pattern.get(trainable)
        if groups is None:
            groups = sorted({g for g, t in zip(self._table.groups, trainable) if t})
            self._groups_of_pattern[trainable] = groups
        return groups

    # --- what the backward recorded (device state; reading it syncs, so the graph never does) ---
    @property
    def device_state(self) -> DeviceState:
        """What the backwards record on the device (protocol.DeviceState)."""
        return DeviceState(self._buffers["_fxclip_state"])  # not through Module.__getattr__: read every step

    def read_state(self) -> dict:
        """The device state as Python numbers (one host sync): counts since the last reset."""
        return self.device_state.read()

    def reset_state(self) -> None:
        """Zero the counts and flags (the optimizer does this after each step)."""
        self.device_state.reset()

    def _add_owner(self, count: int) -> None:
        """A DPOptimizer takes (+1) or gives up (-1) this module: while one owns it, the backward
        leaves the clipped sum for loss_reduction="mean" (a device write: no recompile)."""
        self.device_state.add("owners", count)

    def set_valid_rows(self, rows: float) -> None:
        """Only the first `rows` rows of the coming batches are real samples; the others are
        padding and get weight exactly 0 (float("inf"): every row is real)."""
        self.device_state.set("valid_rows", rows)

    def set_unit_ids(self, ids: torch.Tensor | None) -> None:
        """The coming batch's privacy-unit ids (one per row), from a unit-level loader: training
        forwards without privacy_unit= use them (None: no loader ids)."""
        _check_unit_ids(ids)
        self._loader_units = ids

    def check_step(self) -> dict:
        """Raise PrivacyError if a backward since the last check gave a sample an inf/NaN
        gradient (nonfinite="refuse") or met a loss reduction other than the declared sum/mean
        (loss_fn); then reset. Returns the state read. DPOptimizer.step() calls it: without
        DPOptimizer, call it yourself before optimizer.step()."""
        state = self.read_state()
        self.reset_state()
        if state["bad_seed"] > 0:
            raise refusal("bad-reduction", reduction=self.loss_reduction)
        if state["nonfinite"] > 0 and self.nonfinite == "refuse":
            raise self.nonfinite_refusal(state)
        return state

    def nonfinite_refusal(self, state: dict) -> PrivacyError:
        norms = self.per_sample_norms
        rows = [] if norms is None else (~torch.isfinite(norms)).nonzero().flatten().tolist()
        return refusal("nonfinite", count=int(state["nonfinite"]), rows=rows)

    @property
    def per_sample_norms(self) -> torch.Tensor | None:
        """Per-sample gradient norms n_i of the latest backward (padding rows left out), or None
        before the first backward."""
        state = self.read_state()
        if state["backwards"] == 0 and state["batch_size"] == 0:
            return None
        rows = int(state["batch_size"])
        store = self.device_state.norms(rows)
        return None if store is None else store[:int(min(rows, state["valid_rows"]))].clone()

    @property
    def last_report(self):
        """RewriteReport of this module's latest eager rewrite; under torch.compile, of the
        latest graph Inductor rewrote for a model with these trainable parameters (compiled
        graphs are shared by identical models). None when this process rewrote no such graph
        (e.g. the compiled graph came from Inductor's on-disk cache): use fxclip.explain."""
        if self._eager_report is not None:
            return self._eager_report
        trainable = tuple(n for n, p in self.module.named_parameters() if p.requires_grad)
        return _compile.compiled_reports.get(ReportKey(self._table.owner, trainable))

    def forward(self, *args, **kwargs):
        if not (torch.is_grad_enabled() and any(_trainable(self._current_params()))):
            kwargs.pop("privacy_unit", None)  # nothing is clipped: the units play no part
            if self.loss_fn is not None and "target" in kwargs:
                target = kwargs.pop("target")
                return self.loss_fn(self.module(*args, **kwargs), target)
            return self.module(*args, **kwargs)
        _check_inputs(args, kwargs)  # eager: before any tracing, so its errors are plain
        kwargs = self._with_unit_ids(args, kwargs)
        if torch.compiler.is_compiling():  # public API: few guards
            return self._marked_forward(*args, **kwargs)
        if self._eager is None:
            self._eager = _compile.compile_eager(self, "_marked_forward")
        out = self._eager(*args, **kwargs)
        return _map_tensors(lambda y: _NoDoubleBackward.apply(y) if y.is_floating_point() and y.requires_grad
                            else y, out)

    def _with_unit_ids(self, args, kwargs) -> dict:
        """kwargs with privacy_unit: the caller's, else the loader's ids for this batch; refused
        when units are required and none are known, or the loader's ids are for another batch."""
        units = kwargs.get("privacy_unit")
        if units is not None and self._loader_units is not None and units is not self._loader_units:
            raise refusal("units-two-sources")  # other ids than the ones the sampling was for
        if units is None and self._loader_units is not None:
            rows = _tensor_leaves(args, kwargs)[0].shape[0]
            if rows != self._loader_units.shape[0]:
                raise refusal("units-rows-mismatch", expected=self._loader_units.shape[0], got=rows)
            units = kwargs["privacy_unit"] = self._loader_units
        if units is None and self.requires_units:
            raise refusal("units-missing")
        _check_unit_ids(units)
        return kwargs

    # state_dict keys are the plain model's (no "module." prefix): pm.state_dict() loads into the
    # model and model.state_dict() into pm; "module."-prefixed keys are accepted too.
    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if state_dict and all(k.startswith("module.") for k in state_dict):
            state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    def _current_params(self) -> list:
        """The model's parameters, looked up by path: under Dynamo this adds few guards beyond the
        ones the model's own forward needs (a named_parameters() walk adds hundreds)."""
        return [_parameter(self.module, path) for path in _param_paths(self._table)]

    def _marked_forward(self, *args, **kwargs):
        checked = self.loss_fn is not None and "target" in kwargs
        target = kwargs.pop("target") if checked else None
        units = kwargs.pop("privacy_unit", None)
        _check_batch_sizes(_tensor_leaves(args, kwargs) + ([] if units is None else [units]))
        everything = self._current_params()
        trainable = _trainable(everything)  # guarded by each parameter's tensor guard
        params = [p for p, t in zip(everything, trainable) if t]
        spec = _spec_args(self._table, trainable, checked, units is not None)
        # the ids travel as a runtime tensor (never a constant): new ids every step, no recompile
        runtime = (self._fxclip_state, self._fxclip_thresholds, self._loss_scale(), units)
        args, kwargs, target = (_map_tensors(ops.BATCH_INPUT, t) for t in (args, kwargs, target))
        out = self.module(*args, **kwargs)
        if checked:  # the pass checks that these are per-sample losses (B,)
            out = self.loss_fn(out, target)
        return _map_tensors(lambda y: ops.BATCH_OUTPUT(y, params, *runtime, *spec) if y.is_floating_point()
                            else y, out)

    def _loss_scale(self) -> torch.Tensor:
        """S of the connected GradScaler, read on the device each step; else 1."""
        if self._scaled:
            return _torch.grad_scaler_scale(self.grad_scaler)
        return self._fxclip_state.new_ones(())


class _ParamTable:
    """The model's parameter names and each one's clipping group index (an index into the
    thresholds), with the rest of the spec fixed at privatize(). Traced code reads it only
    through the constant-result functions below: Dynamo guards its identity, not every name in it."""

    def __init__(self, names: list, group_of: dict, labels: list, mean: bool, owner: str, unit_mean: bool):
        index = {g: i for i, g in enumerate(labels)}
        self.names = tuple(names)
        self.groups = tuple(index[group_of[n]] for n in self.names)
        self.paths = tuple(tuple(n.split(".")) for n in self.names)
        self.mean, self.owner, self.unit_mean = mean, owner, unit_mean


@_torch.assume_constant_result
def _param_paths(table: _ParamTable) -> tuple:
    return table.paths


def _parameter(module: nn.Module, path: tuple):
    """The parameter at path (submodule names..., parameter name), read through _modules and
    _parameters as the model's forward reads them (the same guards and module names)."""
    for name in path[:-1]:
        module = module._modules[name]
    return module._parameters[path[-1]]


@_torch.assume_constant_result
def _spec_args(table: _ParamTable, trainable: tuple, checked_loss: bool, units: bool) -> tuple:
    """The ClipSpec as batch_output carries it. Computed once per compile: `trainable` is a
    constant of the traced graph."""
    picked = [(n, g) for n, g, t in zip(table.names, table.groups, trainable) if t]
    return ClipSpec(names=tuple(n for n, _ in picked),
                    frozen=tuple(n for n, t in zip(table.names, trainable) if not t),
                    groups=tuple(g for _, g in picked), mean=table.mean, checked_loss=checked_loss,
                    owner=table.owner, units=units, unit_mean=units and table.unit_mean).to_args()


def _trainable(params) -> tuple:
    return tuple(p.requires_grad for p in params)


def _map_tensors(fn, tree):
    """tree_map of fn over the tensor leaves, with a direct path for the usual single tensor or
    flat tuple/list of tensors (fewer Dynamo guards than the general pytree walk)."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if type(tree) in (tuple, list) and all(isinstance(x, torch.Tensor) for x in tree):
        return type(tree)(fn(x) for x in tree)
    if type(tree) is dict and all(isinstance(x, torch.Tensor) for x in tree.values()):
        return {k: fn(x) for k, x in tree.items()}
    return tree_map(lambda x: fn(x) if isinstance(x, torch.Tensor) else x, tree)


def _device_of(model: nn.Module):
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return None


def _check_threshold(value) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
            and math.isfinite(value)):
        raise ValueError(f"max_grad_norm must be a positive number, got {value!r}")


def _clipping_groups(model: nn.Module, clipping) -> dict:
    """Parameter name -> clipping-group label."""
    names = [n for n, _ in model.named_parameters()]
    if clipping == "flat":
        return {n: "all" for n in names}
    if clipping == "per_layer":
        return {n: n.rpartition(".")[0] for n in names}
    if isinstance(clipping, (list, tuple)) and all(isinstance(g, (list, tuple)) for g in clipping):
        group_of = {n: i for i, group in enumerate(clipping) for n in group}
        unknown = sorted(set(group_of) - set(names))
        missing = [n for n in names if n not in group_of]
        if unknown or missing:
            raise ValueError(
                f"clipping groups must name every parameter exactly once (model.named_parameters()); "
                f"unknown: {unknown}, missing: {missing}")
        return group_of
    raise ValueError(f"clipping must be 'flat', 'per_layer' or a list of lists of parameter names, "
                     f"got {clipping!r}")


def _is_packed(x) -> bool:
    return isinstance(x, nn.utils.rnn.PackedSequence)


def _leaves(args, kwargs):
    # the usual calls, tensors and flags, positional or by keyword: no pytree walk (Dynamo guards
    # every registered pytree type it looks up, ~25 guards evaluated at each call); the leaves
    # come in the walk's order
    if all(isinstance(a, torch.Tensor) for a in args) and all(
            isinstance(v, (torch.Tensor, bool, int, float, str)) for v in kwargs.values()):
        return [*args, *kwargs.values()]
    return tree_flatten((args, kwargs), is_leaf=_is_packed)[0]


def _tensor_leaves(args, kwargs) -> list:
    return [x for x in _leaves(args, kwargs) if isinstance(x, torch.Tensor)]


def _check_batch_sizes(tensors) -> None:
    """Every tensor input has the first one's batch size. Traced, the comparison is a shape
    guard that makes the inputs' batch sizes ONE symbol: once Dynamo makes the batch dim
    symbolic, each input gets its own size symbol, which a model need never relate (Hugging Face
    reads a padding mask as mask[arange(B), ...] with B from the ids), and the graph pass could
    not tell that the mask's rows are the samples'."""
    if any(t.shape[0] != tensors[0].shape[0] for t in tensors[1:]):
        raise refusal("inputs-batch-sizes-disagree",
                      sizes=", ".join(f"input {i}: {t.shape[0]}" for i, t in enumerate(tensors)))


def _check_unit_ids(units) -> None:
    """privacy_unit: one integer id per row, (B,)."""
    if units is None:
        return
    if not isinstance(units, torch.Tensor) or units.dim() != 1 or units.is_floating_point() \
            or units.is_complex() or units.dtype == torch.bool:
        what = f"{tuple(units.shape)} {units.dtype}" if isinstance(units, torch.Tensor) else type(units).__name__
        raise TypeError(f"privacy_unit must be a (B,) tensor of integer ids, one per row, got {what}")


def _check_inputs(args, kwargs) -> None:
    """Tensor leaves (of any pytree: tuples, lists, dicts) are per-sample data with the batch in
    dim 0, all of one batch size; other leaves must be plain constants shared by every sample."""
    leaves = _leaves(args, kwargs)
    tensors = []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            if leaf.dim() == 0:
                raise refusal("zero-dim-input", i=i)
            tensors.append(leaf)
        elif _is_packed(leaf):
            raise refusal("packed-sequence-input", i=i)
        elif not isinstance(leaf, _CONSTANTS):
            raise refusal("unsplittable-input", i=i, type=type(leaf).__name__)
    if not tensors:
        raise refusal("no-tensor-input")
    _check_batch_sizes(tensors)


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on a model output whose backward refuses create_graph=True (eager path)."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise refusal("double-backward")
        return grad


def privatize(model: nn.Module, *, max_grad_norm: float, loss_reduction: str = "mean",
              clipping="flat", nonfinite: str = "refuse", loss_fn=None,
              grad_scaler=None, unit_reduction: str = "sum") -> PrivatizedModule:
    """Return a module whose backward adds `sum_i R_i grad_i` to each trainable parameter's
    .grad (divided by B for loss_reduction="mean"), R_i = min(1, C / (||grad_i|| + 1e-6)).

    Use it eagerly or under torch.compile (default Inductor backend); batch dimension 0 on
    every input and output. clipping="flat" clips the norm over all parameters; "per_layer"
    (one group per module) or a list of lists of parameter names clips each group g on its
    own to C_g = C / sqrt(number of groups). `pm.max_grad_norm = C` changes the threshold at
    the next backward without recompiling.

    loss_fn(output, target) -> per-sample losses (B,): then `pm(x, target=y)` returns the
    per-sample losses, traced with the model, so a loss that mixes samples is refused like any
    mixing op; only `losses.sum()` / `losses.mean()` (as loss_reduction says) may follow, which
    the backward checks. Without loss_fn the loss computed outside is unchecked (a warning says so).

    nonfinite: a sample whose gradient is inf/NaN gets weight 0 in the backward (its values
    never reach .grad). "refuse" (default) makes the optimizer step raise PrivacyError and
    change no parameter (DPOptimizer.step(), or pm.check_step() before your own optimizer's
    step); "drop" trains on the clipped sum over the other samples.

    grad_scaler: the torch.amp.GradScaler of an fp16 loop: its scale S is read on the device at
    every backward and the scaled gradient clipped at S*C, so after unscale_ the gradients and
    per_sample_norms are those of the unscaled step.

    privacy units (docs/privacy-units.md): `pm(x, privacy_unit=ids)` (with or without target=)
    clips the gradient of each GROUP of rows with equal ids (a user, a sample's augmented copies,
    a micro-batch) instead of each row: g_u = sum of its rows' gradients (unit_reduction="sum")
    or their mean ("mean"), R_u = min(1, C / (||g_u|| + 1e-6)), and the parameter gradient is
    sum_u R_u g_u (divided by B for loss_reduction="mean"). ids are any integers, new every step.

    The model keeps its parameters and buffers (the same objects); pm.state_dict() has the
    model's keys; fxclip.unprivatize(pm) returns the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"privatize expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, PrivatizedModule):
        raise refusal("already-privatized")
    _check_threshold(max_grad_norm)
    if loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be 'refuse' or 'drop', got {nonfinite!r}")
    if unit_reduction not in UNIT_REDUCTIONS:
        raise ValueError(f"unit_reduction must be 'sum' or 'mean', got {unit_reduction!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (output, target) -> per-sample losses, got {loss_fn!r}")
    if grad_scaler is not None:
        _torch.check_grad_scaler(grad_scaler, _device_of(model))
    _refuse_unsupported_modules(model)
    _compile.install()
    _compile.trace_recurrent_modules(model)
    return PrivatizedModule(model, max_grad_norm, loss_reduction, clipping, nonfinite, loss_fn,
                            grad_scaler, unit_reduction)


def _refuse_unsupported_modules(model: nn.Module) -> None:
    """Modules whose trainable parameters the graph pass cannot reach, refused by name."""
    for path, module in model.named_modules():
        where = f"{type(module).__name__} at {path or '<root>'!r}"
        trainable = any(p.requires_grad for p in module.parameters(recurse=False))
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.max_norm is not None:
            raise refusal("embedding-max-norm", where=where, max_norm=module.max_norm)
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse and trainable:
            raise refusal("sparse-embedding", where=where, type=type(module).__name__)


def unprivatize(pm: nn.Module) -> nn.Module:
    """The plain model inside a privatized module (also through torch.compile's wrapper)."""
    inner = getattr(pm, "_orig_mod", pm)
    if not isinstance(inner, PrivatizedModule):
        raise TypeError(f"unprivatize expects a module returned by fxclip.privatize, got {type(pm).__name__}")
    return inner.module
