"""The benchmarked configurations.

Each configuration turns a (fresh, deep-copied) model into a ``Runner`` whose ``step(x, y)`` does one
training step's gradient work and leaves in ``p.grad`` of every trainable parameter

* plain configurations: ``sum_i grad L_i``             (no clipping; the speed/memory floor)
* private configurations: ``sum_i R_i * grad L_i``,    ``R_i = min(1, C / (n_i + 1e-6))``

with the loss ``sum_i L_i`` (``loss_reduction="sum"`` everywhere), clip norm ``C`` and no noise, so
all private configurations compute the same numbers (``python -m bench --check`` verifies this
against a float64 ``torch.func`` reference). No optimizer step is timed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from .models import PerSampleCE

EPS = 1e-6
OPAKE_MICROBATCH_GB = 1.0  # Opake instantiates per-sample gradients one microbatch at a time


@dataclass
class ConfigInfo:
    name: str
    label: str
    private: bool
    compiled: bool
    instantiates: bool  # materialises B x |params| per-sample gradients (memory guard applies)
    doc: str
    autocast: Optional[torch.dtype] = None  # forward under torch.autocast(device, dtype)


CONFIGS: dict[str, ConfigInfo] = {c.name: c for c in [
    ConfigInfo("plain_eager", "plain eager", False, False, False,
               "model(x); loss.backward() — no clipping"),
    ConfigInfo("plain_compiled", "plain compiled", False, True, False,
               "torch.compile(model, dynamic=False) — no clipping; the baseline (ratio 1.0)"),
    ConfigInfo("fxclip_eager", "fxclip eager", True, False, False,
               "fxclip.privatize(model) without torch.compile"),
    ConfigInfo("fxclip_compiled", "fxclip compiled", True, True, False,
               "torch.compile(fxclip.privatize(model), dynamic=False)"),
    ConfigInfo("opacus_ghost", "Opacus ghost", True, False, False,
               "Opacus GradSampleModuleFastGradientClipping(use_ghost_clipping=True) + "
               "DPLossFastGradientClipping: hooks compute norms in backward #1, "
               "backward #2 on sum_i R_i L_i"),
    ConfigInfo("opacus_hooks", "Opacus hooks", True, False, True,
               "Opacus GradSampleModule (vanilla per-sample grads) + Opacus clip_and_accumulate "
               "formula (per-param norms, einsum)"),
    ConfigInfo("functorch", "torch.func", True, False, True,
               "torch.func vmap(grad(functional_call)) per-sample grads + clip + einsum sum"),
    ConfigInfo("opake", "Opake", True, False, False,
               "Opake 0.16 clipped_grad(loss, clipping_norm=C, microbatch_size=mb): vmap(grad) + clip "
               "+ sum per microbatch of mb samples (mb: per-sample gradients of at most "
               f"{OPAKE_MICROBATCH_GB:g} GB at a time)"),
    ConfigInfo("opake_compiled", "Opake compiled", True, True, False,
               "Opake with each microbatch's vmap(grad) + clip + sum compiled by "
               "torch.compile(fullgraph=True, dynamic=False) (its _chunk_compiler hook)"),
]}

ALL_CONFIGS = list(CONFIGS)
BASELINE = "plain_compiled"

# bf16 autocast rows: not in the default sweep (ALL_CONFIGS), chosen with --configs (GPU runs)
BF16_CONFIGS = {c.name: c for c in [
    ConfigInfo("plain_compiled_bf16", "plain compiled bf16", False, True, False,
               "plain compiled, forward under torch.autocast(dtype=torch.bfloat16); loss in float32",
               torch.bfloat16),
    ConfigInfo("fxclip_compiled_bf16", "fxclip compiled bf16", True, True, False,
               "fxclip compiled, forward under torch.autocast(dtype=torch.bfloat16); loss in float32",
               torch.bfloat16),
]}
CONFIGS.update(BF16_CONFIGS)


class Runner:
    """``step(x, y)`` fills ``.grad``; ``params`` are the trainable parameters in a fixed order;
    ``norms()`` returns the last per-sample total gradient norms where the configuration has them."""

    def __init__(self, model: nn.Module, step: Callable, norms: Optional[Callable] = None, keep=None):
        self.model = model
        self.params = [p for p in _unique_params(model)]
        self.step = step
        self._norms = norms
        self._keep = keep  # keep wrapper objects alive

    def norms(self):
        return None if self._norms is None else self._norms()


def _unique_params(model):
    seen = set()
    for p in model.parameters():  # model.parameters() already de-duplicates tied parameters
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            yield p


def _zero(params):
    for p in params:
        p.grad = None


def _clip_sum(params, grad_samples, C):
    """Opacus' ``DPOptimizer.clip_and_accumulate`` formula: per-param norms, flat norm, einsum."""
    per_param = [g.reshape(len(g), -1).norm(2, dim=-1) for g in grad_samples]
    norms = torch.stack(per_param, dim=1).norm(2, dim=1)
    factor = (C / (norms + EPS)).clamp(max=1.0)
    for p, g in zip(params, grad_samples):
        p.grad = torch.einsum("i,i...", factor, g).view_as(p)
    return norms


def build(name: str, model: nn.Module, C: float = 1.0) -> Runner:
    return _BUILDERS[name](model, C)


def _autocast(fwd, dtype):
    """``fwd`` run under ``torch.autocast(x's device, dtype)``; the output back in float32, so the
    loss is computed in float32 (as autocast does for cross-entropy on CUDA)."""
    if dtype is None:
        return fwd

    def run(x):
        with torch.autocast(x.device.type, dtype=dtype):
            out = fwd(x)
        return out.float()

    return run


def _plain(model, C, compiled, autocast=None):
    fwd = _autocast(torch.compile(model, dynamic=False) if compiled else model, autocast)
    crit = PerSampleCE("sum")
    params = list(_unique_params(model))

    def step(x, y):
        _zero(params)
        crit(fwd(x), y).backward()

    return Runner(model, step)


def _fxclip(model, C, compiled, autocast=None):
    import fxclip

    pm = fxclip.privatize(model, max_grad_norm=C, loss_reduction="sum")
    fwd = _autocast(torch.compile(pm, dynamic=False) if compiled else pm, autocast)
    crit = PerSampleCE("sum")
    params = list(_unique_params(model))

    def step(x, y):
        _zero(params)
        crit(fwd(x), y).backward()

    return Runner(model, step, norms=lambda: pm.per_sample_norms, keep=(pm, fwd))


class _ZeroGradOnly:
    """What ``DPTensorFastGradientClipping.backward`` needs from an optimizer: ``zero_grad()``
    between its two backward passes, and the ``loss_reduction`` tag. (The real
    ``DPOptimizerFastGradientClipping`` does the same in zero_grad; we leave out its noise step.)"""

    def __init__(self, params, loss_reduction):
        self.params = params
        self.loss_reduction = loss_reduction

    def zero_grad(self, set_to_none: bool = True):
        _zero(self.params)


def _opacus_ghost(model, C):
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    gsm = GradSampleModuleFastGradientClipping(
        model, batch_first=True, loss_reduction="sum", max_grad_norm=C, use_ghost_clipping=True,
        strict=False,
    )
    params = list(_unique_params(model))
    opt = _ZeroGradOnly(params, "sum")
    crit = DPLossFastGradientClipping(gsm, opt, PerSampleCE("sum"), loss_reduction="sum")

    def step(x, y):
        _zero(params)
        loss = crit(gsm(x), y)
        loss.backward()  # two backward passes inside

    return Runner(model, step, norms=lambda: gsm.per_sample_gradient_norms, keep=(gsm,))


def _opacus_hooks(model, C):
    from opacus import GradSampleModule

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
    params = list(_unique_params(model))
    crit = PerSampleCE("sum")
    last = {}

    def step(x, y):
        for p in params:
            p.grad = None
            p.grad_sample = None
        crit(gsm(x), y).backward()
        gs = [p.grad_sample for p in params]
        last["n"] = _clip_sum(params, gs, C)
        for p in params:
            p.grad_sample = None

    return Runner(model, step, norms=lambda: last.get("n"), keep=(gsm,))


def _functorch(model, C):
    from torch.func import functional_call, grad, vmap

    names = [n for n, p in model.named_parameters() if p.requires_grad]  # tied: one name
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    buffers = dict(model.named_buffers())
    crit = PerSampleCE("sum")

    def loss_i(pdict, x_i, y_i):
        out = functional_call(model, (pdict, buffers), (x_i.unsqueeze(0),))
        return crit(out, y_i.unsqueeze(0))

    per_sample = vmap(grad(loss_i), in_dims=(None, 0, 0))
    last = {}

    def step(x, y):
        _zero(params)
        pdict = {n: p.detach() for n, p in zip(names, params)}
        g = per_sample(pdict, x, y)
        last["n"] = _clip_sum(params, [g[n] for n in names], C)

    r = Runner(model, step, norms=lambda: last.get("n"))
    r.params = params
    return r


def opake_microbatch(model: nn.Module, batch: int) -> int:
    """The largest microbatch whose per-sample gradients fit in OPAKE_MICROBATCH_GB."""
    per_sample = 4 * sum(p.numel() for p in _unique_params(model))
    return max(1, min(batch, int(OPAKE_MICROBATCH_GB * 1024**3 // per_sample)))


def _opake(model, C, compiled):
    from opake.dpsgd.clipping import clipped_grad
    from torch.func import functional_call

    names = [n for n, p in model.named_parameters() if p.requires_grad]  # tied: one name
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    buffers = dict(model.named_buffers())
    crit = PerSampleCE("sum")

    def loss_i(pdict, x_i, y_i):  # Opake vmaps over the batch: one sample, no batch dim
        return crit(functional_call(model, (pdict, buffers), (x_i.unsqueeze(0),)), y_i.unsqueeze(0))

    compiler = (lambda kernel: torch.compile(kernel, fullgraph=True, dynamic=False)) if compiled else None
    fns = {}

    def step(x, y):
        _zero(params)
        mb = opake_microbatch(model, len(x))
        if mb not in fns:
            fns[mb] = clipped_grad(loss_i, clipping_norm=C, batch_argnums=(1, 2), microbatch_size=mb,
                                   _chunk_compiler=compiler)
        fn, state = fns[mb]
        pdict = {n: p.detach() for n, p in zip(names, params)}
        out, _ = fn(pdict, x, y, state=state)
        for n, p in zip(names, params):
            p.grad = out.pytree[n]

    r = Runner(model, step)
    r.params = params
    return r


_BUILDERS = {
    "plain_eager": lambda m, C: _plain(m, C, False),
    "plain_compiled": lambda m, C: _plain(m, C, True),
    "fxclip_eager": lambda m, C: _fxclip(m, C, False),
    "fxclip_compiled": lambda m, C: _fxclip(m, C, True),
    "opacus_ghost": _opacus_ghost,
    "opacus_hooks": _opacus_hooks,
    "functorch": _functorch,
    "opake": lambda m, C: _opake(m, C, False),
    "opake_compiled": lambda m, C: _opake(m, C, True),
}


def reference_grads(model: nn.Module, x, y, C: float = 1.0, dtype=torch.float64):
    """float64 torch.func reference: (clipped sum, unclipped sum, per-sample norms), in the order of
    ``_unique_params(model)``."""
    import copy

    from torch.func import functional_call, grad, vmap

    m = copy.deepcopy(model).to("cpu", dtype)  # the reference is computed on the CPU
    x, y = x.cpu(), y.cpu()
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    pdict = {n: p.detach() for n, p in m.named_parameters() if p.requires_grad}
    buffers = dict(m.named_buffers())
    crit = PerSampleCE("sum")
    xx = x.to(dtype) if x.is_floating_point() else x

    def loss_i(pd, x_i, y_i):
        return crit(functional_call(m, (pd, buffers), (x_i.unsqueeze(0),)), y_i.unsqueeze(0))

    g = vmap(grad(loss_i), in_dims=(None, 0, 0))(pdict, xx, y)
    gs = [g[n] for n in names]
    norms = torch.stack([t.reshape(len(t), -1).norm(2, dim=-1) for t in gs], 1).norm(2, dim=1)
    factor = (C / (norms + EPS)).clamp(max=1.0)
    clipped = [torch.einsum("i,i...", factor, t) for t in gs]
    unclipped = [t.sum(0) for t in gs]
    return clipped, unclipped, norms


_BUILDERS.update({
    "plain_compiled_bf16": lambda m, C: _plain(m, C, True, torch.bfloat16),
    "fxclip_compiled_bf16": lambda m, C: _fxclip(m, C, True, torch.bfloat16),
})
