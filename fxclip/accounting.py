"""Privacy accounting for DP-SGD, delegated entirely to Google's `dp_accounting`.

We never hand-write RDP or PLD math: each run of training steps becomes a dp_accounting event
``SelfComposed(PoissonSampled(q, Gaussian(sigma)), steps)`` and a fresh dp_accounting accountant
turns the composed history into epsilon.

Default mechanism: RDP. It is fast for any number of steps and any sigma, numerically robust,
and is what most DP-SGD papers report; it is an upper bound, typically 10-30% above the tight
value. ``mechanism="pld"`` (privacy loss distributions) gives that tighter epsilon at a higher,
sigma-dependent cost (small sigma and many steps get slow and memory hungry).
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Iterable

import dp_accounting
from dp_accounting import pld, rdp

MECHANISMS = ("rdp", "pld")


def _check_mechanism(mechanism: str) -> str:
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
    return mechanism


@contextlib.contextmanager
def _quiet():
    # dp_accounting's RDP logs a warning per order it drops for numerical non-convergence; a
    # dropped order only loosens the (still valid) bound, so keep it out of progress bars.
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _fresh(mechanism: str) -> dp_accounting.PrivacyAccountant:
    if mechanism == "rdp":
        return rdp.RdpAccountant()  # dp_accounting's default order grid
    return pld.PLDAccountant()


def _check_step(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    if not 0 <= sample_rate <= 1:
        raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate!r}")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")


def dp_sgd_event(noise_multiplier: float, sample_rate: float, steps: int) -> dp_accounting.DpEvent:
    """The dp_accounting event for `steps` Poisson-sampled Gaussian DP-SGD steps."""
    _check_step(noise_multiplier, sample_rate, steps)
    step = dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    return dp_accounting.SelfComposedDpEvent(step, int(steps))


def epsilon_for(history: Iterable[tuple[float, float, int]], delta: float, mechanism: str = "rdp") -> float:
    """Epsilon at `delta` of a history of (noise_multiplier, sample_rate, steps) runs."""
    _check_mechanism(mechanism)
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    events = [dp_sgd_event(*h) for h in history if h[2] > 0]
    if not events:
        return 0.0
    if any(h[0] == 0 and h[1] > 0 and h[2] > 0 for h in history):
        return math.inf  # a noiseless step that may see data releases it in the clear
    acc = _fresh(mechanism)
    with _quiet():
        acc.compose(dp_accounting.ComposedDpEvent(events))
        return float(acc.get_epsilon(delta))


_SIGMA_FLOOR = {"rdp": 1e-2, "pld": 0.3}


def noise_multiplier_for(
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    *,
    mechanism: str = "rdp",
    tol: float = 1e-4,
) -> float:
    """Smallest noise multiplier (within `tol`) whose epsilon after `steps` steps is <= target.

    Uses dp_accounting's own calibration (Brent's method over the accountant's epsilon).
    """
    _check_mechanism(mechanism)
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon!r}")
    if not 0 < target_delta < 1:
        raise ValueError(f"target_delta must be in (0, 1), got {target_delta!r}")
    _check_step(1.0, sample_rate, steps)
    if steps == 0 or sample_rate == 0:
        return 0.0  # no step ever sees data: no noise is needed
    # sigma -> 0 is never private, and PLD's discretization explodes in memory for tiny sigma:
    # search above a floor, which already meets any target it can meet.
    floor = _SIGMA_FLOOR[mechanism]
    if epsilon_for([(floor, sample_rate, steps)], target_delta, mechanism) <= target_epsilon:
        return floor
    bracket = dp_accounting.LowerEndpointAndGuess(floor, max(1.0, 2 * floor))
    if mechanism == "pld":
        # each PLD evaluation is slow: bracket with the cheap RDP answer, an upper bound on
        # sigma since RDP's epsilon is never below PLD's
        upper = noise_multiplier_for(target_epsilon, target_delta, sample_rate, steps, tol=tol)
        if epsilon_for([(upper / 2, sample_rate, steps)], target_delta, "pld") > target_epsilon:
            bracket = dp_accounting.ExplicitBracketInterval(upper / 2, upper)
    with _quiet():
        sigma = dp_accounting.calibrate_dp_mechanism(
            lambda: _fresh(mechanism),
            lambda s: dp_sgd_event(s, sample_rate, steps),
            target_epsilon,
            target_delta,
            bracket_interval=bracket,
            tol=tol,
        )
    # calibration returns a value within tol of the optimum: step up to the safe side if needed
    while epsilon_for([(sigma, sample_rate, steps)], target_delta, mechanism) > target_epsilon:
        sigma += tol
    return float(sigma)


class Accountant:
    """Records DP-SGD steps as (noise_multiplier, sample_rate, steps) runs and reports epsilon.

    Consecutive steps with the same sigma and q are merged into one run, so the history stays
    short however long training lasts, and epsilon is one dp_accounting composition.
    """

    def __init__(self, mechanism: str = "rdp"):
        self.mechanism = _check_mechanism(mechanism)
        self.history: list[tuple[float, float, int]] = []
        self._cache: dict = {}

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1, *,
             extra_noise_multipliers: Iterable[float] = ()) -> None:
        """Record `steps` steps. `extra_noise_multipliers`: other Gaussian releases of the same
        batch in each step (each with sensitivity 1 in its own units, e.g. adaptive clipping's
        noised count). Gaussian mechanisms on the same sample compose exactly into one Gaussian
        with 1/sigma^2 = sum_k 1/sigma_k^2 (a Gaussian mechanism on the stacked query), which is
        the event recorded."""
        extra = [float(z) for z in extra_noise_multipliers]
        if extra:
            if not all(z >= 0 and math.isfinite(z) for z in [noise_multiplier, *extra]):
                raise ValueError(f"noise multipliers must be finite and >= 0, got "
                                 f"{[noise_multiplier, *extra]}")
            # a release without noise (0) leaves no privacy: the composition is noise 0 too
            noise_multiplier = 0.0 if 0 in [noise_multiplier, *extra] else \
                sum(z ** -2 for z in [noise_multiplier, *extra]) ** -0.5
        _check_step(noise_multiplier, sample_rate, steps)
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            s, q, n = self.history[-1]
            self.history[-1] = (s, q, n + int(steps))
        else:
            self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))

    @property
    def steps(self) -> int:
        return sum(h[2] for h in self.history)

    def epsilon(self, delta: float) -> float:
        # Cached: progress bars ask every step, and RDP/PLD composition is not free.
        key = (tuple(self.history), delta)
        if key not in self._cache:
            self._cache = {key: epsilon_for(self.history, delta, self.mechanism)}
        return self._cache[key]

    def state_dict(self) -> dict:
        return {"mechanism": self.mechanism, "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.mechanism = _check_mechanism(state["mechanism"])
        self.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
        self._cache = {}

    def __len__(self) -> int:
        return self.steps

    def __repr__(self) -> str:
        return f"Accountant(mechanism={self.mechanism!r}, steps={self.steps}, history={self.history})"
