"""Theorem 1 (momentum, seed appendix C, eq. 34) and Theorem 2 (iterate averaging, appendix D, eq. 49),
with the infinite noise sums in root form (eqs. 30, 46) and in closed form (eqs. 31, 47).

All functions take the curvature and noise the optimiser sees (with preconditioning ``H^{-p}``: ``h^{1-p}``
and ``c h^{-2p}/B``, see :func:`curvlab.nqm.problem.preconditioned`), ``noise = c/B``, and return values
for ``A = E[θ²]`` (the risk of a dimension is ``½ h_orig A``). Arrays broadcast.

Root forms use complex arithmetic and divide by ``r1 − r2`` as printed in the seed; the ``*_bound``
functions evaluate the same expressions without that cancellation (through
:func:`curvlab.nqm.dynamics.lucas_pair`), so they hold at the repeated root ``β = (1 − √(αh))²`` too.
"""

from __future__ import annotations

import numpy as np

from curvlab.nqm.dynamics import CharRoots, char_roots, lucas_pair


def _arrays(*xs):
    return np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in xs))


# ------------------------------------------------------------------------------------- Theorem 1


def momentum_roots(lr, beta, h) -> tuple[np.ndarray, np.ndarray]:
    """The roots r1, r2 of ``z² − (1 − αh + β) z + β`` (eq. 27), complex128, by the quadratic formula."""
    lr, beta, h = _arrays(lr, beta, h)
    s = (1.0 - lr * h + beta).astype(np.complex128)
    root = np.sqrt(s * s - 4.0 * beta)
    return 0.5 * (s + root), 0.5 * (s - root)


def momentum_noise_sum_roots(lr, beta, h, noise) -> np.ndarray:
    """Eq. 30: ``Σ_p x_p = (α² c/B) (1 + r1 r2) / ((1 − r1²)(1 − r2²)(1 − r1 r2))`` from the roots."""
    lr, beta, h, noise = _arrays(lr, beta, h, noise)
    r1, r2 = momentum_roots(lr, beta, h)
    with np.errstate(all="ignore"):
        value = lr**2 * noise * (1.0 + r1 * r2) / ((1.0 - r1**2) * (1.0 - r2**2) * (1.0 - r1 * r2))
    return value.real


def momentum_noise_sum(lr, beta, h, noise) -> np.ndarray:
    """Eq. 31: ``α c (1 + β) / (B h (2β + 2 − αh)(1 − β))`` — the stationary ``E[θ²]`` per dimension."""
    lr, beta, h, noise = _arrays(lr, beta, h, noise)
    with np.errstate(all="ignore"):
        return lr * noise * (1.0 + beta) / (h * (2.0 * beta + 2.0 - lr * h) * (1.0 - beta))


def theorem1_convergence_roots(t, lr, beta, h) -> np.ndarray:
    """Eq. 33's factor ``((r1^{t+1} − r2^{t+1} − β(r1^t − r2^t)) / (r1 − r2))²`` as printed (complex
    roots)."""
    t, lr, beta, h = _arrays(t, lr, beta, h)
    r1, r2 = momentum_roots(lr, beta, h)
    with np.errstate(all="ignore"):
        q = (r1 ** (t + 1) - r2 ** (t + 1) - beta * (r1**t - r2**t)) / (r1 - r2)
    return (q * q).real


def _momentum_char_roots(lr, beta, h) -> CharRoots:
    from curvlab.nqm.dynamics import momentum_system

    return momentum_system(lr, beta, h).roots


def theorem1_convergence(t, lr, beta, h) -> np.ndarray:
    """Eq. 33's factor without cancellation: ``(U_t − β U_{t−1})²`` with U from eq. 28."""
    t, lr, beta, h = _arrays(t, lr, beta, h)
    u_t, u_prev = lucas_pair(_momentum_char_roots(lr, beta, h), t)
    return (u_t - beta * u_prev) ** 2


def theorem1_bound(t, a0, lr, beta, h, noise) -> np.ndarray:
    """Theorem 1 (eq. 34): ``A(θ(t)) ≤ ((r1^{t+1} − r2^{t+1} − β(r1^t − r2^t))/(r1 − r2))² A(θ(0))
    + α c (1+β) / (B h (2β + 2 − αh)(1 − β))`` for momentum started at ``m(0) = 0``."""
    return theorem1_convergence(t, lr, beta, h) * np.asarray(a0) + momentum_noise_sum(lr, beta, h, noise)


def critical_momentum(lr, h) -> np.ndarray:
    """``β = (1 − √(αh))²``: the repeated root of eq. 22 (all eigenvalues of T equal β), fastest
    convergence."""
    return (1.0 - np.sqrt(np.asarray(lr, dtype=np.float64) * np.asarray(h, dtype=np.float64))) ** 2


def transition_char_poly(lr, beta, h) -> np.ndarray:
    """Coefficients of eq. 22, ``−(λ − β)(λ² − (β² − 2αhβ + (1 − αh)²) λ + β²)``, highest power first
    (the monic ``det(λI − T)``, i.e. ``np.poly(T)``)."""
    lr, beta, h = _arrays(lr, beta, h)
    b1 = beta**2 - 2.0 * lr * h * beta + (1.0 - lr * h) ** 2
    # (λ − β)(λ² − b1 λ + β²) = λ³ − (b1 + β) λ² + (β² + β b1) λ − β³
    return np.stack([np.ones_like(b1), -(b1 + beta), beta**2 + beta * b1, -(beta**3)], axis=-1)


# ------------------------------------------------------------------------------------- Theorem 2


def ema_noise_sum_roots(lr, gamma, h, noise) -> np.ndarray:
    """Eq. 46 with ``r1 = 1 − αh``, ``r2 = γ``: ``(α² c/B)(1 + r1 r2)/((1 − r1²)(1 − r2²)(1 − r1 r2))``.

    This is the sum for the rescaled average ``θ̃/(1−γ)`` of eqs. 41–45; the unscaled average's stationary
    ``E[θ̃²]`` is ``(1−γ)²`` times it (the steady term of eq. 49).
    """
    lr, gamma, h, noise = _arrays(lr, gamma, h, noise)
    r1, r2 = 1.0 - lr * h, gamma
    with np.errstate(all="ignore"):
        return lr**2 * noise * (1.0 + r1 * r2) / ((1.0 - r1**2) * (1.0 - r2**2) * (1.0 - r1 * r2))


def ema_noise_sum(lr, gamma, h, noise) -> np.ndarray:
    """Eq. 47: ``α c (1 + (1−αh)γ) / (B h (2 − αh)(1 − γ²)(1 − (1−αh)γ))``."""
    lr, gamma, h, noise = _arrays(lr, gamma, h, noise)
    r = 1.0 - lr * h
    with np.errstate(all="ignore"):
        return lr * noise * (1.0 + r * gamma) / (h * (2.0 - lr * h) * (1.0 - gamma**2) * (1.0 - r * gamma))


def theorem2_convergence_roots(t, lr, gamma, h) -> np.ndarray:
    """Eq. 49's factor ``((r1^{t+1} − r2^{t+1} − γ(1−αh)(r1^t − r2^t))/(r1 − r2))²`` as printed."""
    t, lr, gamma, h = _arrays(t, lr, gamma, h)
    r1, r2 = 1.0 - lr * h, gamma
    with np.errstate(all="ignore"):
        q = (r1 ** (t + 1) - r2 ** (t + 1) - gamma * r1 * (r1**t - r2**t)) / (r1 - r2)
    return q * q


def theorem2_convergence(t, lr, gamma, h) -> np.ndarray:
    """Eq. 49's factor without cancellation: ``(U_t − (1−αh)γ U_{t−1})²`` for the roots 1 − αh and γ."""
    t, lr, gamma, h = _arrays(t, lr, gamma, h)
    r = 1.0 - lr * h
    roots = char_roots(r + gamma, r * gamma, (r - gamma) ** 2, real_roots=(r, gamma))
    u_t, u_prev = lucas_pair(roots, t)
    return (u_t - r * gamma * u_prev) ** 2


def theorem2_steady(lr, gamma, h, noise) -> np.ndarray:
    """Eq. 49's steady term ``α c (1−γ)(1 + (1−αh)γ) / (B h (2 − αh)(1 + γ)(1 − (1−αh)γ))``."""
    lr, gamma, h, noise = _arrays(lr, gamma, h, noise)
    r = 1.0 - lr * h
    with np.errstate(all="ignore"):
        return lr * noise * (1.0 - gamma) * (1.0 + r * gamma) / (
            h * (2.0 - lr * h) * (1.0 + gamma) * (1.0 - r * gamma)
        )


def theorem2_bound(t, a0, lr, gamma, h, noise) -> np.ndarray:
    """Theorem 2 (eq. 49): ``A(θ̃(t)) ≤ ((r1^{t+1} − r2^{t+1} − γ(1−αh)(r1^t − r2^t))/(r1 − r2))² A(θ(0))
    + α c (1−γ)(1 + (1−αh)γ) / (B h (2 − αh)(1 + γ)(1 − (1−αh)γ))`` with ``θ̃(0) = θ(0)``."""
    return theorem2_convergence(t, lr, gamma, h) * np.asarray(a0) + theorem2_steady(lr, gamma, h, noise)


# ---------------------------------------------------------------------------------------- SGD


def sgd_risk(t, a0, lr, h, noise, weight=None) -> np.ndarray:
    """Plain SGD, per dimension: ``(1−αh)^{2t} A(0) + (1 − (1−αh)^{2t}) α c/(B h (2 − αh))`` times the risk
    weight ``½ h`` (``weight`` defaults to ``½ h``): the convergence term and the steady-state term."""
    t, a0, lr, h, noise = _arrays(t, a0, lr, h, noise)
    weight = 0.5 * h if weight is None else np.asarray(weight, dtype=np.float64)
    decay = (1.0 - lr * h) ** (2.0 * t)
    with np.errstate(all="ignore"):
        steady = lr * noise / (h * (2.0 - lr * h))
    return weight * (decay * a0 + (1.0 - decay) * steady)
