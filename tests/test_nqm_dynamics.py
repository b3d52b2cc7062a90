"""NQM dynamics: closed forms vs step-by-step recursions (seed eqs. 20, 38 and plain SGD), the repeated
eigenvalue of eq. 22, preconditioning, limits, schedules, and a Monte-Carlo simulation of the stochastic
updates.

Tolerances. The recursions and the closed forms are both evaluated in float64: t ≤ 60 recursion steps
accumulate at most ~60 roundings (~1e-14 relative), and the closed forms lose at most a few ulps times
the condition number of ``U_n`` (below 1e3 on these settings), so ``rtol = 1e-12`` leaves a margin of
about 30 while any algebraic slip (a wrong sign or factor) shows up at 1e-2 or more.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from curvlab.nqm.dynamics import (
    char_roots,
    ema_step,
    ema_system,
    ema_transition,
    geometric_sum,
    linear_decay_schedule,
    lucas_pair,
    momentum_step,
    momentum_system,
    momentum_transition,
    piecewise_constant_schedule,
    run_schedule,
    sgd_parts,
    sgd_piecewise,
    sgd_second_moment,
    sgd_stationary,
    sgd_step,
    system_piecewise,
)
from curvlab.nqm.problem import binned, default_problem, preconditioned, spectrum_problem
from curvlab.nqm.theorems import critical_momentum, transition_char_poly

RTOL = 1e-12
H = np.array([1.0, 0.37, 0.05, 3e-3, 1e-4])  # curvatures from the top to the bottom of the spectrum


def _close(a, b, rtol=RTOL):
    """Relative closeness with an absolute floor at rtol × the largest magnitude (C may cross zero)."""
    a, b = np.asarray(a), np.asarray(b)
    scale = np.maximum(np.abs(b), np.abs(b).max() * 1e-3)
    return np.max(np.abs(a - b) / scale) <= rtol


# settings: (lr, momentum) with real, complex, repeated and zero-momentum roots, and near-unstable ones
MOMENTUM_SETTINGS = [(0.5, 0.9), (0.1, 0.0), (1.9, 0.5), (0.01, 0.99), (3.5, 0.9), (1.0, 0.3), (0.04, 0.64)]
EMA_SETTINGS = [(0.5, 0.9), (1.0, 0.5), (0.01, 0.99), (1.5, 0.0), (0.5, 0.75), (1.9, 0.3)]


@pytest.mark.parametrize("lr", [1e-3, 0.3, 1.0, 1.7, 1.99])
def test_sgd_closed_form_equals_iteration(lr):
    noise = H / 16
    a = np.ones_like(H)
    for t in range(61):
        assert _close(sgd_second_moment(t, 1.0, lr, H, noise), a), t
        a = sgd_step(a, lr, H, noise)


@pytest.mark.parametrize(("lr", "beta"), MOMENTUM_SETTINGS)
def test_momentum_closed_form_equals_eq20(lr, beta):
    noise = H / 8
    v0 = np.stack([np.ones_like(H), np.zeros_like(H), np.zeros_like(H)], axis=-1)
    system = momentum_system(lr, beta, H)
    v = v0.copy()
    for t in range(61):
        assert _close(system.propagate(v0, t, noise), v), t
        det, unit = system.readout_parts(t)
        assert _close(det + unit * noise, v[:, 0]), t
        v = momentum_step(v, lr, beta, H, noise)


@pytest.mark.parametrize(("lr", "gamma"), EMA_SETTINGS)
def test_ema_closed_form_equals_eq38(lr, gamma):
    noise = H / 8
    v0 = np.ones((H.size, 3))  # θ̃(0) = θ(0): A(θ) = A(θ̃) = C = E[θ(0)²]
    system = ema_system(lr, gamma, H)
    v = v0.copy()
    for t in range(61):
        assert _close(system.propagate(v0, t, noise), v), t
        det, unit = system.readout_parts(t)
        assert _close(det + unit * noise, v[:, 1]), t
        v = ema_step(v, lr, gamma, H, noise)


def test_closed_form_from_a_general_state():
    """Any valid second-moment state (a PSD 2×2 matrix per dimension), not only the default start."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(H.size, 2, 4))
    s = x @ np.swapaxes(x, 1, 2) / 4
    v0 = np.stack([s[:, 0, 0], s[:, 1, 1], s[:, 0, 1]], axis=-1)
    for step, system, args in [
        (momentum_step, momentum_system(0.3, 0.8, H), (0.3, 0.8)),
        (ema_step, ema_system(0.3, 0.8, H), (0.3, 0.8)),
    ]:
        v = v0.copy()
        for _ in range(37):
            v = step(v, *args, H, H / 4)
        assert _close(system.propagate(v0, 37, H / 4), v)


def test_closed_form_needs_no_loop_for_huge_t():
    """t = 10^9 is one evaluation; the state is the stationary one (eq. 31) to full precision."""
    system = momentum_system(0.5, 0.9, H[:3])
    v = system.propagate(np.array([1.0, 0.0, 0.0]), 10**9, 1.0)
    assert np.allclose(v[:, 0], system.stationary[0], rtol=1e-13)


def test_transition_matrix_characteristic_polynomial_eq22():
    rng = np.random.default_rng(1)
    for _ in range(20):
        lr, beta, h = rng.uniform(0.01, 2.0), rng.uniform(0, 0.99), rng.uniform(0.01, 1)
        coeffs = np.poly(momentum_transition(lr, beta, h))
        assert np.allclose(coeffs, transition_char_poly(lr, beta, h), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(("lr", "h"), [(0.04, 1.0), (0.5, 0.3), (1e-3, 0.5), (0.9, 1.0)])
def test_repeated_eigenvalue_at_critical_momentum(lr, h):
    """At β = (1 − √(αh))² every eigenvalue of T equals β (eq. 22): the characteristic polynomial is
    (λ − β)³ to 1e-13 (well conditioned), and the computed eigenvalues of the defective matrix agree
    with β to ~eps^{1/3} ≈ 6e-6 (the sensitivity of a triple Jordan block), hence 1e-4 × β."""
    beta = float(critical_momentum(lr, h))
    transition = momentum_transition(lr, beta, h)
    assert np.allclose(np.poly(transition), [1.0, -3 * beta, 3 * beta**2, -(beta**3)], atol=1e-13)
    assert np.allclose(np.linalg.eigvals(transition), beta, rtol=1e-4, atol=1e-12)
    # away from it the three eigenvalues are distinct
    spread = np.ptp(np.abs(np.linalg.eigvals(momentum_transition(lr, 0.5 * beta, h))))
    assert spread > 1e-3


def test_lucas_numbers_at_and_around_the_repeated_root():
    """U_n = (n+1) r^n at the repeated root, and U_n is continuous across it (real ↔ complex)."""
    lr, h = 0.04, 1.0
    beta = float(critical_momentum(lr, h))
    n = np.arange(0, 400)
    system = momentum_system(lr, beta, h)
    u_n, _ = lucas_pair(system.roots, n)
    r = np.sqrt(beta)
    assert np.allclose(u_n, (n + 1) * r**n, rtol=1e-9)
    for delta in (1e-12, -1e-12, 1e-9, -1e-9):
        near, _ = lucas_pair(momentum_system(lr, beta + delta, h).roots, n)
        assert np.allclose(near, u_n, rtol=1e-5)


def test_geometric_sum_and_roots_edge_cases():
    assert np.allclose(geometric_sum(np.array([1.0, 0.0, -1.0, 0.5, 0.999999]), 7),
                       [7, 1, 1, (1 - 0.5**7) / 0.5, (1 - 0.999999**7) / 1e-6], rtol=1e-12)
    roots = char_roots(1.0, 0.0, 1.0)  # roots 1 and 0
    u_t, u_prev = lucas_pair(roots, np.array([0, 1, 5]))
    assert np.allclose(u_t, 1.0) and np.allclose(u_prev, [0, 1, 1])


def test_preconditioning_contraction_and_noise():
    """With H^{-p}: contraction 1 − α h^{1−p}, injected noise variance (α h^{−p})² c/B per step."""
    h, c, p, lr, b = H, 2.0 * H, 0.5, 0.3, 32.0
    h_eff, c_eff = preconditioned(h, c, p)
    direct = (1.0 - lr * h**-p * h) ** 2 * 1.0 + (lr * h**-p) ** 2 * c / b
    assert np.allclose(sgd_step(1.0, lr, h_eff, c_eff / b), direct, rtol=1e-14)
    assert np.allclose(h_eff, h ** (1 - p)) and np.allclose(c_eff, c * h ** (-2 * p))
    assert np.allclose(preconditioned(h, c, 0.0)[0], h) and np.allclose(preconditioned(h, c, 1.0)[0], 1.0)


def test_infinite_batch_kills_the_steady_state():
    """B → ∞: the noise term α²c/B vanishes, so the risk is the convergence term alone and → 0."""
    for t in (10, 10**4, 10**8):
        decay, unit = sgd_parts(t, 0.5, H)
        assert np.allclose(decay + unit * (H / 1e300), decay, rtol=0, atol=1e-300)
        det, unit = momentum_system(0.5, 0.9, H).readout_parts(t)
        assert np.all(unit * (H / 1e300) < 1e-290)
    assert np.all(sgd_parts(10**9, 0.5, H[:3])[0] == 0.0)


def test_small_lr_momentum_behaves_like_sgd_at_effective_rate():
    """αh ≪ 1: momentum β ≈ SGD at α/(1−β). With α_eff h ≤ 1e-2 the relative gap of E[θ²] after the
    warm-up (t ≥ 20/(1−β)) is O(α_eff h) — below 2e-2 — and the stationary values (eq. 31 vs the SGD
    steady state) have the ratio (1+β)(2 − α_eff h)/(2(1+β) − αh) = 1 − α_eff h β/(1+β) + O((α_eff h)²)."""
    beta, lr = 0.9, 1e-4
    h = np.array([1.0, 0.1, 0.01])
    noise = h / 4
    system = momentum_system(lr, beta, h)
    eff = lr / (1 - beta)
    for t in (200, 2000, 20000, 200000):
        det, unit = system.readout_parts(t)
        mom = det + unit * noise
        sgd = sgd_second_moment(t, 1.0, eff, h, noise)
        assert np.all(np.abs(mom - sgd) <= 2e-2 * sgd + 1e-12), (t, mom, sgd)
    ratio = system.stationary[0] / sgd_stationary(eff, h)
    assert np.allclose(ratio, (1 + beta) * (2 - eff * h) / (2 * (1 + beta) - lr * h), rtol=1e-13)
    assert np.allclose(ratio, 1 - eff * h * beta / (1 + beta), rtol=0, atol=(eff * h) ** 2)


def test_schedules_exact_against_stepping():
    """Linear decay (F.3) and piecewise-constant schedules: blocked/closed-form vs one step at a time."""
    h, noise = H[:4], H[:4] / 16
    lrs = linear_decay_schedule(0.8, 0.1, 300, 350)
    assert lrs[0] == 0.8 and np.isclose(lrs[300], 0.08) and np.isclose(lrs[-1], 0.08)
    assert np.isclose(lrs[150], 0.8 * (1 - 0.9 * 0.5))
    a = np.ones_like(h)
    v = np.stack([np.ones_like(h), np.zeros_like(h), np.zeros_like(h)], axis=-1)
    w = np.ones((h.size, 3))
    for lr in lrs:
        a = sgd_step(a, lr, h, noise)
        v = momentum_step(v, lr, 0.7, h, noise)
        w = ema_step(w, lr, 0.7, h, noise)
    assert _close(run_schedule("sgd", np.ones_like(h), lrs, h, noise, block=64), a, 1e-11)
    assert _close(run_schedule("momentum", v * 0 + [1, 0, 0], lrs, h, noise, 0.7, block=64), v, 1e-11)
    assert _close(run_schedule("ema", np.ones((h.size, 3)), lrs, h, noise, 0.7, block=100), w, 1e-11)
    pieces, steps = [1.0, 0.3, 0.05], [40, 25, 60]
    sched = piecewise_constant_schedule(pieces, steps)
    assert sched.size == 125 and sched[40] == 0.3
    a = np.ones_like(h)
    v = np.stack([np.ones_like(h), np.zeros_like(h), np.zeros_like(h)], axis=-1)
    for lr in sched:
        a = sgd_step(a, lr, h, noise)
        v = momentum_step(v, lr, 0.5, h, noise)
    assert _close(sgd_piecewise(np.ones_like(h), pieces, steps, h, noise), a)
    v0 = np.stack([np.ones_like(h), np.zeros_like(h), np.zeros_like(h)], axis=-1)
    assert _close(system_piecewise(momentum_system, v0, pieces, 0.5, steps, h, noise), v)


def test_unstable_settings_stay_quiet():
    """Divergent settings overflow (inf or NaN) without warnings; stability flags match αh < 2(1+β)
    (momentum) and αh < 2 (average)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        system = momentum_system(5.0, 0.5, H)
        det, unit = system.readout_parts(10**6)
        assert not system.stable.all() and not np.isfinite(det[0]) and np.all(np.isfinite(det[1:]))
        assert ema_system(2.5, 0.5, H).stable.tolist() == [False, True, True, True, True]
        sgd_parts(10**6, 2.5, H)
    assert momentum_system(3.79, 0.9, 1.0).stable and not momentum_system(3.81, 0.9, 1.0).stable


def test_problem_modes():
    exact = default_problem(d=10_000)
    assert exact.d == 10_000 and exact.size == 10_000 and exact.mode == "exact"
    assert np.isclose(exact.initial_risk(), 0.5 * np.sum(1.0 / np.arange(1, 10_001)), rtol=1e-14)
    coarse = binned(exact, 100)
    assert coarse.mode == "binned" and coarse.d == 10_000 and coarse.size <= 100
    assert np.isclose(coarse.initial_risk(), exact.initial_risk(), rtol=1e-12)
    assert np.isclose(np.sum(coarse.counts * coarse.c), np.sum(exact.c), rtol=1e-12)
    edges = np.geomspace(1e-4, 1.0, 101)
    assert np.all(coarse.h >= edges[0] * (1 - 1e-12)) and np.all(coarse.h <= 1.0)
    with pytest.raises(ValueError):
        spectrum_problem([1.0, -1.0])
    with pytest.raises(ValueError):
        default_problem(mode="fuzzy")


# -------------------------------------------------------------------------------- Monte-Carlo


def _simulate(kind: str, lr: float, decay: float, h, c, a0, batch: float, steps: int, seeds: int, rng):
    """The stochastic updates themselves, vectorised over seeds × dimensions: returns per step the
    sample second moments (A(θ), A(second), C) as arrays (seeds, dims) for the requested times."""
    theta = rng.normal(size=(seeds, h.size)) * np.sqrt(a0)
    other = np.zeros_like(theta) if kind == "momentum" else theta.copy()
    out = {}
    for t in range(1, steps + 1):
        eps = rng.normal(size=theta.shape) * np.sqrt(c / batch)
        grad = h * theta + eps
        if kind == "momentum":
            other = decay * other + grad  # m(t+1) = β m(t) + g(θ(t))   (eq. 17)
            theta = theta - lr * other
        else:
            theta = theta - lr * grad
            other = decay * other + (1 - decay) * theta  # θ̃(t+1) = γ θ̃(t) + (1−γ) θ(t+1)  (eq. 35)
        if t in (1, 5, steps):
            out[t] = (theta**2, other**2, theta * other)
    return out


@pytest.mark.parametrize(("kind", "lr", "decay", "p"), [
    ("momentum", 0.3, 0.8, 0.0),
    ("momentum", 0.05, 0.95, 0.5),
    ("ema", 0.6, 0.9, 0.0),
    ("ema", 0.2, 0.5, 0.5),
])
def test_monte_carlo_matches_exact_second_moments(kind, lr, decay, p):
    """20,000 seeds of the stochastic updates (Gaussian noise with the NQM covariance C/B, also through
    the preconditioner): each sample mean lies within 5 standard errors (estimated from the samples)
    of the exact second moment — |z| > 5 has probability 6e-7 per comparison (60 comparisons)."""
    rng = np.random.default_rng(1234)
    h = np.array([1.0, 0.2, 0.03, 0.004, 5e-4])
    c, a0, batch = 1.5 * h, np.array([1.0, 2.0, 0.5, 1.0, 1.0]), 4.0
    h_eff, c_eff = preconditioned(h, c, p)
    samples = _simulate(kind, lr, decay, h_eff, c_eff, a0, batch, 40, 20_000, rng)
    system = (momentum_system if kind == "momentum" else ema_system)(lr, decay, h_eff)
    second = np.zeros_like(a0) if kind == "momentum" else a0  # m(0) = 0, or θ̃(0) = θ(0)
    init = np.stack([a0, second, second], axis=-1)
    worst = 0.0
    for t, moments in samples.items():
        exact = system.propagate(init, t, c_eff / batch)
        for k, sample in enumerate(moments):
            se = sample.std(axis=0, ddof=1) / np.sqrt(sample.shape[0])
            z = np.abs(sample.mean(axis=0) - exact[:, k]) / se
            worst = max(worst, float(z.max()))
    assert worst < 5.0, worst


def test_monte_carlo_sgd():
    rng = np.random.default_rng(7)
    h = np.array([1.0, 0.1, 0.01])
    theta = rng.normal(size=(50_000, 3))
    for _ in range(30):
        theta = theta - 0.4 * (h * theta + rng.normal(size=theta.shape) * np.sqrt(h / 2))
    sample = theta**2
    exact = sgd_second_moment(30, 1.0, 0.4, h, h / 2)
    z = np.abs(sample.mean(axis=0) - exact) / (sample.std(axis=0, ddof=1) / np.sqrt(sample.shape[0]))
    assert np.all(z < 5.0), z


def test_transitions_have_the_printed_rows():
    """Spot-check eq. 21's entries and the average's transition against the seed's formulas."""
    lr, beta, h = 0.2, 0.7, 0.5
    t = momentum_transition(lr, beta, h)
    assert np.isclose(t[0, 1], (lr * beta) ** 2) and np.isclose(t[2, 2], (1 - 2 * lr * h) * beta)
    assert np.isclose(t[1, 2], 2 * beta * h) and np.isclose(t[2, 1], -lr * beta**2)
    e = ema_transition(lr, beta, h)
    r = 1 - lr * h
    assert np.isclose(e[1, 2], 2 * beta * (1 - beta) * r) and np.isclose(e[2, 2], beta * r)
