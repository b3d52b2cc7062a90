"""Theorem 1 (eq. 34) and Theorem 2 (eq. 49): the exact recursions stay below the bounds at every t
checked, the steady-state terms equal the exact limits (eqs. 30/31, 46/47 vs the fixed point of the
recursion), and the root forms printed in the seed agree with the cancellation-free evaluations.

Tolerances: the bound is ``exact + Σ_{p≥t} x_p`` with a non-negative tail, so ``exact ≤ bound`` is
checked with a relative slack of 1e-12 (float64 rounding of sums of ~10 terms); fixed points come from
``np.linalg.solve`` on ``I − T`` whose condition number is below 1e4 for these settings, hence 1e-10.
"""

from __future__ import annotations

import numpy as np
import pytest

from curvlab.nqm.dynamics import (
    ema_noise,
    ema_step,
    ema_system,
    ema_transition,
    momentum_noise,
    momentum_step,
    momentum_system,
    momentum_transition,
)
from curvlab.nqm.problem import preconditioned
from curvlab.nqm.theorems import (
    critical_momentum,
    ema_noise_sum,
    ema_noise_sum_roots,
    momentum_noise_sum,
    momentum_noise_sum_roots,
    sgd_risk,
    theorem1_bound,
    theorem1_convergence,
    theorem1_convergence_roots,
    theorem2_bound,
    theorem2_convergence,
    theorem2_convergence_roots,
    theorem2_steady,
)

H = np.array([1.0, 0.4, 0.08, 0.01, 1e-3, 1e-4])
TIMES = np.unique(np.concatenate([np.arange(0, 120), np.geomspace(120, 1e7, 40).astype(np.int64)]))


def _grid(decays):
    lrs = [1e-3, 0.05, 0.4, 1.2]
    return [(lr, d, p, b) for lr in lrs for d in decays for p in (0.0, 0.5) for b in (1.0, 64.0)]


@pytest.mark.parametrize(("lr", "beta", "p", "batch"), _grid([0.0, 0.5, 0.9, 0.99]))
def test_theorem1_bounds_the_exact_recursion(lr, beta, p, batch):
    h, c = preconditioned(H, H, p)
    system = momentum_system(lr, beta, h)
    if not system.stable.all():
        pytest.skip("divergent setting: Theorem 1 assumes stability")
    noise = c / batch
    det, unit = system.readout_parts(TIMES[:, None])
    exact = det + unit * noise
    bound = theorem1_bound(TIMES[:, None], 1.0, lr, beta, h, noise)
    assert np.all(exact <= bound * (1 + 1e-12))
    # the gap is the noise tail Σ_{p≥t} x_p: non-negative, and gone where the dimension has converged
    done = system.roots.spectral_radius ** (2 * TIMES[-1]) < 1e-12
    assert np.allclose(bound[-1][done], exact[-1][done], rtol=1e-9)
    # the convergence term of eq. 33 is exactly the deterministic part (absolute 1e-14 of A(θ(0)) = 1:
    # the two evaluations round differently where the oscillating term crosses zero)
    assert np.allclose(theorem1_convergence(TIMES[:, None], lr, beta, h), det, rtol=1e-10, atol=1e-14)


def test_theorem1_at_the_critical_momentum():
    """β = (1 − √(αh))²: the printed eq. 33 divides 0 by 0; the stable form is its limit, U_n = (n+1) r^n."""
    lr = 0.04
    h = np.array([1.0, 0.5])
    beta = critical_momentum(lr, h)
    t = np.arange(0, 300)[:, None]
    r = np.sqrt(beta)
    expected = ((t + 1) * r**t - beta * t * r ** (t - 1.0)) ** 2  # U_t − β U_{t−1} with U_n = (n+1) r^n
    assert np.allclose(theorem1_convergence(t, lr, beta, h), expected, rtol=1e-10)
    v = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    exact = []
    for _ in range(300):
        exact.append(v[:, 0])
        v = momentum_step(v, lr, beta, h, h / 8)
    bound = theorem1_bound(t, 1.0, lr, beta, h, h / 8)
    assert np.all(np.array(exact) <= bound * (1 + 1e-12))


@pytest.mark.parametrize(("lr", "gamma", "p", "batch"), _grid([0.0, 0.5, 0.9, 0.999]))
def test_theorem2_bounds_the_exact_recursion(lr, gamma, p, batch):
    h, c = preconditioned(H, H, p)
    system = ema_system(lr, gamma, h)
    if not system.stable.all():
        pytest.skip("divergent setting")
    noise = c / batch
    det, unit = system.readout_parts(TIMES[:, None])
    exact = det + unit * noise
    bound = theorem2_bound(TIMES[:, None], 1.0, lr, gamma, h, noise)
    assert np.all(exact <= bound * (1 + 1e-12))
    assert np.allclose(theorem2_convergence(TIMES[:, None], lr, gamma, h), det, rtol=1e-10, atol=1e-14)


def test_theorem2_with_the_step_recursion_small_t():
    lr, gamma = 0.3, 0.8
    noise = H / 4
    v = np.ones((H.size, 3))
    for t in range(80):
        assert np.all(v[:, 1] <= theorem2_bound(t, 1.0, lr, gamma, H, noise) * (1 + 1e-12))
        v = ema_step(v, lr, gamma, H, noise)


def _fixed_point(transition: np.ndarray, noise: np.ndarray) -> np.ndarray:
    return np.linalg.solve(np.eye(3) - transition, noise[..., None])[..., 0]


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.9, 0.99])
def test_momentum_steady_state_eqs_30_31(beta):
    lr = 0.2
    h = np.array([1.0, 0.3, 0.02])
    noise = h / 16
    fixed = _fixed_point(momentum_transition(lr, beta, h), momentum_noise(lr, noise))
    assert np.allclose(momentum_noise_sum(lr, beta, h, noise), fixed[:, 0], rtol=1e-10)
    assert np.allclose(momentum_noise_sum_roots(lr, beta, h, noise), fixed[:, 0], rtol=1e-10)
    stationary = np.stack(momentum_system(lr, beta, h).stationary, axis=-1) * noise[:, None]
    assert np.allclose(stationary, fixed, rtol=1e-10)
    # and the recursion itself converges there (2,000 steps of eq. 20 from zero, then the closed form)
    v = np.zeros((h.size, 3))
    for _ in range(2000):
        v = momentum_step(v, lr, beta, h, noise)
    system = momentum_system(lr, beta, h)
    assert np.allclose(system.propagate(np.zeros((h.size, 3)), 2000, noise), v, rtol=1e-11)
    assert np.allclose(system.propagate(v, 10**8, noise), fixed, rtol=1e-10)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.9, 0.999])
def test_ema_steady_state_eqs_46_47_49(gamma):
    lr = 0.2
    h = np.array([1.0, 0.3, 0.02])
    noise = h / 16
    fixed = _fixed_point(ema_transition(lr, gamma, h), ema_noise(lr, gamma, noise))
    # eqs. 46/47 are for the rescaled average θ̃/(1−γ); eq. 49's steady term is (1−γ)² times them
    assert np.allclose((1 - gamma) ** 2 * ema_noise_sum(lr, gamma, h, noise), fixed[:, 1], rtol=1e-10)
    assert np.allclose((1 - gamma) ** 2 * ema_noise_sum_roots(lr, gamma, h, noise), fixed[:, 1], rtol=1e-10)
    assert np.allclose(theorem2_steady(lr, gamma, h, noise), fixed[:, 1], rtol=1e-10)
    stationary = np.stack(ema_system(lr, gamma, h).stationary, axis=-1) * noise[:, None]
    assert np.allclose(stationary, fixed, rtol=1e-10)


def test_root_forms_match_the_stable_forms():
    """Away from the repeated root the seed's printed expressions (complex roots, division by r1 − r2)
    agree with the cancellation-free ones to 1e-9 (the printed form loses ~log10(1/|r1−r2|) digits)."""
    rng = np.random.default_rng(3)
    for _ in range(200):
        lr, beta, h = rng.uniform(1e-3, 1.5), rng.uniform(0, 0.995), rng.uniform(1e-3, 1)
        if abs(beta - critical_momentum(lr, h)) < 1e-3:
            continue
        t = rng.integers(0, 2000)
        ref = theorem1_convergence(t, lr, beta, h)
        assert np.isclose(theorem1_convergence_roots(t, lr, beta, h), ref, rtol=1e-9, atol=1e-250)
        gamma = rng.uniform(0, 0.995)
        if abs(gamma - (1 - lr * h)) < 1e-3:
            continue
        ref2 = theorem2_convergence(t, lr, gamma, h)
        assert np.isclose(theorem2_convergence_roots(t, lr, gamma, h), ref2, rtol=1e-9, atol=1e-250)


def test_sgd_is_momentum_and_ema_with_zero_decay():
    """β = 0 and γ = 0 reduce both theorems to plain SGD (eq. 6's two terms, equality, not a bound)."""
    t = np.arange(0, 50)[:, None]
    lr, noise = 0.7, H / 8
    sgd = sgd_risk(t, 1.0, lr, H, noise, weight=1.0)
    det, unit = momentum_system(lr, 0.0, H).readout_parts(t)
    assert np.allclose(det + unit * noise, sgd, rtol=1e-12)
    det, unit = ema_system(lr, 0.0, H).readout_parts(t)
    assert np.allclose(det + unit * noise, sgd, rtol=1e-12)
    assert np.allclose(momentum_noise_sum(lr, 0.0, H, noise), ema_noise_sum(lr, 0.0, H, noise), rtol=1e-14)
