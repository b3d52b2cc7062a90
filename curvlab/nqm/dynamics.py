"""Per-dimension second-moment dynamics on the NQM: SGD, heavy-ball momentum (seed B, eqs. 17–22) and
an exponential moving average of the iterates (seed D, eqs. 35–38), with closed forms for k constant-rate
steps and learning-rate schedules (constant, linear decay of seed F.3, piecewise constant).

Everything is a small function over numpy arrays that broadcast: pass lr, momentum/decay, batch size and
curvature with shapes that broadcast (e.g. ``lr[:, None, None]``, ``beta[None, :, None]``,
``h[None, None, :]``) and a whole grid is evaluated at once.

State conventions (seed eq. 20 / eq. 38): for momentum ``v = (A(θ), A(m), C)`` with ``A(x) = E[x]² + V[x]
= E[x²]`` and ``C = E[θ m]``; for the iterate average ``v = (A(θ), A(θ̃), C)`` with ``C = E[θ θ̃]`` (the
seed writes eqs. 41–48 for the rescaled average ``θ̃/(1−γ)``; here the unscaled one is used, which is
what eq. 49 bounds). ``noise`` always means the per-step gradient-noise variance ``c/B`` (with
preconditioning, ``c h^{-2p}/B``), and ``h`` the curvature the optimiser sees (``h^{1-p}``).

Closed forms. Each optimiser's first moments follow a 2×2 linear map ``x(t+1) = M x(t) + u ε(t)``
(x = (θ, m) or (θ, θ̃)), so the second moments ``S(t) = E[x xᵀ]`` follow ``S(t+1) = M S Mᵀ + noise·u uᵀ``
— the 3×3 transition T of eq. 21 is ``M ⊗ M`` restricted to symmetric matrices, with eigenvalues
``r1², r1 r2, r2²`` (eq. 22: ``λ = β`` and the roots of ``λ² − (β² − 2αhβ + (1−αh)²)λ + β²``), where r1, r2
are the roots of ``z² − s z + P`` (s = tr M, P = det M; eq. 27). Cayley–Hamilton gives

    M^t = U_t I + U_{t−1} (M − s I),      U_n = (r1^{n+1} − r2^{n+1}) / (r1 − r2)  (eq. 28),

and ``S(t) = M^t (S(0) − S_∞) M^tᵀ + S_∞`` with the stationary ``S_∞`` (eqs. 31, 47). ``U_n`` is evaluated
without the cancellation of eq. 28 near the repeated root ``β = (1 − √(αh))²`` (where ``U_n = (n+1) r^n``)
and for complex roots (``ρ^n sin((n+1)φ)/sin φ``): see :func:`lucas_pair`. No k-step loop anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# --------------------------------------------------------------------------- one-step recursions


def sgd_step(a: np.ndarray, lr, h, noise) -> np.ndarray:
    """One SGD step of ``A(θ) = E[θ²]``: ``A ← (1 − αh)² A + α² c/B`` (``noise = c/B``)."""
    return (1.0 - lr * h) ** 2 * a + lr**2 * noise


def momentum_transition(lr, beta, h) -> np.ndarray:
    """The 3×3 transition matrix T of seed eq. 21 for ``v = (A(θ), A(m), C)`` (shape ``(..., 3, 3)``).

    Rows are eq. 20: ``A(θ') = (1−αh)² A(θ) + (αβ)² A(m) − 2(1−αh)αβ C``,
    ``A(m') = h² A(θ) + β² A(m) + 2βh C``, ``C' = (1−αh)h A(θ) − αβ² A(m) + (1−2αh)β C``.
    """
    lr, beta, h = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in (lr, beta, h)))
    r = 1.0 - lr * h
    rows = [
        [r**2, (lr * beta) ** 2, -2.0 * r * lr * beta],
        [h**2, beta**2, 2.0 * beta * h],
        [r * h, -lr * beta**2, (1.0 - 2.0 * lr * h) * beta],
    ]
    return np.stack([np.stack(row, axis=-1) for row in rows], axis=-2)


def momentum_noise(lr, noise) -> np.ndarray:
    """The noise vector n of eq. 20: ``(α² c/B, c/B, −α c/B)`` (shape ``(..., 3)``)."""
    lr, noise = np.broadcast_arrays(np.asarray(lr, dtype=np.float64), np.asarray(noise, dtype=np.float64))
    return np.stack([lr**2 * noise, noise, -lr * noise], axis=-1)


def momentum_step(v: np.ndarray, lr, beta, h, noise) -> np.ndarray:
    """One step of seed eq. 20: ``v ← T v + n`` for ``v = (A(θ), A(m), C)`` on the last axis."""
    return np.einsum("...ij,...j->...i", momentum_transition(lr, beta, h), v) + momentum_noise(lr, noise)


def ema_transition(lr, gamma, h) -> np.ndarray:
    """The 3×3 transition of the iterate average for ``v = (A(θ), A(θ̃), C)`` (seed eqs. 35–38).

    With ``r = 1 − αh``: ``A(θ') = r² A(θ)``, ``A(θ̃') = (1−γ)² r² A(θ) + γ² A(θ̃) + 2γ(1−γ) r C``,
    ``C' = (1−γ) r² A(θ) + γ r C`` (eq. 37's coefficient of Cov(t) is ``γ(1−αh)``; the extracted seed
    text reads "(1−αγ)", a garbled glyph — re-derived in docs/nqm.md).
    """
    lr, gamma, h = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in (lr, gamma, h)))
    r = 1.0 - lr * h
    zero = np.zeros_like(r)
    rows = [
        [r**2, zero, zero],
        [(1.0 - gamma) ** 2 * r**2, gamma**2, 2.0 * gamma * (1.0 - gamma) * r],
        [(1.0 - gamma) * r**2, zero, gamma * r],
    ]
    return np.stack([np.stack(row, axis=-1) for row in rows], axis=-2)


def ema_noise(lr, gamma, noise) -> np.ndarray:
    """Noise vector of the averaged system: ``(α² c/B, (1−γ)² α² c/B, (1−γ) α² c/B)``."""
    lr, gamma, noise = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in (lr, gamma, noise)))
    base = lr**2 * noise
    return np.stack([base, (1.0 - gamma) ** 2 * base, (1.0 - gamma) * base], axis=-1)


def ema_step(v: np.ndarray, lr, gamma, h, noise) -> np.ndarray:
    """One step of the averaged system (eqs. 35–37): ``v ← T v + n`` for ``v = (A(θ), A(θ̃), C)``."""
    return np.einsum("...ij,...j->...i", ema_transition(lr, gamma, h), v) + ema_noise(lr, gamma, noise)


# ------------------------------------------------------------------------ U_n without cancellation


def geometric_sum(q: np.ndarray, n: np.ndarray) -> np.ndarray:
    """``Σ_{k=0}^{n−1} q^k`` for real ``|q| ≤ 1`` and integer ``n ≥ 0`` (exact limit n at q = 1).

    For ``q`` in (0.5, 1) it is ``expm1(n log q) / expm1(log q)``, which stays accurate as q → 1 (the
    repeated-root limit); elsewhere ``(1 − q^n)/(1 − q)`` has no cancellation.
    """
    q = np.asarray(q, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(all="ignore"):
        near = (q > 0.5) & (q < 1.0)
        log_q = np.log(np.where(near, q, 0.75))
        close = np.expm1(n * log_q) / np.expm1(log_q)
        far = (1.0 - np.power(np.where(near, 0.0, q), n)) / (1.0 - np.where(q == 1.0, 0.0, q))
        return np.where(q == 1.0, n, np.where(near, close, far))


@dataclass(frozen=True)
class CharRoots:
    """Roots of ``z² − s z + P`` (eq. 27) in the form :func:`lucas_pair` needs.

    ``complex_``: conjugate pair ``ρ e^{±iφ}`` (``rho``, ``phi``, ``sin_phi``); otherwise real roots
    ``r1`` (largest modulus) and ``q = r2/r1``.
    """

    complex_: np.ndarray
    rho: np.ndarray
    phi: np.ndarray
    sin_phi: np.ndarray
    r1: np.ndarray
    q: np.ndarray

    @property
    def spectral_radius(self) -> np.ndarray:
        return np.where(self.complex_, self.rho, np.abs(self.r1))


def char_roots(s, p, disc, real_roots: tuple[np.ndarray, np.ndarray] | None = None) -> CharRoots:
    """Roots of ``z² − s z + P`` given an accurately computed discriminant ``disc = s² − 4P``.

    ``real_roots`` (optional): the two roots when they are known in closed form (the iterate average:
    ``1 − αh`` and ``γ``), used instead of the quadratic formula.
    """
    s, p, disc = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in (s, p, disc)))
    with np.errstate(all="ignore"):
        if real_roots is not None:
            ra, rb = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in real_roots))
            swap = np.abs(rb) > np.abs(ra)
            r1 = np.where(swap, rb, ra)
            r2 = np.where(swap, ra, rb)
            q = np.where(r1 == 0.0, 0.0, r2 / np.where(r1 == 0.0, 1.0, r1))
            zeros = np.zeros_like(s)
            return CharRoots(np.zeros(s.shape, dtype=bool), zeros, zeros, np.ones_like(s), r1, q)
        complex_ = disc < 0.0
        root_disc = np.sqrt(np.abs(disc))
        # real branch: the larger-modulus root by the cancellation-free quadratic formula, r2 = P / r1
        r1 = 0.5 * (s + np.copysign(root_disc, s))
        r1 = np.where(complex_, 1.0, r1)
        q = np.where(r1 == 0.0, 0.0, p / (r1 * r1))
        # complex branch: ρ = √P, φ = atan2(√(−disc), s) ∈ (0, π), sin φ = √(−disc) / (2ρ)
        rho = np.sqrt(np.where(complex_, p, 1.0))
        phi = np.where(complex_, np.arctan2(root_disc, s), 0.0)
        sin_phi = np.where(complex_, root_disc / (2.0 * rho), 1.0)
    return CharRoots(complex_, rho, phi, sin_phi, np.where(complex_, 0.0, r1), np.where(complex_, 0.0, q))


def lucas_pair(roots: CharRoots, t) -> tuple[np.ndarray, np.ndarray]:
    """``(U_t, U_{t−1})`` with ``U_n = (r1^{n+1} − r2^{n+1})/(r1 − r2)`` (eq. 28), for integers t ≥ 0.

    Complex roots: ``U_n = ρ^n sin((n+1)φ)/sin φ``. Real roots: ``U_n = r1^n Σ_{k≤n} q^k`` with
    :func:`geometric_sum`, exact at the repeated root (``q = 1``: ``U_n = (n+1) r1^n``). ``U_{−1} = 0``,
    ``U_0 = 1``. Unstable roots overflow to ±inf for large t (no warning).
    """
    t = np.asarray(t, dtype=np.float64)
    with np.errstate(all="ignore"):
        # complex branch
        base = np.exp((t - 1.0) * np.log(roots.rho))
        st, ct = np.sin(t * roots.phi), np.cos(t * roots.phi)
        cphi = np.cos(roots.phi)
        u_prev_c = base * st / roots.sin_phi
        u_c = base * roots.rho * (st * cphi + ct * roots.sin_phi) / roots.sin_phi
        # real branch: r1^{t-1} Σ_{k<t} q^k and r1^t Σ_{k≤t} q^k
        g_prev = geometric_sum(roots.q, t)
        power = np.power(roots.r1, t - 1.0)
        u_prev_r = np.where(t == 0.0, 0.0, power * g_prev)
        u_r = np.where(t == 0.0, 1.0, power * roots.r1 * (1.0 + roots.q * g_prev))
    return np.where(roots.complex_, u_c, u_r), np.where(roots.complex_, u_prev_c, u_prev_r)


# ------------------------------------------------------------------------------ 2×2 linear systems


@dataclass(frozen=True)
class System:
    """First moments ``x(t+1) = M x(t) + u ε`` of one optimiser, per element (arrays broadcast).

    Second moments ``S = E[x xᵀ]`` are stored as ``v = (S11, S22, S12)`` on the last axis (eq. 20's
    ``(A(θ), A(m), C)``; the average's ``(A(θ), A(θ̃), C)``). ``stationary`` is ``S_∞`` per unit noise
    variance; ``readout`` is the component whose second moment sets the risk (0: θ, 1: θ̃) and
    ``init`` the pattern of ``S(0)`` per unit ``E[θ(0)²]``.
    """

    m11: np.ndarray
    m12: np.ndarray
    m21: np.ndarray
    m22: np.ndarray
    s: np.ndarray
    roots: CharRoots
    stable: np.ndarray
    stationary: tuple[np.ndarray, np.ndarray, np.ndarray]
    readout: int
    init: tuple[float, float, float]

    def matrix_power(self, t) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Entries of ``M^t = U_t I + U_{t−1}(M − sI)`` (Cayley–Hamilton), t ≥ 0 integer."""
        u_t, u_prev = lucas_pair(self.roots, t)
        with np.errstate(all="ignore"):  # diverging settings overflow quietly
            return (
                u_t + u_prev * (self.m11 - self.s),
                u_prev * self.m12,
                u_prev * self.m21,
                u_t + u_prev * (self.m22 - self.s),
            )

    def propagate(self, v: np.ndarray, t, noise) -> np.ndarray:
        """Second moments after t constant-rate steps: ``S(t) = M^t (S(0) − noise·S_∞) M^tᵀ + noise·S_∞``."""
        a11, a12, a21, a22 = self.matrix_power(t)
        noise = np.asarray(noise, dtype=np.float64)
        inf11, inf22, inf12 = (noise * x for x in self.stationary)
        with np.errstate(all="ignore"):
            d11, d22, d12 = v[..., 0] - inf11, v[..., 1] - inf22, v[..., 2] - inf12
            out11 = a11 * a11 * d11 + 2.0 * a11 * a12 * d12 + a12 * a12 * d22 + inf11
            out22 = a21 * a21 * d11 + 2.0 * a21 * a22 * d12 + a22 * a22 * d22 + inf22
            out12 = a11 * a21 * d11 + (a11 * a22 + a12 * a21) * d12 + a12 * a22 * d22 + inf12
        return np.stack(np.broadcast_arrays(out11, out22, out12), axis=-1)

    def readout_parts(self, t) -> tuple[np.ndarray, np.ndarray]:
        """``(D(t), N(t))`` with ``E[x_e(t)²] = D(t) E[θ(0)²] + N(t) c/B`` from ``S(0) = E[θ(0)²]·init``.

        ``D = a S_init aᵀ`` (the convergence term, eq. 33/48) and ``N = S_∞,ee − a S_∞ aᵀ`` (the partial
        noise sum ``Σ_{p<t}``, which grows to the stationary value of eq. 31/47), where ``a = e_eᵀ M^t``.
        """
        a11, a12, a21, a22 = self.matrix_power(t)
        x, y = (a11, a12) if self.readout == 0 else (a21, a22)
        i11, i22, i12 = self.init
        s11, s22, s12 = self.stationary
        with np.errstate(all="ignore"):
            quad_init = i11 * x * x + 2.0 * i12 * x * y + i22 * y * y
            quad_inf = s11 * x * x + 2.0 * s12 * x * y + s22 * y * y
            stat = s11 if self.readout == 0 else s22
            return quad_init, stat - quad_inf


def momentum_system(lr, beta, h) -> System:
    """Heavy-ball momentum (seed eq. 17): ``M = [[1−αh, −αβ], [h, β]]``, ``u = (−α, 1)``.

    Trace ``s = 1 − αh + β``, det ``β``. Stationary second moments per unit noise (from the sums
    ``Σ U_p² = (1+β)/((1−β) αh (2+2β−αh))`` and ``Σ U_p U_{p−1} = s Σ U_p²/(1+β)``):
    ``A(θ)_∞ = α² ΣU²`` (eq. 31), ``C_∞ = −α ΣU² αh/(1+β)``, ``A(m)_∞ = 2 ΣU² αh/(1+β)``.
    Stable iff ``0 ≤ β < 1`` and ``0 < αh < 2(1+β)``.
    """
    lr, beta, h = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in (lr, beta, h)))
    x = lr * h
    s = 1.0 - x + beta
    root_beta = np.sqrt(beta)
    root_x = np.sqrt(x)
    # s − 2√β = (1 − √β)² − αh, factored so the discriminant is accurate at the repeated root
    gap = (1.0 - root_beta - root_x) * (1.0 - root_beta + root_x)
    disc = gap * (s + 2.0 * root_beta)
    roots = char_roots(s, beta, disc)
    stable = (beta >= 0.0) & (beta < 1.0) & (x > 0.0) & (x < 2.0 * (1.0 + beta))
    with np.errstate(all="ignore"):
        sum_u2 = (1.0 + beta) / ((1.0 - beta) * x * (2.0 + 2.0 * beta - x))
        ratio = x / (1.0 + beta)
        stationary = (lr**2 * sum_u2, 2.0 * sum_u2 * ratio, -lr * sum_u2 * ratio)
    return System(1.0 - x, -lr * beta, h, beta, s, roots, stable, stationary, 0, (1.0, 0.0, 0.0))


def ema_system(lr, gamma, h) -> System:
    """SGD with an iterate average (seed eq. 35): ``M = [[r, 0], [(1−γ) r, γ]]``, ``u = −α(1, 1−γ)``.

    ``r = 1 − αh``; the roots are r and γ (eq. 42). Stationary per unit noise: ``A(θ)_∞ = α²/(1−r²)``,
    ``A(θ̃)_∞ = α²(1−γ)² (1+rγ)/((1−r²)(1−γ²)(1−rγ))`` (eqs. 46–47 times (1−γ)², eq. 49),
    ``C_∞ = α²(1−γ)/((1−r²)(1−rγ))``. ``θ̃(0) = θ(0)``. Stable iff ``0 ≤ γ < 1`` and ``0 < αh < 2``.
    """
    lr, gamma, h = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in (lr, gamma, h)))
    x = lr * h
    r = 1.0 - x
    s = r + gamma
    p = r * gamma
    roots = char_roots(s, p, (r - gamma) ** 2, real_roots=(r, gamma))
    stable = (gamma >= 0.0) & (gamma < 1.0) & (x > 0.0) & (x < 2.0)
    with np.errstate(all="ignore"):
        one_minus_r2 = x * (2.0 - x)
        one_minus_rg = (1.0 - gamma) + x * gamma
        s11 = lr**2 / one_minus_r2
        s22 = lr**2 * (1.0 - gamma) ** 2 * (1.0 + p) / (one_minus_r2 * (1.0 - gamma**2) * one_minus_rg)
        s12 = lr**2 * (1.0 - gamma) / (one_minus_r2 * one_minus_rg)
    return System(r, np.zeros_like(r), (1.0 - gamma) * r, gamma, s, roots, stable, (s11, s22, s12), 1,
                  (1.0, 1.0, 1.0))


# ------------------------------------------------------------------------------------ plain SGD


def sgd_stable(lr, h) -> np.ndarray:
    """SGD on one dimension is stable iff ``0 < αh < 2``."""
    x = np.asarray(lr, dtype=np.float64) * np.asarray(h, dtype=np.float64)
    return (x > 0.0) & (x < 2.0)


def sgd_parts(t, lr, h) -> tuple[np.ndarray, np.ndarray]:
    """``(D, N)`` with ``A(θ(t)) = D A(θ(0)) + N c/B`` for SGD: ``D = (1−αh)^{2t}``,
    ``N = α² (1 − (1−αh)^{2t}) / (αh(2−αh))`` (the closed form of shared/nqm.md, eq. 6's two terms).
    ``1 − (1−αh)^{2t}`` is computed as ``−expm1(2t log|1−αh|)`` so small αh keeps full precision.
    """
    t, lr, h = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in (t, lr, h)))
    x = lr * h
    with np.errstate(all="ignore"):
        log_r2 = 2.0 * np.where(x < 1.0, np.log1p(-x), np.log(np.abs(1.0 - x)))
        exponent = np.where(t == 0.0, 0.0, t * log_r2)
        decay = np.exp(exponent)
        grown = -np.expm1(exponent)
        noise = lr**2 * grown / (x * (2.0 - x))
        noise = np.where(x == 2.0, lr**2 * t, noise)  # |1−αh| = 1: the noise adds up linearly
    return decay, noise


def sgd_second_moment(t, a0, lr, h, noise) -> np.ndarray:
    """``E[θ(t)²]`` after t constant-rate SGD steps from ``E[θ(0)²] = a0``."""
    decay, unit = sgd_parts(t, lr, h)
    return decay * a0 + unit * noise


def sgd_stationary(lr, h) -> np.ndarray:
    """Stationary ``E[θ²]`` per unit noise: ``α/(h(2−αh))`` (eq. 31 at β = 0)."""
    lr = np.asarray(lr, dtype=np.float64)
    h = np.asarray(h, dtype=np.float64)
    with np.errstate(all="ignore"):
        return lr / (h * (2.0 - lr * h))


# ------------------------------------------------------------------------------------ schedules


def constant_schedule(lr: float, steps: int) -> np.ndarray:
    """``α(t) = α0`` for t = 0..steps−1 (seed F.3)."""
    return np.full(int(steps), float(lr))


def linear_decay_schedule(lr0: float, decay: float, decay_steps: int, steps: int) -> np.ndarray:
    """Linear decay (seed F.3, Shallue et al. 2018): ``α(t) = α0 (1 − (1 − δ) t/T)`` for t < T, then
    ``δ α0``; δ is the final fraction, T the steps to reach it.

    The extracted seed text reads ``α(t) = α0 − (1 − δ) t/T`` — the α0 factor of the decay term is lost
    in extraction (without it the final rate ``α0 − (1−δ)`` is not a decay *rate* and can be negative);
    docs/nqm.md says so.
    """
    t = np.arange(int(steps), dtype=np.float64)
    frac = np.minimum(t / max(int(decay_steps), 1), 1.0)
    return lr0 * (1.0 - (1.0 - decay) * frac)


def piecewise_constant_schedule(lrs: Sequence[float], steps: Sequence[int]) -> np.ndarray:
    """``lrs[j]`` for ``steps[j]`` consecutive steps (the optimised schedule of seed E.7)."""
    return np.repeat(np.asarray(lrs, dtype=np.float64), np.asarray(steps, dtype=np.int64))


def sgd_piecewise(a0, lrs: Sequence, steps: Sequence[int], h, noise) -> np.ndarray:
    """``E[θ²]`` after piecewise-constant SGD: the closed form applied piece by piece (K pieces)."""
    a = np.asarray(a0, dtype=np.float64)
    for lr, k in zip(lrs, steps, strict=True):
        a = sgd_second_moment(k, a, lr, h, noise)
    return a


def system_piecewise(factory, v0: np.ndarray, lrs: Sequence, decay, steps: Sequence[int], h,
                     noise) -> np.ndarray:
    """Second moments after a piecewise-constant schedule for momentum or the average: one closed-form
    :meth:`System.propagate` per piece (``factory`` is :func:`momentum_system` or :func:`ema_system`)."""
    v = np.asarray(v0, dtype=np.float64)
    for lr, k in zip(lrs, steps, strict=True):
        v = factory(lr, decay, h).propagate(v, k, noise)
    return v


def _compose_affine(mats: np.ndarray, shifts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Compose the maps ``v ← T_k v + n_k`` (k = 0..K−1 along axis 0) into one, by pairwise halving.

    ``log2 K`` vectorised passes of batched matrix products:
    ``(T_b, n_b)∘(T_a, n_a) = (T_b T_a, T_b n_a + n_b)``.
    """
    while mats.shape[0] > 1:
        if mats.shape[0] % 2:
            eye = np.broadcast_to(np.eye(mats.shape[-1]), mats.shape[1:])[None]
            mats = np.concatenate([mats, eye])
            shifts = np.concatenate([shifts, np.zeros_like(shifts[:1])])
        first, second = mats[0::2], mats[1::2]
        shifts = np.einsum("k...ij,k...j->k...i", second, shifts[0::2]) + shifts[1::2]
        mats = np.einsum("k...ij,k...jl->k...il", second, first)
    return mats[0], shifts[0]


def run_schedule(kind: str, v0: np.ndarray, lrs: np.ndarray, h, noise, decay=0.0,
                 block: int = 1024) -> np.ndarray:
    """Second moments after a per-step schedule ``lrs`` (e.g. :func:`linear_decay_schedule`), exactly.

    ``kind``: ``"sgd"`` (``v0`` = A(θ); one pass of cumulative sums of ``log (1−α_t h)²`` per block),
    ``"momentum"`` or ``"ema"`` (``v0`` = the 3-vector state; per block the affine maps of eq. 20 / 38
    are composed by pairwise halving, :func:`_compose_affine`). Work is vectorised over blocks of
    ``block`` steps, never one Python iteration per step.
    """
    lrs = np.asarray(lrs, dtype=np.float64)
    h = np.asarray(h, dtype=np.float64)
    noise = np.asarray(noise, dtype=np.float64)
    v = np.asarray(v0, dtype=np.float64)
    for start in range(0, lrs.size, block):
        chunk = lrs[start : start + block]
        lr = chunk.reshape((-1,) + (1,) * max(h.ndim, noise.ndim, 1))
        if kind == "sgd":
            with np.errstate(divide="ignore"):
                log_r2 = 2.0 * np.log(np.abs(1.0 - lr * h))
            # A_end = A_0 Π r_k² + Σ_k α_k² noise Π_{j>k} r_j²
            after = np.cumsum(log_r2[::-1], axis=0)[::-1] - log_r2  # Σ_{j>k} log r_j²
            v = np.exp(log_r2.sum(axis=0)) * v + np.sum(lr**2 * noise * np.exp(after), axis=0)
            v = v.reshape(np.broadcast_shapes(v.shape, h.shape, noise.shape))
        elif kind in ("momentum", "ema"):
            mats = (momentum_transition if kind == "momentum" else ema_transition)(lr, decay, h)
            shifts = momentum_noise(lr, noise) if kind == "momentum" else ema_noise(lr, decay, noise)
            batch = np.broadcast_shapes(mats.shape[:-2], shifts.shape[:-1])
            mats = np.ascontiguousarray(np.broadcast_to(mats, batch + (3, 3)))
            shifts = np.ascontiguousarray(np.broadcast_to(shifts, batch + (3,)))
            mat, shift = _compose_affine(mats, shifts)
            v = np.einsum("...ij,...j->...i", mat, v) + shift
        else:
            raise ValueError(f"unknown optimiser kind {kind!r}")
    return v
