"""Every use of private torch APIs (torch._dynamo, torch._functorch, torch._inductor, torch._guards).

Tested on torch 2.13, 2.14 and 2.15 (pyproject.toml, .ci/run); a torch upgrade should only touch
this file. Where an internal differs between those releases, the branch names the release.
torch._dynamo and torch._inductor are imported at first use, not here: importing them costs ~2 s
and ~70 MB, which `import fxclip` must not pay (bench/import_cost.py).
"""
from __future__ import annotations

import importlib
import warnings

import torch
from torch._guards import detect_fake_mode as _detect_fake_mode

from .errors import DynamoPassthroughError, PrivacyError
from .refusals import refusal

# The releases the test suite passes on (.ci/run runs it on each); pyproject.toml's range.
TESTED_TORCH = ("2.13", "2.14", "2.15")
TESTED_RANGE = "torch>=2.13.0,<2.16"


def torch_release(version: str | None = None) -> str:
    """'2.15' of '2.15.0+cu130' (torch.__version__ by default)."""
    return ".".join((version or torch.__version__).split("+")[0].split(".")[:2])


def untested_torch_note(version: str | None = None) -> str:
    """'' on a tested torch; else a sentence naming the version and the tested range."""
    version = version or torch.__version__
    if torch_release(version) in TESTED_TORCH:
        return ""
    return (f"torch {version} is outside the releases fxclip is tested on ({TESTED_RANGE}); a torch "
            "internal its graph pass uses may have changed. Install a tested torch, or report this "
            "with the torch version.")


def warn_if_untested_torch() -> None:
    """Once per process (at `import fxclip`): the pass uses torch internals, so a torch outside
    the tested range may fail in it. Its checks (coverage, mixing) still run, so a failure is an
    error, not a wrong gradient."""
    note = untested_torch_note()
    if note:
        warnings.warn("fxclip: " + note, stacklevel=2)


class _LazyModule:
    """Attribute access to a module imported at first use (e.g. `_dynamo_exc.Unsupported`)."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr):
        return getattr(importlib.import_module(self._name), attr)


_dynamo_exc = _LazyModule("torch._dynamo.exc")


def assume_constant_result(fn):
    """torch.compiler.assume_constant_result without its `import torch._dynamo` (~2 s, ~70 MB
    at import time of the decorated module): the mark Dynamo reads when it traces a call of fn
    (torch/_dynamo/decorators.py, the same in 2.13, 2.14 and 2.15)."""
    fn._dynamo_marked_constant = True
    return fn


def load_inductor_prims() -> None:
    """Registers the prims Inductor decomposes into (prims.fma, ...), which the layout and rule
    modules name at import; loads torch._dynamo and torch._inductor."""
    import torch._inductor.lowering  # noqa: F401


_PASSTHROUGH: dict = {}


def passthrough(e: DynamoPassthroughError) -> Exception:
    """`e` as an instance of a subclass of its class and Dynamo's ShortenTraceback, to raise from
    inside a compiler backend: same name and message (`except PrivacyError` still catches it),
    plus the torch version on a torch outside the tested range."""
    from torch._dynamo.exc import ShortenTraceback

    cls = type(e)
    sub = _PASSTHROUGH.get(cls)
    if sub is None:
        def init(self, *args):
            ShortenTraceback.__init__(self, *args, first_useful_frame=None)

        sub = _PASSTHROUGH[cls] = type(cls.__name__, (cls, ShortenTraceback), {
            "__module__": cls.__module__, "__qualname__": cls.__qualname__, "__init__": init,
            "__reduce__": lambda self: (cls, self.args, {"id": getattr(self, "id", None)})})  # pickles as cls
    note, args = untested_torch_note(), e.args
    if note and args and isinstance(args[0], str) and note not in args[0]:
        args = (f"{args[0]} ({note})",) + args[1:]
    out = sub(*args)
    out.__dict__.update(e.__dict__)
    return out.with_traceback(e.__traceback__)


def run_joint_pass(fn, graph) -> None:
    """fn(graph) inside a compiler backend: a PrivacyError reaches the user unwrapped; on a torch
    outside the tested range, any failure of the pass names the torch version."""
    try:
        fn(graph)
    except DynamoPassthroughError as e:
        if isinstance(e, _dynamo_exc.ShortenTraceback):
            raise
        raise passthrough(e) from e.__cause__
    except Exception as e:
        note = untested_torch_note()
        if not note:
            raise
        raise RuntimeError(f"fxclip's graph pass failed ({type(e).__name__}: {e}). {note}") from e


def fake_mode_of(values):
    return _detect_fake_mode(values)


def inductor_decompositions():
    load_inductor_prims()  # before the decompositions that produce them
    from torch._inductor.decomposition import select_decomp_table

    return select_decomp_table()


def aot_eager_backend(joint_pass):
    """A Dynamo backend: AOTAutograd with Inductor's decompositions, `joint_pass` on the joint
    graph, and the forward/backward graphs run as plain aten calls (no code generation)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.compilers import nop
    from torch._functorch.partitioners import default_partition

    def partition(joint_module, joint_inputs, **kwargs):
        run_joint_pass(joint_pass, joint_module.graph)
        joint_module.recompile()
        return default_partition(joint_module, joint_inputs, **kwargs)

    return aot_autograd(
        fw_compiler=nop,
        bw_compiler=nop,
        partition_fn=partition,
        decompositions=inductor_decompositions(),
        keep_inference_input_mutations=True,
    )


_JOINT_PASS_CLASS = []


def _joint_pass_class():
    """The CustomGraphPass subclass, defined at first use (CustomGraphPass loads torch._inductor)."""
    if _JOINT_PASS_CLASS:
        return _JOINT_PASS_CLASS[0]
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class _JointPass(CustomGraphPass):
        def __init__(self, fn, uuid: str, chained=None):
            self.fn, self._uuid, self.chained = fn, uuid, chained

        def __call__(self, graph):
            if self.chained is not None:
                self.chained(graph)
            run_joint_pass(self.fn, graph)

        def uuid(self):
            # Enters Inductor's FX-graph and AOTAutograd cache keys, so a change to the pass
            # never reuses a graph compiled by an older one.
            inner = self.chained.uuid() if self.chained is not None else None
            return (self._uuid, inner)

    _JOINT_PASS_CLASS.append(_JointPass)
    return _JointPass


def install_inductor_joint_pass(fn, uuid: str) -> None:
    """Run `fn(graph)` on every joint forward+backward graph Inductor partitions.

    Idempotent; keeps (and runs first) a pass the user had installed already.
    """
    from torch._inductor import config as _inductor_config

    joint_pass = _joint_pass_class()
    current = _inductor_config.joint_custom_pre_pass
    if isinstance(current, joint_pass) and current.fn is fn:
        return
    _inductor_config.joint_custom_pre_pass = joint_pass(fn, uuid, chained=current)


def output_descriptors(output_node):
    """AOTAutograd's per-output descriptors of a joint graph: (kind, index) pairs.

    kind is "out" (forward output idx), "grad" (gradient of input idx) or None.
    """
    from torch._functorch._aot_autograd.descriptors import GradAOTOutput, PlainAOTInput, PlainAOTOutput

    result = []
    for d in output_node.meta.get("desc") or []:
        if isinstance(d, PlainAOTOutput):
            result.append(("out", d.idx))
        elif isinstance(d, GradAOTOutput) and isinstance(d.grad_of, PlainAOTInput):
            result.append(("grad", d.grad_of.idx))
        else:
            result.append((None, None))
    return result


def input_index(placeholder) -> int | None:
    """AOTAutograd's flat input index of a joint-graph placeholder (None for tangents)."""
    from torch._functorch._aot_autograd.descriptors import PlainAOTInput

    desc = placeholder.meta.get("desc")
    return desc.idx if isinstance(desc, PlainAOTInput) else None


def compile_with_backend(fn, backend):
    """Trace `fn` whole with Dynamo; a graph break is refused rather than split, and every
    tracing failure becomes a PrivacyError naming the user's line and what to change."""
    compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=None)

    def call(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except (_dynamo_exc.Unsupported, _dynamo_exc.UserError) as e:
            raise tracing_failure(e) from e
        except getattr(_dynamo_exc, "FailOnRecompileLimitHit", ()) as e:
            raise refusal("recompile-limit", limit=_dynamo_config().recompile_limit) from e

    return call


def _dynamo_config():
    import torch._dynamo.config as _dynamo_config

    return _dynamo_config


def allow_rnn_tracing() -> None:
    """Dynamo traces nn.LSTM/GRU/RNN modules (their cell ops) instead of breaking the graph at
    them. Under the user's own torch.compile no scope of ours is open while Dynamo traces, so the
    switch is set for the process (privatize does it only for models holding an RNN module;
    tracing them instead of breaking the graph changes no values)."""
    import torch._dynamo.config as _dynamo_config

    _dynamo_config.allow_rnn = True


# logging.Logger methods that only emit a record and return None; "_once" variants are what
# transformers adds to Logger (warning_once, info_once)
_LOGGER_METHODS = ("debug", "info", "warning", "warn", "error", "exception", "critical", "fatal", "log",
                   "warning_once", "info_once")


def ignore_logger_calls() -> None:
    """Dynamo drops logging.Logger calls in the code it traces instead of breaking the graph at
    them: a library that logs inside forward (transformers warns there that use_cache is off
    under gradient checkpointing) would otherwise cut the model into two graphs, which fxclip
    must refuse. The record is not emitted from traced code; values are unchanged (these methods
    return None). Set for the process, like allow_rnn_tracing: under the user's own
    torch.compile no scope of ours is open while Dynamo traces. Methods are read from Logger at
    each call, so ones a library added since the last privatize() are included."""
    import logging

    import torch._dynamo.config as _dynamo_config

    key = "ignore_logging_functions"  # 2.13's name; earlier releases: ignore_logger_methods
    key = key if hasattr(_dynamo_config, key) else "ignore_logger_methods"
    methods = {getattr(logging.Logger, name) for name in _LOGGER_METHODS if hasattr(logging.Logger, name)}
    if not methods <= getattr(_dynamo_config, key):
        setattr(_dynamo_config, key, getattr(_dynamo_config, key) | methods)


def _user_line(e) -> str:
    """'file:line in fn: `source`' of the innermost user frame Dynamo was tracing, or ''."""
    import linecache

    frames = [f for f in (getattr(e, "real_stack", None) or []) if "/fxclip/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    source = (linecache.getline(f.filename, f.lineno) or f.line or "").strip()
    return f"{f.filename}:{f.lineno} in {f.name}" + (f": `{source}`" if source else "")


def tracing_failure(e) -> PrivacyError:
    """What failed to trace, where, and what to change."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    where = _user_line(e)
    fields = {"head": "fxclip could not trace the model as one graph, which per-sample clipping needs",
              "at": f" at {where}" if where else "", "first": first}
    if "requires_grad" in first and "setattr" in first:
        return refusal("untraceable-requires-grad-set", **fields)
    if "requires_grad_()" in first:
        return refusal("untraceable-requires-grad-hook", **fields)
    if isinstance(e, _dynamo_exc.UserError) or "data-dependent" in str(e):
        return refusal("untraceable-data-dependent", **fields)
    return refusal("untraceable", **fields)


def no_ddp_graph_split():
    """Context manager: Dynamo compiles frames inside a DistributedDataParallel forward as ONE
    graph (torch._dynamo.config.optimize_ddp off), instead of splitting it at DDP's gradient-bucket
    boundaries, which would leave no single graph holding every parameter's per-sample gradient.
    DDP then all-reduces after backward as for any module (its C++ reducer, no overlap inside
    the compiled backward)."""
    import torch._dynamo.config as _dynamo_config

    return _dynamo_config.patch(optimize_ddp=False)


# --- torch.amp.GradScaler: fxclip reads the live scale tensor and reports overflow to it ---

def check_grad_scaler(scaler, device) -> None:
    """A GradScaler whose scale tensor exists (it is created lazily at the first scale() call,
    after the first forward: fxclip's graph needs it from the start)."""
    from torch.amp import GradScaler

    if not isinstance(scaler, GradScaler):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    if scaler.is_enabled() and scaler._scale is None:
        scaler._lazy_init_scale_growth_tracker(torch.device(scaler._device if device is None else device))


def grad_scaler_scale(scaler) -> torch.Tensor:
    """The scaler's current scale S, a device tensor updated in place by scaler.update()."""
    return scaler._scale


def report_overflow_to_scaler(scaler, optimizer, overflow: torch.Tensor) -> None:
    """Add fxclip's overflow flag to the inf checks `scaler` recorded for `optimizer`, so that
    scaler.update() lowers the scale (fxclip keeps inf out of .grad, where the scaler looks)."""
    state = scaler._per_optimizer_states.get(id(optimizer))
    for found in (state or {}).get("found_inf_per_device", {}).values():
        found.add_(overflow.to(found.device, found.dtype))


class _Traced(Exception):
    pass


def joint_graphs_on_fake_device(module, inputs, device: str, joint_pass) -> list:
    """[(plain joint graph, the graph after joint_pass)] of module(*inputs) traced with FAKE
    tensors on `device` (e.g. "cuda" on a machine without a GPU): what the pass would build for
    that device. Nothing is executed; the module and inputs may be on the CPU."""
    import copy

    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.compilers import nop
    from torch._subclasses.fake_tensor import FakeTensorMode

    graphs = []

    def partition(joint_module, joint_inputs, **kwargs):
        plain = copy.deepcopy(joint_module.graph)
        run_joint_pass(joint_pass, joint_module.graph)
        graphs.append((plain, joint_module.graph))
        raise _Traced

    def backend(gm, example_inputs):
        mode = FakeTensorMode()
        with mode:
            fakes = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
                     .requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
                     for t in example_inputs]
        compiled = aot_autograd(fw_compiler=nop, bw_compiler=nop, partition_fn=partition,
                                decompositions=inductor_decompositions())
        return compiled(gm, fakes)

    torch._dynamo.reset()
    try:
        torch.compile(module, backend=backend, fullgraph=True)(*inputs)
    except _dynamo_exc.BackendCompilerFailed as e:
        if not isinstance(e.inner_exception, _Traced):
            raise
    except _Traced:
        pass
    return graphs


def real_tensors():
    """A context in which tensors are real again (the joint-graph pass runs under the fake mode
    of the trace) and autograd is off: for timing candidate kernels at compile time."""
    import contextlib

    from torch._subclasses.fake_tensor import unset_fake_temporarily

    stack = contextlib.ExitStack()
    stack.enter_context(unset_fake_temporarily())
    stack.enter_context(torch.no_grad())
    return stack
