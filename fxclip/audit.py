"""Privacy auditing with one training run (Steinke, Nasr, Jagielski, NeurIPS 2023).

m canaries are each put in the training set independently with probability 1/2; one ordinary
DP-SGD run (make_private: Poisson sampling, clipping, noise, accounting) trains on the result; each
canary gets a score; the auditor guesses "included" for the k+ highest scores and "excluded" for
the k- lowest and abstains on the rest. If training is (epsilon, delta)-DP, many correct guesses
are unlikely, so the number of correct guesses gives an empirical LOWER bound on epsilon, at a
stated confidence. A lower bound above the epsilon the accountant reports means the claim is
false (a bug in sampling, clipping, noise or accounting); a lower bound below it proves nothing
beyond "this audit found no violation" (see docs/audit.md).

Canaries:
- GradientCanaries (white box): the model gains a dedicated embedding block that only canaries
  use. Canary k's gradient is exactly along its own row k of that block with a norm far above the
  clipping bound, so after clipping each canary is a worst-case sample; its score is how far the
  training moved row k against that gradient.
- InputCanaries (black box): mislabeled random inputs, scored by minus their loss; works on any
  model without changing it, but gives much weaker bounds.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import binom
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = ["p_value", "epsilon_lower_bound", "count_correct", "audit_scores", "AuditResult", "draw_inclusion",
           "GradientCanaries", "InputCanaries", "audit_training", "plot_scores"]


# --- the bound (Steinke et al. 2023, Theorem 5.2) ---

def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Upper bound on P[at least v of r guesses are correct] for an (epsilon, delta)-DP training
    run on m canaries each included with probability 1/2 (Theorem 5.2):

        f(v) + 2 m delta max_{i=1..v} (f(v-i) - f(v)) / i,   f(u) = P[Binomial(r, p) >= u],

    with p = e^epsilon / (e^epsilon + 1), the accuracy of epsilon-DP randomized response.
    With delta = 0 this is the binomial tail of Theorem 3.1.
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    if not (epsilon >= 0 and 0 <= delta <= 1):
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon!r}, {delta!r}")
    p = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(binom.sf(v - 1, r, p))  # f(v)
    if v == 0 or delta == 0:
        return min(1.0, tail)
    # f(v-i) - f(v) = P[v-i <= Binomial < v] = pmf(v-1) + ... + pmf(v-i)
    below = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, p))
    slope = float(np.max(below / np.arange(1, v + 1)))
    return min(1.0, tail + 2 * m * delta * slope)


def epsilon_lower_bound(m: int, r: int, v: int, *, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that v correct guesses out of r reject at `confidence`: the training run
    is not (epsilon, delta)-DP for any smaller epsilon, unless an event of probability at most
    1 - confidence happened. Found by bisection (p_value grows with epsilon); 0 if none is
    rejected."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    level = 1.0 - confidence

    def rejected(eps):
        return p_value(m, r, v, eps, delta) < level

    if not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):  # p_value -> 1 (or to its delta floor) as epsilon grows
        lo, hi = hi, 2 * hi
        if hi > 1e4:
            raise ValueError("every epsilon up to 1e4 is rejected: v, r or delta are inconsistent")
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
    return lo


# --- guesses ---

def count_correct(scores, included, k_pos: int, k_neg: int) -> int:
    """Correct guesses when the k_pos highest scores are guessed included and the k_neg lowest
    excluded (ties broken by canary index, so the count is deterministic)."""
    scores, included = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    if k_pos + k_neg > len(scores):
        raise ValueError(f"k_pos + k_neg = {k_pos + k_neg} guesses for {len(scores)} canaries")
    order = np.argsort(scores, kind="stable")
    low, high = order[:k_neg], order[len(order) - k_pos:]
    return int(included[high].sum() + (~included[low]).sum())


@dataclass
class AuditResult:
    """Outcome of an audit. `epsilon_lower_bound` holds at `confidence` for the given `delta`."""
    epsilon_lower_bound: float
    delta: float
    confidence: float
    canaries: int
    guesses: int
    correct: int
    scores: np.ndarray = field(repr=False)
    included: np.ndarray = field(repr=False)
    ceiling: float = math.inf  # the largest lower bound any outcome could give (all guesses correct)
    claimed_epsilon: float | None = None
    seconds: float | None = None

    def line(self) -> str:
        claimed = "nan" if self.claimed_epsilon is None else f"{self.claimed_epsilon:.4f}"
        return (f"audit: epsilon_lower_bound={self.epsilon_lower_bound:.4f} "
                f"claimed_epsilon={claimed} canaries={self.canaries}")


GUESS_FRACTIONS = (0.05, 0.2, 0.5, 0.8)


def audit_scores(scores, included, *, delta: float, confidence: float = 0.95,
                 guess_fractions: Sequence[float] = GUESS_FRACTIONS) -> AuditResult:
    """Epsilon lower bound from canary scores (higher = more likely included).

    For each fraction f the auditor guesses on r = round(f m) canaries, half on each end of the
    ranking. Trying several fractions is a multiple test: each is run at level
    (1 - confidence) / len(guess_fractions) (Bonferroni), so the best of them still holds at
    `confidence`. Small fractions suit weak attacks (black box), large ones strong attacks.
    """
    scores, included = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    m = len(scores)
    if m == 0 or included.shape != scores.shape:
        raise ValueError(f"need one inclusion flag per score, got {included.shape} and {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("canary scores must be finite")
    per_test = 1.0 - (1.0 - confidence) / len(guess_fractions)
    best, ceiling = (0.0, 0, 0), 0.0
    for f in guess_fractions:
        if not 0 < f <= 1:
            raise ValueError(f"guess fractions must be in (0, 1], got {f!r}")
        k_pos = max(1, round(f * m / 2))
        k_neg = min(m - k_pos, k_pos)
        r, v = k_pos + k_neg, count_correct(scores, included, k_pos, k_neg)
        eps = epsilon_lower_bound(m, r, v, delta=delta, confidence=per_test)
        if eps >= best[0]:
            best = (eps, r, v)
        ceiling = max(ceiling, epsilon_lower_bound(m, r, r, delta=delta, confidence=per_test))
    return AuditResult(best[0], delta, confidence, m, best[1], best[2], scores, included, ceiling)


# --- canaries ---

def draw_inclusion(m: int, generator: torch.Generator) -> torch.Tensor:
    """Each of m canaries is included independently with probability 1/2 (bool tensor)."""
    return torch.rand(m, generator=generator) < 0.5


class _CanaryBlock(nn.Module):
    """model(x) for real samples (canary id 0); for canary k a logit vector whose VALUE is zero
    but whose gradient puts a constant vector along row k of a dedicated embedding.

    Canary k: logits = z e_0 with z = scale * (w_k - w_k.detach()), i.e. z = 0, so softmax is
    uniform and with label 0 the loss gradient is dL/dz = 1/K - 1; the per-sample gradient is
    scale (1/K - 1) e_k on the embedding and zero elsewhere (the model's output is multiplied by
    the real-sample mask). Real samples use the embedding's padding row and get no gradient on it.
    """

    def __init__(self, model: nn.Module, m: int, num_classes: int, gradient_norm: float):
        super().__init__()
        self.model = model
        self.canary = nn.Embedding(m + 1, 1, padding_idx=0)
        nn.init.zeros_(self.canary.weight)
        self.scale = gradient_norm * num_classes / (num_classes - 1)
        self.register_buffer("first_class", F.one_hot(torch.tensor(0), num_classes).float(),
                             persistent=False)

    def forward(self, x, canary_id):
        real = (canary_id == 0).to(x.dtype)
        w = self.canary(canary_id)
        z = self.scale * (w - w.detach())
        return self.model(x) * real[:, None] + z * self.first_class


class GradientCanaries:
    """White-box gradient canaries: m samples whose clipped gradients are m orthogonal directions
    of a dedicated part of the model, each of norm `gradient_norm` before clipping (default
    1000 times the clipping bound, so any clipping that is applied at all clips them, and a
    run without clipping stands out by orders of magnitude).

    The trained module takes (x, canary_id); real samples have canary_id 0. Score of canary k:
    <theta_final - theta_init, -g_k / |g_k|>, the movement of embedding row k against the
    canary's own gradient.
    """

    def __init__(self, m: int, num_classes: int, gradient_norm: float | None = None):
        if m < 1 or num_classes < 2:
            raise ValueError(f"need m >= 1 canaries and num_classes >= 2, got {m}, {num_classes}")
        self.m, self.num_classes, self.gradient_norm = m, num_classes, gradient_norm

    def wrap(self, model: nn.Module, max_grad_norm: float) -> nn.Module:
        norm = self.gradient_norm if self.gradient_norm is not None else 1000.0 * max_grad_norm
        if norm < max_grad_norm:
            raise ValueError(f"gradient_norm {norm} is below the clipping bound {max_grad_norm}: "
                             "the canaries would not be worst-case samples")
        return _CanaryBlock(model, self.m, self.num_classes, norm)

    def samples(self, example_x: torch.Tensor, generator: torch.Generator):
        """(x, label) of the m canaries: zero features (the model's output is masked), label 0."""
        return torch.zeros((self.m, *example_x.shape), dtype=example_x.dtype), \
            torch.zeros(self.m, dtype=torch.long)

    @staticmethod
    def inputs(x, canary_id):
        return x, canary_id

    def snapshot(self, trained: nn.Module):
        return trained.canary.weight.detach()[1:, 0].clone()

    def scores(self, trained: nn.Module, before, canary_x, canary_y) -> np.ndarray:
        # each canary's gradient is -|g| e_k: moving against it increases row k
        return (self.snapshot(trained) - before).double().numpy()


class InputCanaries:
    """Black-box input canaries: random inputs (uniform in [low, high]) with random labels,
    scored by minus their loss on the final model. The model is trained unchanged."""

    def __init__(self, m: int, num_classes: int, low: float = 0.0, high: float = 1.0):
        if m < 1 or num_classes < 2:
            raise ValueError(f"need m >= 1 canaries and num_classes >= 2, got {m}, {num_classes}")
        self.m, self.num_classes, self.low, self.high = m, num_classes, low, high

    def wrap(self, model: nn.Module, max_grad_norm: float) -> nn.Module:
        return model

    def samples(self, example_x: torch.Tensor, generator: torch.Generator):
        u = torch.rand((self.m, *example_x.shape), generator=generator)
        x = (self.low + (self.high - self.low) * u).to(example_x.dtype)
        return x, torch.randint(0, self.num_classes, (self.m,), generator=generator)

    @staticmethod
    def inputs(x, canary_id):
        return (x,)

    def snapshot(self, trained: nn.Module):
        return None

    @torch.no_grad()
    def scores(self, trained: nn.Module, before, canary_x, canary_y) -> np.ndarray:
        was_training = trained.training
        trained.eval()
        loss = F.cross_entropy(trained(canary_x), canary_y, reduction="none")
        trained.train(was_training)
        return (-loss).double().numpy()


# --- one audited training run ---

def _with_canaries(train_set: Dataset, canary_x, canary_y, included) -> TensorDataset:
    """Real samples (canary id 0) followed by the included canaries (ids 1..m)."""
    if isinstance(train_set, TensorDataset) and len(train_set.tensors) == 2:
        x, y = train_set.tensors
    else:
        xs, ys = zip(*(train_set[i] for i in range(len(train_set))))
        x, y = torch.stack(list(xs)), torch.as_tensor(ys)
    ids = torch.arange(1, len(canary_x) + 1)[included]
    return TensorDataset(torch.cat([x, canary_x[included]]),
                         torch.cat([torch.zeros(len(x), dtype=torch.long), ids]),
                         torch.cat([y, canary_y[included]]))


def _unsound_claim_smaller_clip(opt, factor: float) -> None:
    """TESTING THE AUDIT ONLY, makes the privacy claim false: the noise is drawn for a clipping
    bound `factor` times smaller than the one the module applies, while the accountant still
    records the configured noise multiplier. DPOptimizer refuses a noise bound below the module's;
    this bypasses it on purpose (noise std sigma/factor * C_applied = sigma * C_claimed), and the
    audit must catch it."""
    sigma = opt.noise_multiplier
    opt.noise_multiplier = sigma / factor
    record = opt.accountant.step
    opt.accountant.step = lambda _noise, rate, steps=1, **kw: record(sigma, rate, steps, **kw)


def audit_training(model: nn.Module, train_set: Dataset, canaries, *, target_epsilon: float,
                   target_delta: float, epochs: int, batch_size: int, max_grad_norm: float,
                   optimizer: Callable = lambda params: torch.optim.SGD(params, lr=0.5),
                   seed: int = 0, confidence: float = 0.95,
                   guess_fractions: Sequence[float] = GUESS_FRACTIONS, compile: bool = False,
                   progress: bool = True, _unsound_clip_factor: float | None = None) -> AuditResult:
    """Audits one make_private training run of `model` on `train_set` (items (x, label)).

    Draws which canaries are included, trains with fxclip.make_private at the target epsilon,
    scores the canaries and returns the epsilon lower bound next to the accountant's epsilon.
    `seed` fixes everything random (inclusion, canaries, Poisson sampling, noise; the model's
    initial weights are the caller's), so an audit is reproducible.

    `_unsound_clip_factor` (tests of the audit's power only) clips at that many times
    max_grad_norm while the noise and the accountant still use max_grad_norm: a false claim.
    """
    from .make_private import make_private  # fxclip's own training stack, unchanged

    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    included = draw_inclusion(canaries.m, gen)
    canary_x, canary_y = canaries.samples(train_set[0][0], gen)
    data = _with_canaries(train_set, canary_x, canary_y, included)

    clip = max_grad_norm * (_unsound_clip_factor or 1.0)
    trained = canaries.wrap(model, clip)
    before = canaries.snapshot(trained)
    pm, opt, loader = make_private(
        trained, optimizer(trained.parameters()), DataLoader(data, batch_size=batch_size),
        target_epsilon=target_epsilon, target_delta=target_delta, epochs=epochs,
        max_grad_norm=clip, generator=torch.Generator().manual_seed(seed + 1))
    if _unsound_clip_factor is not None:
        _unsound_claim_smaller_clip(opt, _unsound_clip_factor)
    step = torch.compile(pm) if compile else pm

    from tqdm import tqdm
    with tqdm(total=epochs * len(loader), desc="audit run", unit="step", disable=not progress) as bar:
        for _ in range(epochs):
            for x, cid, y in loader:
                opt.zero_grad()
                if len(y):  # an empty Poisson batch has no loss; step() still adds noise
                    F.cross_entropy(step(*canaries.inputs(x, cid)), y).backward()
                opt.step()
                bar.update()

    result = audit_scores(canaries.scores(trained, before, canary_x, canary_y), included.numpy(),
                          delta=target_delta, confidence=confidence, guess_fractions=guess_fractions)
    result.claimed_epsilon = opt.epsilon(target_delta)
    result.seconds = time.perf_counter() - start
    return result


def plot_scores(result: AuditResult, path: str, title: str | None = None) -> None:
    """Histogram of the canary scores, included vs excluded, saved to `path` (needs matplotlib:
    pip install "fxclip[audit]")."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError('plot_scores needs matplotlib: pip install "fxclip[audit]"') from e
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.histogram_bin_edges(result.scores, bins=60)
    ax.hist(result.scores[~result.included], bins=bins, alpha=0.6, label="excluded canaries")
    ax.hist(result.scores[result.included], bins=bins, alpha=0.6, label="included canaries")
    ax.set_xlabel("canary score")
    ax.set_ylabel("canaries")
    claimed = "" if result.claimed_epsilon is None else f", claimed {result.claimed_epsilon:.2f}"
    ax.set_title(title or f"epsilon lower bound {result.epsilon_lower_bound:.2f}{claimed} "
                          f"({result.correct}/{result.guesses} guesses correct)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
