"""The log-spacing (Hill-type) estimator of the rank-law exponent, on a gap table, with its intervals.

The sorted values ``λ_(1) ≥ λ_(2) ≥ …`` are taken as the order statistics of a sample with a Pareto
tail of index ``α = 1/s``, so ``E log λ_(i) = log c − s ψ(i)`` (:mod:`curvlab.analysis.powerlaw`).
This module estimates ``s`` over a given window; docs/powerlaw.md has the derivation.

* **Estimator.** By Rényi's representation the normalised log-spacings
  ``x_i = i (log λ_(i) − log λ_(i+1))`` are i.i.d. exponential with mean ``s`` for *every* ``i``, so over a
  rank window ``[k_lo, k_hi]`` (``k = k_hi − k_lo`` spacings) the MLE is their mean,
  ``ŝ = (1/k) Σ_{i=k_lo}^{k_hi−1} x_i`` (Hill's estimator when ``k_lo = 1``), and ``2kŝ/s ~ χ²_{2k}``
  exactly, which gives the model-based confidence interval.
* **Thinned spectra.** With values known only at grid ranks ``r_0 < r_1 < …`` each gap contributes
  ``y_j = ρ_j (log λ_(r_j) − log λ_(r_{j+1}))`` with ``ρ_j = (r_{j+1} − r_j)/(ψ(r_{j+1}) − ψ(r_j))``, so that
  ``E y_j = s (r_{j+1} − r_j)`` exactly; ``ŝ = Σ y_j / Σ (r_{j+1} − r_j)`` reduces to the full-data MLE when
  the grid holds every rank and loses only O(gap²) efficiency otherwise; its variance is
  ``s² Σ ρ_j² (ψ'(r_j) − ψ'(r_{j+1}))/k²`` (a Gamma law with matched moments gives the interval).
* **Gap table.** :func:`rank_grid` gives the grid ranks (every rank up to :data:`DENSE_RANKS`, then
  geometric); ``_Gaps`` holds each gap's ``y``, variance and length with cumulative sums, so ``ŝ`` of
  any window is one difference (``_digamma_diff`` and ``_trigamma_diff`` give ``Δψ`` and ``Δψ'``
  without cancellation).
* **Cross-checks.** OLS of ``log λ_(i)`` on ``log(i − ½)`` (Gabaix & Ibragimov 2011) with its exact
  standard error under the model; a bootstrap interval (resampling the window's gaps).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import special, stats

from curvlab.errors import OptionError

#: Every rank up to this one is a grid point (the top of the spectrum, where each value matters).
DENSE_RANKS = 1000
#: Beyond ``DENSE_RANKS`` grid ranks grow by this factor (0.1%: ~2300 points per decade of rank).
GRID_RATIO = 1.001


# ---------------------------------------------------------------------------------- rank grid


def rank_grid(
    n: int, *, dense: int = DENSE_RANKS, ratio: float = GRID_RATIO, extra: Sequence[int] = ()
) -> np.ndarray:
    """Ranks ``1..min(n, dense)``, then ranks growing geometrically by ``ratio``, then ``n`` (int64).

    ``extra`` ranks (e.g. a user's window ends) are added. With ``n ≤ dense`` this is every rank.
    """
    if n < 1:
        raise ValueError("rank_grid needs n >= 1")
    head = np.arange(1, min(n, dense) + 1, dtype=np.int64)
    parts = [head]
    if n > dense:
        steps = math.ceil(math.log(n / dense) / math.log(ratio))
        tail = np.ceil(dense * ratio ** np.arange(1, steps + 1)).astype(np.int64)
        parts.append(tail[tail < n])
        parts.append(np.array([n], dtype=np.int64))
    if len(extra):
        parts.append(np.asarray(extra, dtype=np.int64))
    return np.unique(np.concatenate(parts))


def _digamma_diff(r: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``ψ(r + g) − ψ(r) = Σ_{i=r}^{r+g−1} 1/i`` without cancellation (r ≥ 1, g ≥ 1 integers).

    For ``r ≥ 64`` the asymptotic series ``ψ(x) = ln x − 1/(2x) − 1/(12x²) + 1/(120x⁴) − 1/(252x⁶)``
    is differenced term by term (the first omitted term, ``1/(240x⁸)``, is below 1e-17 of the
    difference); smaller ``r`` use scipy's digamma directly, where the cancellation costs at most
    ``eps · r · ψ(r) / g`` relative, below 1e-13.
    """
    r = np.asarray(r, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    s = r + g
    out = np.log1p(g / r) + g / (2.0 * r * s) + (1.0 / (r * r) - 1.0 / (s * s)) / 12.0
    out -= (1.0 / r**4 - 1.0 / s**4) / 120.0
    out += (1.0 / r**6 - 1.0 / s**6) / 252.0
    small = r < 64
    if np.any(small):
        out[small] = special.digamma(s[small]) - special.digamma(r[small])
    return out


def _trigamma_diff(r: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``ψ'(r) − ψ'(r + g) = Σ_{i=r}^{r+g−1} 1/i²`` (the variance of a gap's log-drop over ``s²``)."""
    r = np.asarray(r, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    out = 1.0 / (r * r)  # exact for one-rank gaps, the whole top of a grid
    wide = g > 1
    if np.any(wide):
        out[wide] = special.polygamma(1, r[wide]) - special.polygamma(1, r[wide] + g[wide])
    return out


# --------------------------------------------------------------------------------- gap table


@dataclass
class _Gaps:
    """The spectrum at grid ranks ``r`` (ascending, 1-based) and its per-gap statistics.

    For gap ``j`` (between ``r[j]`` and ``r[j+1]``): ``g`` its length, ``y`` its summed normalised
    spacings (exact sum of ``i·Δ_i`` on full data, ``ρ_j · drop`` on a grid), ``v`` the variance of
    ``y`` over ``s²``, ``rho`` the effective rank ``g/Δψ``, ``tau = Σ 1/i²`` over the gap.
    """

    r: np.ndarray
    L: np.ndarray
    psi: np.ndarray
    g: np.ndarray
    y: np.ndarray
    v: np.ndarray
    rho: np.ndarray
    tau: np.ndarray
    cy: np.ndarray = field(init=False)
    cv: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.cy = np.concatenate([[0.0], np.cumsum(self.y)])
        self.cv = np.concatenate([[0.0], np.cumsum(self.v)])

    @classmethod
    def from_grid(cls, r: np.ndarray, L: np.ndarray) -> _Gaps:
        """Gaps of a thinned spectrum (values known only at the grid ranks)."""
        g = np.diff(r).astype(np.float64)
        dpsi = _digamma_diff(r[:-1], g)
        rho = g / dpsi
        tau = _trigamma_diff(r[:-1], g)
        y = rho * (L[:-1] - L[1:])
        return cls(r, L, special.digamma(r.astype(np.float64)), g, y, rho * rho * tau, rho, tau)

    @classmethod
    def from_full(cls, L_all: np.ndarray, r: np.ndarray) -> _Gaps:
        """Gaps of a full spectrum (``L_all[i-1] = log λ_(i)``), aggregated exactly onto grid ``r``."""
        i = np.arange(1, len(L_all), dtype=np.float64)
        x = i * (L_all[:-1] - L_all[1:])  # normalised spacings i·Δ_i, i = 1..n-1
        y = np.add.reduceat(x, r[:-1] - 1)
        g = np.diff(r).astype(np.float64)
        tau = _trigamma_diff(r[:-1], g)
        rho = g / _digamma_diff(r[:-1], g)
        return cls(r, L_all[r - 1], special.digamma(r.astype(np.float64)), g, y, g.copy(), rho, tau)

    def index(self, rank: int) -> int:
        j = int(np.searchsorted(self.r, rank))
        if j >= len(self.r) or self.r[j] != rank:
            raise OptionError(f"window end {rank} is not one of the ranks the spectrum is known at")
        return j

    def exponent(self, a: int, b: np.ndarray | int) -> np.ndarray:
        """MLE ``ŝ = Σ y / Σ g`` over gaps ``a..b−1`` (window ``[r[a], r[b]]``)."""
        return (self.cy[b] - self.cy[a]) / (self.r[b] - self.r[a])


# ------------------------------------------------------------------------------------ estimators


def _model_interval(s: float, k: float, var: float, confidence: float) -> tuple[float, float, float]:
    """Model-based interval of ``s`` from ``ŝ ~ s · Gamma(κ, 1/κ)``, ``κ = k²/var``: ``2κŝ/s ~ χ²_{2κ}``.

    Exact on full data (``var = k``, ``κ = k``: the sum of ``k`` i.i.d. Exp(s)); on a grid the Gamma law
    matches the mean and variance of ``ŝ`` (Satterthwaite). Returns ``(low, high, 2κ)``.
    """
    dof = 2.0 * k * k / var
    q = (1.0 - confidence) / 2.0
    return dof * s / stats.chi2.ppf(1.0 - q, dof), dof * s / stats.chi2.ppf(q, dof), dof


def _bootstrap(y: np.ndarray, g: np.ndarray, reps: int, seed: int, confidence: float) -> tuple[float, float]:
    """Percentile interval of ``Σ y* / Σ g*`` over ``reps`` resamples (with replacement) of the gaps.

    On full data every gap up to rank 1000 is one spacing, later ones are blocks of consecutive
    spacings (a block bootstrap); the resampled estimator is the ratio, as the gaps differ in length.
    """
    rng = np.random.default_rng(seed)
    m = len(y)
    out = np.empty(reps)
    chunk = max(1, 4_000_000 // max(m, 1))
    for start in range(0, reps, chunk):
        stop = min(reps, start + chunk)
        idx = rng.integers(0, m, size=(stop - start, m))
        out[start:stop] = y[idx].sum(axis=1) / g[idx].sum(axis=1)
    q = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(out, [q, 1.0 - q])
    return float(lo), float(hi)


def _ols(
    ranks: np.ndarray, L: np.ndarray, weights: np.ndarray | None, tau: np.ndarray
) -> tuple[float, float]:
    """OLS of ``log λ`` on ``log(i − ½)`` (Gabaix & Ibragimov 2011): ``(exponent, standard error)``.

    ``weights`` count the ranks each point stands for (None: all 1, full data). The standard error is
    exact under the rank law: the slope is ``Σ a_p L_p`` with ``Σ a_p = 0``, and ``L_p − L_last`` sums
    the independent gap drops (variance ``s² τ_q``), so ``Var = s² Σ_q A_q² τ_q`` with ``A_q`` the
    cumulative sum of the ``a_p`` above gap ``q``; for a window from the top it tends to GI's
    ``sqrt(2/k)·s``.
    """
    x = ranks.astype(np.float64)
    x -= 0.5
    np.log(x, out=x)
    w = np.full(len(x), 1.0 / len(x)) if weights is None else weights / weights.sum()
    x -= float(w @ x)
    sxx = float(w @ (x * x))
    x *= w
    x /= sxx  # x is now a_p
    slope = float(x @ L)
    A = np.cumsum(x[:-1], out=x[:-1])
    A *= A
    se = abs(slope) * math.sqrt(float(A @ tau))
    return -slope, se


def _ols_points(gaps: _Gaps, a: int, b: int, L_all: np.ndarray | None) -> tuple[float, float]:
    lo, hi = int(gaps.r[a]), int(gaps.r[b])
    if L_all is not None:  # full data: every rank of the window, weight 1, τ_i = 1/i²
        ranks = np.arange(lo, hi + 1, dtype=np.float64)
        tau = ranks[:-1] ** -2.0
        return _ols(ranks, L_all[lo - 1 : hi], None, tau)
    g = gaps.g[a:b]
    w = np.concatenate([[0.0], g]) / 2.0 + np.concatenate([g, [0.0]]) / 2.0
    w[0] += 0.5
    w[-1] += 0.5  # trapezoid weights: the ranks each grid point stands for (1 on a complete grid)
    return _ols(gaps.r[a : b + 1], gaps.L[a : b + 1], w, gaps.tau[a:b])
