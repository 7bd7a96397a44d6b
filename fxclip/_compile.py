"""Wiring of the joint-graph pass into torch.compile (Inductor) and the eager path."""
from __future__ import annotations

import hashlib
import pathlib
import types
import warnings

from .passes import _torch

# RewriteReport of the latest graph rewritten under the user's torch.compile (Inductor), per
# privatized module (passes.protocol.ReportKey): two models never see each other's report
compiled_reports: dict = {}


def _pass_version() -> str:
    # Any change to the pass's source changes the cache keys of graphs it rewrote.
    import fxclip.passes as p

    digest = hashlib.sha256()
    for f in sorted(pathlib.Path(p.__file__).resolve().parent.rglob("*.py")):
        digest.update(f.read_bytes())
    return "fxclip-" + digest.hexdigest()[:16]


UNCHECKED_LOSS = (
    "fxclip: the loss of this privatized model is computed outside it, where nothing checks that "
    "it keeps samples apart (a contrastive or batch-centered loss would break the privacy "
    "guarantee without an error). Pass loss_fn=(output, target) -> per-sample losses to "
    "fxclip.privatize and call pm(x, target=y): the loss is then traced and checked with the model."
)


def _warn_if_unchecked(report) -> None:
    if not report.loss_checked:
        warnings.warn(UNCHECKED_LOSS, stacklevel=2)


def _inductor_pass(graph) -> None:
    from .passes import rewrite_joint_graph  # loaded at the first compile, not at import

    report = rewrite_joint_graph(graph)
    if report is not None:
        if report.key not in compiled_reports:  # once per privatized model
            _warn_if_unchecked(report)
        compiled_reports[report.key] = report


def install() -> None:
    _torch.install_inductor_joint_pass(_inductor_pass, _pass_version())
    _torch.ignore_logger_calls()  # a logging call in forward must not split the traced model


def trace_recurrent_modules(model) -> None:
    """nn.LSTM/GRU/RNN inside a privatized model are traced into their cell ops (Dynamo breaks
    the graph at them by default), so their parameters are clipped like any other."""
    import torch.nn as nn

    if any(isinstance(m, nn.RNNBase) for m in model.modules()):
        _torch.allow_rnn_tracing()


def compile_eager(owner, method: str):
    """Compile owner.<method> for the eager path, reporting the rewrite to the owner."""

    def joint_pass(graph):
        from .passes import rewrite_joint_graph

        report = rewrite_joint_graph(graph)
        if report is not None:
            if not owner._loss_warned:  # once per privatized module
                _warn_if_unchecked(report)
                owner._loss_warned = True
            owner._eager_report = report

    return _torch.compile_with_backend(own_code(owner, method), _torch.aot_eager_backend(joint_pass))


def own_code(owner, method: str):
    """owner.<method> bound to a private copy of its code object.

    Dynamo caches compiled code per code object, and a recompile limit applies to each: with a
    copy, every privatized module gets its own cache and budget, instead of all of them
    sharing (and soon exhausting) the one of PrivatizedModule's methods.
    """
    fn = getattr(type(owner), method)
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{id(owner):x}")
    return types.MethodType(types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__,
                                               fn.__closure__), owner)
