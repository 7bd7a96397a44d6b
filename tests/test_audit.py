"""fxclip.audit: the one-run bound against the paper, the canaries' mechanics, and whole audited
training runs (a correct run stays below its claim, a broken one is caught, seeds reproduce)."""
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import binom
from torch import nn
from torch.utils.data import TensorDataset

import fxclip
from fxclip.audit import (
    GradientCanaries,
    InputCanaries,
    audit_scores,
    audit_training,
    count_correct,
    draw_inclusion,
    epsilon_lower_bound,
    p_value,
    plot_scores,
)

DELTA = 1e-5


# --- the bound (Steinke, Nasr, Jagielski 2023) ---

def test_p_value_matches_the_papers_worked_example():
    # Appendix D: 75 of 100 guesses correct, m = r = 100, epsilon = log 3, delta = 0 -> 0.553
    assert p_value(100, 100, 75, math.log(3), 0.0) == pytest.approx(0.5535, abs=1e-4)


@pytest.mark.parametrize("m, r, v, delta, expected", [
    (100, 100, 75, 0.0, 0.702),        # Appendix D, pure DP
    (100, 100, 75, 1e-4, 0.699),       # Appendix D, with delta
    (1000, 100, 75, 1e-4, 0.673),      # Appendix D, abstaining on 900 canaries
    (100_000, 1510, 1439, 1e-5, 2.675),  # the paper's m = 100,000 example
])
def test_epsilon_lower_bound_matches_the_papers_values(m, r, v, delta, expected):
    assert epsilon_lower_bound(m, r, v, delta=delta, confidence=0.95) == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_all_correct_with_pure_dp_has_a_closed_form(r):
    # delta = 0, v = r: p-value p^r = 0.05  <=>  epsilon = logit(0.05^(1/r))
    p = 0.05 ** (1 / r)
    assert epsilon_lower_bound(r, r, r, delta=0.0) == pytest.approx(math.log(p / (1 - p)), rel=1e-9)


def test_delta_term_is_the_theorem_5_2_correction():
    m, r, v, eps, delta = 500, 60, 50, 1.0, 1e-3
    p = math.exp(eps) / (1 + math.exp(eps))

    def f(u):
        return binom.sf(u - 1, r, p)  # P[Binomial(r, p) >= u]

    expected = f(v) + 2 * m * delta * max((f(v - i) - f(v)) / i for i in range(1, v + 1))
    assert p_value(m, r, v, eps, delta) == pytest.approx(expected, rel=1e-12)
    assert p_value(m, r, v, eps, delta) > p_value(m, r, v, eps, 0.0)


def test_bound_is_valid_for_randomized_response():
    # epsilon-DP randomized response guessed r times: the probability (exact, over the binomial
    # number of correct guesses) that the bound exceeds the true epsilon is at most 5%, and not
    # far below (the bound is not vacuous)
    eps, r = 1.0, 200
    pmf = binom.pmf(np.arange(r + 1), r, math.exp(eps) / (1 + math.exp(eps)))
    exceed = sum(pmf[v] for v in range(r + 1) if epsilon_lower_bound(r, r, v, delta=0.0) > eps)
    assert 0.03 < exceed <= 0.05
    assert epsilon_lower_bound(r, r, r // 2, delta=0.0) == 0.0  # chance level proves nothing


def test_bound_rejects_bad_arguments():
    with pytest.raises(ValueError, match="0 <= v <= r <= m"):
        p_value(10, 20, 5, 1.0, 0.0)
    with pytest.raises(ValueError, match="confidence"):
        epsilon_lower_bound(10, 10, 10, delta=0.0, confidence=1.0)


def test_guesses_take_the_extremes_and_bonferroni_over_fractions():
    scores = np.array([5.0, -1.0, 3.0, 0.0, 2.0, -3.0])
    included = np.array([True, False, True, True, False, False])
    # top 2 (5, 3) both included; bottom 2 (-3, -1) both excluded
    assert count_correct(scores, included, 2, 2) == 4
    assert count_correct(scores, included, 3, 0) == 2  # 2.0 is excluded
    m = 400
    perfect = audit_scores(np.arange(m, dtype=float), np.arange(m) >= m // 2, delta=DELTA,
                           guess_fractions=(0.5, 1.0))
    assert (perfect.guesses, perfect.correct) == (m, m)
    assert perfect.epsilon_lower_bound == pytest.approx(
        epsilon_lower_bound(m, m, m, delta=DELTA, confidence=1 - 0.05 / 2))
    assert perfect.ceiling == perfect.epsilon_lower_bound  # no outcome could give more


# --- canaries ---

def _data(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    return TensorDataset(torch.randn(n, 8, generator=g) + y[:, None].float(), y)


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def test_gradient_canary_is_a_clipped_worst_case_sample_on_its_own_row():
    canaries = GradientCanaries(5, 3, gradient_norm=50.0)
    model = canaries.wrap(_mlp(0), max_grad_norm=1.0)
    pm = fxclip.privatize(model, max_grad_norm=1.0, loss_reduction="sum")
    x = torch.randn(6, 8)
    cid = torch.tensor([0, 2, 0, 5, 0, 0])
    y = torch.tensor([1, 0, 2, 0, 1, 1])
    x[cid > 0] = 0
    F.cross_entropy(pm(x, cid), y, reduction="sum").backward()
    routes = {r.name: r.rule for r in pm.last_report.params}
    assert routes["canary.weight"] == "embedding"  # the embedding rule fired on the canary block
    norms = pm.per_sample_norms
    assert norms[[1, 3]].tolist() == pytest.approx([50.0, 50.0])  # the canaries' unclipped norm
    grad = model.canary.weight.grad[:, 0]
    # each canary adds exactly -C e_k after clipping; real samples (row 0, padding) add nothing
    expected = torch.zeros(6)
    expected[[2, 5]] = -50.0 / (50.0 + 1e-6)
    assert torch.allclose(grad, expected, atol=1e-6)
    # the canaries contribute nothing to the model's own parameters
    model.zero_grad()
    F.cross_entropy(pm(x[[1, 3]], cid[[1, 3]]), y[[1, 3]], reduction="sum").backward()
    assert all(p.grad is None or not p.grad.any() for p in model.model.parameters())


def test_gradient_canaries_must_exceed_the_clipping_bound():
    with pytest.raises(ValueError, match="below the clipping bound"):
        GradientCanaries(5, 3, gradient_norm=0.5).wrap(_mlp(0), max_grad_norm=1.0)


# --- audited training runs ---

def _audit(seed, canaries=None, **kw):
    return audit_training(_mlp(seed), _data(), canaries or GradientCanaries(300, 3),
                          target_epsilon=2.0, target_delta=DELTA, epochs=kw.pop("epochs", 10),
                          batch_size=64, max_grad_norm=1.0, seed=seed, progress=False, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correct_run_stays_below_its_claim(seed):
    result = _audit(seed)
    assert result.claimed_epsilon == pytest.approx(2.0, abs=0.01)
    assert result.canaries == 300 and 0 < result.guesses <= 300
    assert result.epsilon_lower_bound <= result.claimed_epsilon


def test_broken_clipping_is_caught():
    # clipping at 10 C while noise and accountant use C: the claim of epsilon = 2 is false
    result = _audit(0, _unsound_clip_factor=10.0)
    assert result.claimed_epsilon == pytest.approx(2.0, abs=0.01)
    assert result.claimed_epsilon < result.epsilon_lower_bound <= result.ceiling
    assert result.correct >= 0.95 * result.guesses


@pytest.mark.slow
def test_fixed_seed_makes_the_audit_reproducible(tmp_path):
    a, b = _audit(3, epochs=2), _audit(3, epochs=2)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.included, b.included)
    assert a.line() == b.line()
    other = draw_inclusion(300, torch.Generator().manual_seed(4))
    assert not np.array_equal(a.included, other.numpy())  # the seed does choose the canaries
    plot_scores(a, str(tmp_path / "scores.png"))
    assert (tmp_path / "scores.png").stat().st_size > 1000


def test_black_box_input_canaries_audit_an_unchanged_model():
    model = _mlp(0)
    result = audit_training(model, _data(), InputCanaries(200, 3, low=-3.0, high=3.0),
                            target_epsilon=2.0, target_delta=DELTA, epochs=4, batch_size=64,
                            max_grad_norm=1.0, seed=0, progress=False)
    assert isinstance(model, nn.Sequential) and not hasattr(model, "canary")
    assert result.canaries == 200 and len(result.scores) == 200
    assert np.all(result.scores <= 0)  # minus a cross-entropy loss
    assert result.epsilon_lower_bound <= result.claimed_epsilon


@pytest.mark.slow
def test_example_prints_the_audit_line():
    script = Path(__file__).resolve().parents[1] / "examples" / "audit.py"
    out = subprocess.run([sys.executable, str(script), "--canaries", "300", "--epochs", "3",
                          "--epsilon", "2"], capture_output=True, text=True, check=True, timeout=600)
    last = out.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"audit: epsilon_lower_bound=(\S+) claimed_epsilon=(\S+) canaries=(\d+)", last)
    assert match, last
    lower, claimed, m = float(match[1]), float(match[2]), int(match[3])
    assert m == 300 and claimed == pytest.approx(2.0, abs=0.01) and 0 <= lower <= claimed
