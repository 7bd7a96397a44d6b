"""privatize(): wrap a model so its backward clips every sample's gradient.

The wrapper marks the model's inputs and outputs with fxclip ops. Under torch.compile, the
joint-graph pass (installed into Inductor) finds the marks and rewrites the graph; called
eagerly, the wrapper compiles the model itself with a backend that runs the same pass and
executes the rewritten graph without code generation. Either way, one backward.
"""
from __future__ import annotations

import enum

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from . import _compile
from .passes import PrivacyError, ops

LOSS_REDUCTIONS = ("mean", "sum")
NONFINITE = ("refuse", "drop")

# Non-tensor inputs taken as constants shared by every sample (flags, sizes, names).
_CONSTANTS = (type(None), bool, int, float, complex, str, torch.dtype, torch.device, enum.Enum, slice,
              type(Ellipsis))

DOUBLE_BACKWARD = (
    "backward with create_graph=True (double backward: gradient penalties, MAML, Hessian-vector "
    "products) through a privatized model is not supported: fxclip clips first-order per-sample "
    "gradients only. Call loss.backward() without create_graph, or compute higher-order terms with "
    "the plain model (fxclip.unprivatize(pm))."
)


class PrivatizedModule(nn.Module):
    """`model` with per-sample clipped gradients; shares the model's parameters and buffers."""

    def __init__(self, model: nn.Module, max_grad_norm: float, loss_reduction: str, clipping="flat",
                 nonfinite: str = "refuse"):
        super().__init__()
        self.module = model
        self.max_grad_norm = float(max_grad_norm)
        self.loss_reduction = loss_reduction
        self.clipping = clipping
        self.nonfinite = nonfinite
        self._group_of = _clipping_groups(model, clipping)
        # Identifies this module's norms in the graph without baking a constant into it, so
        # privatized copies of one model class share compiled graphs.
        self.register_buffer("_fxclip_token", torch.zeros(1), persistent=False)
        self._eager = None
        self._eager_report = None
        self.forward = _compile.own_code(self, "forward")

    @property
    def last_report(self):
        """RewriteReport of this module's latest eager rewrite; under torch.compile, of the
        latest graph Inductor rewrote for a model with these trainable parameters (compiled
        graphs are shared by identical models). None when this process rewrote no such graph
        (e.g. the compiled graph came from Inductor's on-disk cache): use fxclip.explain."""
        if self._eager_report is not None:
            return self._eager_report
        names = frozenset(n for n, p in self.module.named_parameters() if p.requires_grad)
        return _compile.compiled_reports.get(names)

    @property
    def per_sample_norms(self) -> torch.Tensor | None:
        """Per-sample gradient norms n_i of the latest backward (detached)."""
        return ops.last_norms.get(self._fxclip_token.data_ptr())

    def forward(self, *args, **kwargs):
        if not self._needs_clipping():
            return self.module(*args, **kwargs)
        compiling = _compile.is_compiling()
        # under torch.compile, batch sizes are compared in the graph pass (no shape guards here)
        _check_inputs(args, kwargs, check_sizes=not compiling)
        if compiling:
            return self._marked_forward(*args, **kwargs)
        if self._eager is None:
            self._eager = _compile.compile_eager(self, "_marked_forward")
        out = self._eager(*args, **kwargs)
        return tree_map(lambda y: _NoDoubleBackward.apply(y) if _is_float(y) and y.requires_grad else y,
                        out)

    # state_dict keys are the plain model's (no "module." prefix): pm.state_dict() loads into the
    # model and model.state_dict() into pm; "module."-prefixed keys are accepted too.
    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if state_dict and all(k.startswith("module.") for k in state_dict):
            state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    def _needs_clipping(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.module.parameters())

    def _marked_forward(self, *args, **kwargs):
        named = list(self.module.named_parameters())
        names = [n for n, p in named if p.requires_grad]
        params = [p for n, p in named if p.requires_grad]
        frozen = [n for n, p in named if not p.requires_grad]
        groups, thresholds = self._group_spec(names)
        spec = (self._fxclip_token, "\n".join(names), "\n".join(frozen), groups, thresholds,
                self.loss_reduction == "mean", self.nonfinite)
        args, kwargs = tree_map(_mark_input, (args, kwargs))
        out = self.module(*args, **kwargs)
        return tree_map(lambda y: ops.batch_output(y, params, *spec) if _is_float(y) else y,
                        out)


    def _group_spec(self, names):
        """Group index of each trainable parameter and each group's threshold C_g, as strings.

        C_g = C / sqrt(G) over the G groups holding trainable parameters, so that
        sqrt(sum_g C_g^2) = C: the whole gradient of a sample still has norm at most C.
        """
        index: dict = {}
        for n in names:
            index.setdefault(self._group_of[n], len(index))
        threshold = self.max_grad_norm / max(len(index), 1) ** 0.5
        groups = ",".join(str(index[self._group_of[n]]) for n in names)
        return groups, ",".join([repr(threshold)] * len(index))


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


def _is_float(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _mark_input(x):
    return ops.batch_input(x) if isinstance(x, torch.Tensor) else x


def _is_packed(x) -> bool:
    return isinstance(x, nn.utils.rnn.PackedSequence)


def _check_inputs(args, kwargs, check_sizes: bool) -> None:
    """Tensor leaves (of any pytree: tuples, lists, dicts) are per-sample data with the batch in
    dim 0; other leaves must be plain constants shared by every sample."""
    leaves, _ = tree_flatten((args, kwargs), is_leaf=_is_packed)
    sizes = []
    for i, leaf in enumerate(leaves):
        if _is_packed(leaf):
            raise PrivacyError(
                f"input {i} (in flattened order) is a PackedSequence: it packs every sample's steps "
                "into one tensor ordered by time, so it has no batch dim to clip per sample. Pass "
                "the padded batch (B, T, ...) instead (with batch_first=True for nn.LSTM/GRU/RNN) "
                "and mask or gather the padded steps, e.g. h[arange(B), lengths - 1].")
        if isinstance(leaf, torch.Tensor):
            if leaf.dim() == 0:
                raise PrivacyError(
                    f"input {i} (in flattened order) is a 0-d tensor: every tensor input of a "
                    "privatized model must hold one row per sample in dim 0. Pass a per-sample "
                    "tensor of shape (B, ...), or keep shared values in the module (a buffer or "
                    "attribute) or as a Python number.")
            sizes.append((i, leaf.shape[0]))
        elif not isinstance(leaf, _CONSTANTS):
            raise PrivacyError(
                f"input {i} (in flattened order) is a {type(leaf).__name__}, which fxclip cannot "
                "split into samples. Pass torch.Tensors with the batch in dim 0, possibly nested in "
                "tuples, lists and dicts (register other containers with "
                "torch.utils._pytree.register_pytree_node); numpy arrays: torch.from_numpy(a).")
    if not sizes:
        raise PrivacyError(
            "the privatized model got no tensor input, so there is no batch to clip per sample. "
            "Pass the batch as torch.Tensors with the samples in dim 0.")
    if check_sizes and len({s for _, s in sizes}) > 1:
        raise PrivacyError(
            "the inputs' batch sizes disagree: " + ", ".join(f"input {i}: {s}" for i, s in sizes)
            + ". Every tensor input must hold one row per sample in dim 0, all with the same number "
            "of samples; pass shared tensors (masks, tables) as module buffers instead.")


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on a model output whose backward refuses create_graph=True (eager path)."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise PrivacyError(DOUBLE_BACKWARD)
        return grad


def privatize(model: nn.Module, *, max_grad_norm: float, loss_reduction: str = "mean",
              clipping="flat", nonfinite: str = "refuse") -> PrivatizedModule:
    """Return a module whose backward adds `sum_i R_i grad_i` to each trainable parameter's
    .grad (divided by B for loss_reduction="mean"), R_i = min(1, C / (||grad_i|| + 1e-6)).

    Use it eagerly or under torch.compile (default Inductor backend); batch dimension 0 on
    every input and output. clipping="flat" clips the norm over all parameters; "per_layer"
    (one group per module) or a list of lists of parameter names clips each group g on its
    own to C_g = C / sqrt(number of groups).

    nonfinite: a sample whose gradient is inf/NaN has no clipped gradient. "refuse" (default)
    raises PrivacyError in backward and leaves every .grad unchanged; "drop" gives that sample
    R = 0 and keeps its inf/NaN out of every reweighted gradient, so .grad holds the clipped
    sum over the other samples (a PrivacyError still guards .grad against any that get through).

    The model keeps its parameters and buffers (the same objects); pm.state_dict() has the
    model's keys; fxclip.unprivatize(pm) returns the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"privatize expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, PrivatizedModule):
        raise PrivacyError("this model is already privatized; pass the inner model (pm.module)")
    if not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be a positive number, got {max_grad_norm!r}")
    if loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be 'refuse' or 'drop', got {nonfinite!r}")
    _refuse_unsupported_modules(model)
    _compile.install()
    _compile.trace_recurrent_modules(model)
    return PrivatizedModule(model, max_grad_norm, loss_reduction, clipping, nonfinite)


def _refuse_unsupported_modules(model: nn.Module) -> None:
    """Modules whose trainable parameters the graph pass cannot reach, refused by name."""
    for path, module in model.named_modules():
        where = f"{type(module).__name__} at {path or '<root>'!r}"
        trainable = any(p.requires_grad for p in module.parameters(recurse=False))
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.max_norm is not None:
            raise PrivacyError(
                f"{where}: max_norm={module.max_norm} renormalizes rows of the weight in place "
                "inside the forward, from the batch's ids: an update of the model that bypasses "
                "clipping and noise. Use max_norm=None (renormalize in the optimizer step if you "
                "need it).")
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse and trainable:
            raise PrivacyError(
                f"{where}: sparse=True gives sparse gradients, which the joint graph cannot carry "
                f"per sample. Use nn.{type(module).__name__}(..., sparse=False).")


def unprivatize(pm: nn.Module) -> nn.Module:
    """The plain model inside a privatized module (also through torch.compile's wrapper)."""
    inner = getattr(pm, "_orig_mod", pm)
    if not isinstance(inner, PrivatizedModule):
        raise TypeError(f"unprivatize expects a module returned by fxclip.privatize, got {type(pm).__name__}")
    return inner.module
