"""DPOptimizer: Gaussian noise on the clipped gradient sum, then any torch optimizer's step.

A privatized module's backward leaves p.grad = (1/B if "mean" else 1) * sum_i R_i grad_i for the
ACTUAL batch size B. DP-SGD needs

    update gradient = (sum_i R_i grad_i + N(0, sigma^2 C^2)) / expected_batch_size   ("mean")
    update gradient =  sum_i R_i grad_i + N(0, sigma^2 C^2)                          ("sum")

Dividing by the expected (not the actual) batch size keeps the sensitivity fixed under Poisson
sampling: the actual size depends on who is in the batch. So while a DPOptimizer owns the module
(runtime fields of its device state: `owners`, and `sum_divisor` = the expected batch size, 1 for
"sum"), the graph scales each backward's clip factors by that backward's own B over the expected
one and leaves sum_i R_i grad_i / expected_batch_size: gradient accumulation stays exact when
micro-batches differ in size, with no gradient hook, no second gradient-sized tensor, and no pass
over the gradients to divide them; the step adds the noise scaled by the same divisor.
"""
from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch
from torch import nn

from .noise import NoiseSource
from .passes import _torch
from .passes.protocol import DeviceState
from .passes.refusals import refusal

if TYPE_CHECKING:
    from .accounting import Accountant

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _unwrap(module: nn.Module) -> nn.Module:
    # torch.compile(pm) returns a wrapper that keeps the original module as _orig_mod;
    # DistributedDataParallel keeps it as .module
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod
        elif isinstance(module, torch.nn.parallel.DistributedDataParallel):
            module = module.module
        else:
            return module


def _local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) gradient's local shard, which its owner noises; else t itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _is_privatized(m) -> bool:
    # getattr_static: a property (per_sample_norms reads the device state) is not run
    return all(inspect.getattr_static(m, a, None) is not None
               for a in ("max_grad_norm", "loss_reduction", "per_sample_norms"))


def _privatized_parts(module: nn.Module) -> list:
    """The privatized module itself, or the privatized blocks inside a model whose blocks were
    privatized one by one (fxclip.distributed.privatize_blocks)."""
    m = _unwrap(module)
    if _is_privatized(m):
        return [m]
    parts = []
    for sub in m.modules():
        if _is_privatized(sub) and not any(sub in set(p.modules()) for p in parts):
            parts.append(sub)
    return parts


def _module_bound(parts) -> float:
    """A sample's whole clipped gradient has norm <= sqrt(sum over privatized parts of C_b^2)."""
    return math.sqrt(sum(p.max_grad_norm ** 2 for p in parts))


def _check_expected_batch_size(value) -> None:
    # an integer up to 2^24: the graph divides by it, held exactly in the float32 device state
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 2**24:
        raise ValueError(f"expected_batch_size must be a positive int (at most 2^24), got {value!r}")


def _delegated(name: str) -> property:
    """An attribute read from and written to the wrapped optimizer."""
    return property(lambda self: getattr(self.original_optimizer, name),
                    lambda self, value: setattr(self.original_optimizer, name, value))


class DPOptimizer(torch.optim.Optimizer):
    """Wraps `optimizer` so that step() performs a DP-SGD step on the clipped gradients.

    Args:
        optimizer: any torch optimizer over (a subset of) the privatized model's parameters.
        privatized_module: the module from fxclip.privatize (compiled or not).
        noise_multiplier: sigma; the noise std on the gradient sum is sigma * max_grad_norm.
        expected_batch_size: divisor of the noised sum for loss_reduction="mean"
            (for Poisson sampling: q * dataset size, NOT the actual batch size; for privacy
            units, the expected number of UNITS: q * number of users).
        max_grad_norm: C for the noise scale; default the module's. It may not be smaller than
            the module's clipping bound (the noise would undershoot the sensitivity).
        loss_reduction: "mean" or "sum"; default the module's.
        sample_rate: Poisson sampling rate q, needed for accounting (make_private sets it).
        generator: torch.Generator for the noise, so tests and experiments can be seeded.
            Default: torch's global RNG. A Mersenne-Twister/Philox stream is predictable from its
            seed/state, so it is fine for research but NOT for a real deployment.
        secure_rng: draw the noise from the operating system's CSPRNG (os.urandom) instead;
            use this for real deployments. Slower (CPU, 16 bytes per coordinate); no seeding.
        prefetch_noise: draw the next step's noise on a worker thread while the caller loads
            data and runs forward and backward (CPU parameters only; fxclip.noise). For models
            of millions of parameters on CPU, where the draw costs as much as the backward.
            Holds one gradient-sized buffer; draws from a generator of its own seeded once from
            `generator` (or torch's global RNG): the same seed gives the same run, but other
            values than without prefetching.
        noise_rng: "torch" (default): the values of torch.randn from `generator`; "philox": a
            counter-based stream keyed by one draw from `generator`, about twice as fast on CPU
            (fxclip.philox: compiled once with the C compiler torch.compile already uses; CPU
            parameters only). With it, prefetch_noise draws the same values as without.
        accountant: an fxclip.accounting.Accountant, or "rdp" (default) / "pld".
        adaptive_clipping: an fxclip.AdaptiveClipping: the threshold follows a quantile of the
            norms; its noised count is accounted with the gradient (noise_multiplier is the total).

    Gradient accumulation: call backward on several micro-batches, then step() once. The noise
    is added once and the accountant counts one step per step() call (a logical batch).
    While this optimizer owns the module (until remove_hooks()) its backward leaves the clipped sum
    divided by expected_batch_size ("mean"; the sum itself for "sum"): each graph scales its clip
    factors by its own batch size over the expected one.
    A step() with no backward since zero_grad() (an empty Poisson batch) still adds noise and
    is counted: skipping it would leak that the batch was empty.

    The state_dict holds the inner optimizer's state and the accountant's history, so a run
    resumed from it continues epsilon. It does not hold the noise generator's state (a leaked
    checkpoint would reveal the noise): reseed, or better use secure_rng, after resuming.
    """

    # GradScaler.step() then calls step() with the scale and its inf check set as attributes
    # (grad_scale, found_inf) instead of unscaling and skipping on its own: fxclip must see
    # scaled steps, to refuse one whose scaler it was not told about.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        privatized_module: nn.Module,
        *,
        noise_multiplier: float,
        expected_batch_size: int,
        max_grad_norm: float | None = None,
        loss_reduction: str | None = None,
        sample_rate: float | None = None,
        generator: torch.Generator | None = None,
        secure_rng: bool = False,
        prefetch_noise: bool = False,
        noise_rng: str = "torch",
        accountant: Accountant | str = "rdp",
        adaptive_clipping=None,
    ):
        if isinstance(optimizer, DPOptimizer):
            raise TypeError("optimizer is already a DPOptimizer; wrap the plain torch optimizer")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        parts = _privatized_parts(privatized_module)
        if not parts:
            raise TypeError("privatized_module must come from fxclip.privatize(model, ...), "
                            f"got {type(privatized_module).__name__}")
        if len({p.loss_reduction for p in parts}) > 1:
            raise ValueError("the privatized blocks disagree on loss_reduction")
        pm = parts[0] if len(parts) == 1 else _unwrap(privatized_module)
        module_bound = _module_bound(parts)
        module_reduction = parts[0].loss_reduction
        if noise_multiplier is None or not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
        _check_expected_batch_size(expected_batch_size)
        if max_grad_norm is not None and float(max_grad_norm) < module_bound * (1 - 1e-12):
            raise ValueError(f"max_grad_norm={max_grad_norm} is smaller than the module's clipping "
                             f"bound {module_bound}: the noise would not cover the sensitivity")
        loss_reduction = module_reduction if loss_reduction is None else loss_reduction
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if sample_rate is not None and not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if secure_rng and generator is not None:
            raise ValueError("pass either generator= (seedable, for tests) or secure_rng=True, not both")
        if noise_rng not in ("torch", "philox"):
            raise ValueError(f"noise_rng must be 'torch' or 'philox', got {noise_rng!r}")
        if noise_rng == "philox" and secure_rng:
            raise ValueError("secure_rng=True draws from os.urandom: it takes no noise_rng='philox'")
        if isinstance(accountant, str):
            from .accounting import Accountant  # dp_accounting loads at first use, not at import

            accountant = Accountant(accountant)

        # each privatized parameter's (part, clipping group): the noise covers the groups of
        # what step() releases
        self._group_of = {id(p): (i, g) for i, part in enumerate(parts)
                          for p, g in zip(part._current_params(), part._table.groups)}
        self.original_optimizer = optimizer
        self._released_by_key = {}
        self._refresh_params()
        stray = [p for p in self._params if id(p) not in self._group_of]
        if stray:
            raise ValueError(f"{len(stray)} trainable optimizer parameter(s) are not in the privatized "
                             "module: their gradients would be unclipped")
        held = {id(p) for p in self._params}
        missing = [n for part in parts for n, p in part.named_parameters()
                   if p.requires_grad and id(p) not in held]
        if missing:
            # such a parameter gets clipped gradients that no step applies, while epsilon is spent:
            # the silent failure of LoRA weights left out of the optimizer
            raise refusal("parameters-not-in-optimizer", count=len(missing), first=missing[0])

        if prefetch_noise and any(p.device.type != "cpu" for p in self._params):
            raise ValueError("prefetch_noise draws on a CPU worker thread, for CPU parameters; on an "
                             "accelerator the noise kernels already run asynchronously: leave it off")
        if noise_rng == "philox" and any(p.device.type != "cpu" for p in self._params):
            raise ValueError("noise_rng='philox' is a CPU stream, for CPU parameters; on an accelerator "
                             "torch's generator is a Philox kernel already: leave the default")
        self.module = pm
        self.noise_multiplier = float(noise_multiplier)
        self._expected_batch_size = expected_batch_size
        self._noise_bound = None if max_grad_norm is None else float(max_grad_norm)
        self.loss_reduction = loss_reduction
        self.sample_rate = sample_rate
        self.generator = generator
        self.secure_rng = secure_rng
        self.prefetch_noise = bool(prefetch_noise)
        self.noise_rng = noise_rng
        self.noise_source = self._new_noise_source()
        self.accountant = accountant
        # torch.optim.Optimizer bookkeeping that LR schedulers and step hooks expect
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._zero_grad_profile_name = "DPOptimizer.zero_grad"
        self._steps = 0
        self.last_batch_size = None  # samples in the last step (over all ranks)
        self.last_local_batch_size = None
        self.last_micro_batches = None
        self.last_units = None  # privacy units in the last step (rows, without unit ids)
        self.skipped_steps = 0  # steps a GradScaler skipped for overflow (still accounted)
        self._parts = parts
        self.adaptive_clipping = adaptive_clipping
        if adaptive_clipping is not None:
            adaptive_clipping.attach(self)
        self._owned = list(parts)
        for part in self._owned:  # their backwards leave the clipped sum / the divisor
            part._add_owner(1)
        self._write_divisor()

    # --- delegate the optimizer state so schedulers and user code see the inner optimizer ---
    param_groups = _delegated("param_groups")
    state = _delegated("state")
    defaults = _delegated("defaults")

    def add_param_group(self, param_group):
        raise NotImplementedError("add parameter groups to the inner optimizer before wrapping it")

    @property
    def max_grad_norm(self) -> float:
        """C of the noise N(0, sigma^2 C^2): the one given, or the current clipping bound of what
        step() releases (thresholds are runtime values: a changed pm.max_grad_norm is followed)."""
        return self._clipping_bound() if self._noise_bound is None else self._noise_bound

    def _clipping_bound(self) -> float:
        """sqrt(sum of C_g^2) over the clipping groups holding a released parameter: a sample's
        clipped contribution to what step() releases has at most this norm."""
        return math.sqrt(sum(self._parts[i]._limits[g] ** 2 for i, g in self._released_groups))

    def _refresh_params(self) -> None:
        """The parameters step() releases: the optimizer's parameters that are trainable now or
        hold a gradient (the inner optimizer updates those), and their clipping groups. Follows
        requires_grad: a parameter unfrozen after this optimizer was built is noised too. Cached
        per pattern (one pass over the parameters per step, no walk of the module)."""
        every = [p for group in self.original_optimizer.param_groups for p in group["params"]]
        key = (tuple(map(id, every)), tuple(p.requires_grad or p.grad is not None for p in every))
        released = self._released_by_key.get(key)
        if released is None:
            params = [p for p, r in zip(every, key[1]) if r]
            groups = sorted({self._group_of[id(p)] for p in params if id(p) in self._group_of})
            stray = sum(id(p) not in self._group_of for p in params)
            if len(self._released_by_key) >= 16:  # patterns that keep changing: bounded memory
                self._released_by_key.clear()
            released = self._released_by_key[key] = (params, groups, stray)
        self._params, self._released_groups, self._stray = released

    @property
    def expected_batch_size(self) -> int:
        return self._expected_batch_size

    @expected_batch_size.setter
    def expected_batch_size(self, value: int) -> None:
        _check_expected_batch_size(value)
        self._expected_batch_size = value
        self._write_divisor()

    def _divisor(self) -> int:
        """What the update divides the noised clipped sum by."""
        return self._expected_batch_size if self.loss_reduction == "mean" else 1

    def _write_divisor(self) -> None:
        """The owned modules' backwards leave the clipped sum divided by it (a device write: the
        next backward follows it, no recompile)."""
        for part in self._owned:
            part.device_state.set("sum_divisor", self._divisor())

    # --- the per-backward rescale ---
    @property
    def batch_size(self) -> int:
        """Real samples in the current logical batch (summed over micro-batches). Reads the
        device state: a host sync."""
        return self._pending("samples")

    @property
    def micro_batches(self) -> int:
        """Backward passes in the current logical batch (a host sync)."""
        return self._pending("backwards")

    def _pending(self, field: str) -> int:
        # privatized blocks of one model all see the same samples: count them once
        return int(max(part.read_state()[field] for part in self._parts))

    # --- the DP step ---
    def _new_noise_source(self) -> NoiseSource:
        """Where the N(0, 1) values come from (fxclip.noise), for the current generator."""
        return NoiseSource(self.generator, secure=self.secure_rng, prefetch=self.prefetch_noise,
                           philox=self.noise_rng == "philox")

    def _noise(self, p: torch.Tensor, std: float) -> torch.Tensor:
        """N(0, std^2) shaped like p, never in 16 bits (adaptive clipping's count)."""
        dtype = torch.float32 if p.dtype in _LOW_PRECISION else p.dtype
        return self.noise_source.normal(p.numel(), dtype, p.device).view(p.shape).mul_(std)

    def add_noise(self) -> None:
        """Turns each .grad from the clipped sum / the divisor (what the owned backwards leave)
        into the noised update gradient, in place: + N(0, sigma^2 C^2) / the divisor.
        Several processes: the ranks that add noise add it to their own sums (rank 0 alone, or
        under FSDP2 every rank to its shard), then the sums are combined (_combine_sums)."""
        self._refresh_params()
        self._add_noise()

    @torch.no_grad()
    def _add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm / self._divisor()
        grads = [p.grad for p in self._params]
        if all(type(g) is torch.Tensor and g.layout is torch.strided and g.dtype is p.dtype
               and g.dtype not in _LOW_PRECISION for g, p in zip(grads, self._params)):
            accs = local = grads  # the common case: dense gradients, noised in place as they are
        else:
            accs = [self._accumulator(p) for p in self._params]
            local = [_local_tensor(acc) for acc in accs]  # a sharded gradient: this rank's shard
        if self._adds_noise():
            self.noise_source.add_(local, std)
        self._combine_sums(local)
        if accs is not grads:
            for p, acc in zip(self._params, accs):
                if acc is not p.grad:
                    p.grad = acc.to(p.dtype)

    # --- where several processes differ (fxclip.distributed.DistributedDPOptimizer overrides) ---
    def _adds_noise(self) -> bool:
        """Whether this rank adds noise to its clipped sums (one process: yes)."""
        return True

    def _combine_sums(self, accs: list) -> None:
        """Makes the ranks' (noised) clipped sums the global one, in place (one process: as is)."""

    def _shared_normal(self, std: float) -> float:
        """One N(0, std^2) value, the same on every rank (adaptive clipping's count noise)."""
        return float(self._noise(torch.zeros(()), std))

    @staticmethod
    def _accumulator(p: torch.Tensor) -> torch.Tensor:
        """p's clipped sum in a dtype the noise is added in (never 16 bits): .grad itself where
        it has that dtype (ours to overwrite in place), else a copy, zeros without a gradient."""
        g = p.grad
        if g is not None and g.is_sparse:
            raise RuntimeError("sparse gradients are not supported by DPOptimizer")
        wide = torch.float32 if p.dtype in _LOW_PRECISION else p.dtype
        if g is None:
            return torch.zeros_like(p, dtype=wide)
        return g if g.dtype == wide else g.to(wide)

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for hook in list(self._optimizer_step_pre_hooks.values()):
            hook(self, (), {})
        # a GradScaler whose step() called this one set these (optimizers that declare
        # _step_supports_amp_scaling get the scale and the inf check instead of being skipped)
        scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        self._refresh_params()
        state = self._take_state(found_inf)
        if not self._checked(state, found_inf):
            self._count_step()  # the data was touched: an overflow-skipped step still spends epsilon
            self.skipped_steps += 1
            return loss
        if scale is not None:  # the scaler has not unscaled yet: do it here
            inv = scale.double().reciprocal().float()
            for p in self._params:
                if p.grad is not None:
                    p.grad.mul_(inv.to(p.grad.device, p.grad.dtype))
        self._add_noise()
        self._count_step()
        if self.adaptive_clipping is not None:
            self.adaptive_clipping.update(self, state["unclipped"])
        self.original_optimizer.step()
        if self._adds_noise():
            self.noise_source.draw_ahead()  # after every other draw of this step: the same order
        for hook in list(self._optimizer_step_post_hooks.values()):
            hook(self, (), {})
        return loss

    def _take_state(self, found_inf) -> dict:
        """What the backwards since the last step recorded, over the privatized parts, with
        the scaler's inf flag: ONE host sync per step. Resets the parts' counts."""
        has_grad = any(p.grad is not None for p in self._params)
        mine, merged = self._read_states(found_inf, has_grad)
        for part in self._parts:
            part.reset_state()
        self.last_batch_size = int(merged["samples"])
        self.last_local_batch_size = int(mine["samples"])
        self.last_micro_batches = int(mine["backwards"])
        self.last_units = int(merged["units"])
        return merged

    def _read_states(self, found_inf, has_grad: bool) -> tuple[dict, dict]:
        """(this process's state, the state over all processes) in ONE host sync: the state
        fields, the scaler's inf flag, and whether a gradient exists without a backward. One
        process: both are the same dict, read straight from the device state."""
        state = self._device_state()
        if found_inf is not None:
            state = torch.cat([state, torch.as_tensor(found_inf).reshape(1).to(state)])
        values = state.tolist()
        fields = DeviceState.as_dict(values)
        fields["found_inf"] = values[-1] if found_inf is not None else 0.0
        fields["no_backward"] = float(has_grad and fields["backwards"] == 0)
        return fields, fields

    def _device_state(self) -> torch.Tensor:
        """The state fields, the max over the privatized blocks (which all see the same samples)."""
        if len(self._parts) == 1:
            return self._parts[0].device_state.tensor
        return torch.stack([p.device_state.tensor for p in self._parts]).amax(0)

    def _checked(self, state: dict, found_inf) -> bool:
        """Refuse (PrivacyError, no parameter changed) what the backwards flagged; False for a
        step to skip because a connected GradScaler overflowed."""
        scalers = {id(p.grad_scaler): p.grad_scaler for p in self._parts
                   if p.grad_scaler is not None and p.grad_scaler.is_enabled()}
        refuse = None
        if self._stray:
            refuse = refusal("unprivatized-parameter-released", count=self._stray)
        elif found_inf is not None and not scalers:
            refuse = refusal("unknown-scaler")
        elif scalers and found_inf is None:
            refuse = refusal("scaler-not-stepping")
        elif state["bad_seed"] > 0:
            refuse = refusal("bad-reduction", reduction=self._parts[0].loss_reduction)
        elif state["no_backward"] > 0:
            refuse = refusal("no-backward")
        elif self.last_micro_batches > 1 and any(getattr(p, "requires_units", False) for p in self._parts):
            refuse = refusal("units-several-backwards", count=self.last_micro_batches)
        elif self._noise_bound is not None and self._noise_bound < self._clipping_bound() * (1 - 1e-12):
            refuse = refusal("noise-below-clipping", noise=self._noise_bound, bound=self._clipping_bound())
        if refuse is not None:
            self._discard_grads()
            raise refuse
        if scalers and (state["nonfinite"] > 0 or state["found_inf"] > 0):
            # fp16 overflow: skip the step as GradScaler does, and make its update() lower the scale
            for scaler in scalers.values():
                _torch.report_overflow_to_scaler(scaler, self, torch.ones(()))
            self._discard_grads()
            return False
        refusing = [p for p in self._parts if p.nonfinite == "refuse"]
        if state["nonfinite"] > 0 and refusing:
            self._discard_grads()
            raise refusing[0].nonfinite_refusal(state)
        return True

    def _discard_grads(self) -> None:
        for p in self._params:
            p.grad = None

    def _count_step(self) -> None:
        self._steps += 1
        if self.sample_rate is not None:
            self.accountant.step(self.noise_multiplier, self.sample_rate,
                                 extra_noise_multipliers=self._extra_noise_multipliers())

    def _extra_noise_multipliers(self) -> tuple:
        """Other Gaussian releases of each step's batch (adaptive clipping's noised count)."""
        if self.adaptive_clipping is None:
            return ()
        return (self.adaptive_clipping.count_noise_multiplier,)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        for part in self._parts:  # a discarded backward's counts and flags go too (no sync)
            part.reset_state()

    # --- accounting and checkpoints ---
    @property
    def steps(self) -> int:
        """Logical steps taken (optimizer steps, not micro-batches)."""
        return self._steps

    def epsilon(self, delta: float) -> float:
        """Privacy spent so far, (epsilon, delta)-DP, from the accountant's history."""
        if self.sample_rate is None:
            raise ValueError("epsilon needs the Poisson sample rate: pass sample_rate=q to "
                             "DPOptimizer (make_private does this for you)")
        return self.accountant.epsilon(delta)

    def state_dict(self) -> dict:
        return {
            "optimizer": self.original_optimizer.state_dict(),
            "accountant": self.accountant.state_dict(),
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "module_max_grad_norms": [p.max_grad_norm for p in self._parts],
            "expected_batch_size": self.expected_batch_size,
            "sample_rate": self.sample_rate,
            "steps": self._steps,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if "accountant" not in state_dict:
            raise ValueError("not a DPOptimizer state_dict (no accountant history); a plain "
                             "optimizer checkpoint would restart epsilon from zero")
        self.original_optimizer.load_state_dict(state_dict["optimizer"])
        self.accountant.load_state_dict(state_dict["accountant"])
        self._steps = int(state_dict["steps"])
        # adaptive clipping moved the thresholds: a resumed run goes on from where it stopped
        for part, c in zip(self._parts, state_dict.get("module_max_grad_norms", [])):
            part.max_grad_norm = c

    def remove_hooks(self) -> None:
        """Detach from the module: its backward leaves its plain output again (the mean of the
        clipped gradients for loss_reduction="mean")."""
        for part in self._owned:
            part._add_owner(-1)
        self._owned = []

    def __repr__(self) -> str:
        return (f"DPOptimizer({type(self.original_optimizer).__name__}, noise_multiplier="
                f"{self.noise_multiplier}, max_grad_norm={self.max_grad_norm}, expected_batch_size="
                f"{self.expected_batch_size}, loss_reduction={self.loss_reduction!r}, steps={self.steps})")
