import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from fxclip.accounting import Accountant, epsilon_for, noise_multiplier_for

DELTA = 1e-5


def _direct(history, delta, make):
    acc = make()
    for sigma, q, steps in history:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("mechanism,make", [("rdp", rdp.RdpAccountant), ("pld", pld.PLDAccountant)])
def test_epsilon_matches_dp_accounting_directly(mechanism, make):
    acc = Accountant(mechanism)
    for _ in range(30):
        acc.step(1.1, 0.02)
    acc.step(2.0, 0.05, steps=20)  # a change of sigma and q mid-training
    assert acc.history == [(1.1, 0.02, 30), (2.0, 0.05, 20)]  # consecutive steps merged
    expected = _direct(acc.history, DELTA, make)
    assert acc.epsilon(DELTA) == pytest.approx(expected, rel=1e-9)
    assert 0 < expected < math.inf


def test_pld_is_tighter_than_rdp():
    history = [(1.0, 0.01, 500)]
    assert epsilon_for(history, DELTA, "pld") < epsilon_for(history, DELTA, "rdp")


def test_epsilon_grows_with_steps_and_no_steps_is_free():
    acc = Accountant()
    assert acc.epsilon(DELTA) == 0.0
    acc.step(1.0, 0.1)
    e1 = acc.epsilon(DELTA)
    acc.step(1.0, 0.1)
    assert 0 < e1 < acc.epsilon(DELTA)


def test_noiseless_step_is_infinite_epsilon():
    assert epsilon_for([(0.0, 0.1, 1)], DELTA) == math.inf


@pytest.mark.parametrize("target,q,steps", [(1.0, 0.01, 1000), (3.0, 0.05, 200), (8.0, 1.0, 10)])
def test_noise_multiplier_inverse_round_trips(target, q, steps):
    sigma = noise_multiplier_for(target, DELTA, q, steps)
    eps = epsilon_for([(sigma, q, steps)], DELTA)
    assert eps <= target  # never over budget ...
    assert eps == pytest.approx(target, rel=2e-3)  # ... and not needlessly noisy
    assert epsilon_for([(sigma * 0.99, q, steps)], DELTA) > target


def test_noise_multiplier_inverse_pld():
    sigma = noise_multiplier_for(1.0, DELTA, 1.0, 1, mechanism="pld", tol=1e-3)
    eps = epsilon_for([(sigma, 1.0, 1)], DELTA, "pld")
    assert eps <= 1.0 and eps == pytest.approx(1.0, rel=5e-3)
    assert sigma < noise_multiplier_for(1.0, DELTA, 1.0, 1)  # tighter accounting, less noise


def test_state_dict_round_trip_continues_epsilon():
    a = Accountant("rdp")
    a.step(1.3, 0.04, steps=7)
    b = Accountant("pld")
    b.load_state_dict(a.state_dict())
    assert b.mechanism == "rdp" and b.history == a.history and b.steps == 7
    b.step(1.3, 0.04)
    a.step(1.3, 0.04)
    assert b.epsilon(DELTA) == a.epsilon(DELTA)


@pytest.mark.parametrize("call,match", [
    (lambda: Accountant("prv"), "mechanism"),
    (lambda: Accountant().step(-1.0, 0.1), "noise_multiplier"),
    (lambda: Accountant().step(1.0, 1.5), "sample_rate"),
    (lambda: Accountant().step(1.0, 0.1, steps=1.5), "steps"),
    (lambda: Accountant().epsilon(0.0), "delta"),
    (lambda: noise_multiplier_for(0.0, DELTA, 0.1, 10), "target_epsilon"),
    (lambda: noise_multiplier_for(1.0, 2.0, 0.1, 10), "target_delta"),
])
def test_bad_input_is_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()
