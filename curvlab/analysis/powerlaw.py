"""Rank power-law fit of a sorted eigenspectrum: ``λ_(i) ≈ c · i^(-s)`` (seed E.4, Fig. 12).

The NQM of the seed (Section 3.5/3.7) takes the curvature eigenvalues to be ``h_i = 1/i``; seed E.4
checks this against the K-FAC eigenspectrum of a real network. This module fits the rank law with
proper statistics; the derivation is written out in ``docs/powerlaw.md``. In short:

* **Model.** The sorted values ``λ_(1) ≥ λ_(2) ≥ …`` are the order statistics of a sample whose tail is
  Pareto with index ``α = 1/s`` (``P(λ > x) ∝ x^(-1/s)``), so ``E log λ_(i) = log c − s ψ(i)`` with
  ``ψ`` the digamma function (``ψ(i) ≈ log(i − ½)``).
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
* **Window.** Chosen among candidate windows (``k_lo`` among the top 100 ranks, ``k_hi`` on a geometric
  grid up to the last value above the numerical floor, at least one decade wide) by minimising KS
  distances: ``k_hi`` by Clauset, Shalizi & Newman's KS distance between the window's values and the
  fitted power law (it sees the floor), ``k_lo`` by a KS distance on the log-rank scale
  (:func:`ks_distance`, it sees a handful of top outliers).
* **Cross-checks.** OLS of ``log λ_(i)`` on ``log(i − ½)`` (Gabaix & Ibragimov 2011) with its exact
  standard error under the model; a bootstrap interval (resampling the window's gaps); and three
  other models on the same window: the NQM's fixed ``s = 1``, a log-quadratic curve and the
  log-corrected law ``c (ln i)^β i^(-s)`` of a product of two ``1/i`` spectra, compared by likelihood
  ratio, AIC and KS distance. No log-log R² is reported anywhere.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import special, stats

from curvlab.errors import CurvlabError, OptionError

if TYPE_CHECKING:
    from curvlab.analysis.spectrum import KroneckerSpectrum

__all__ = [
    "DENSE_RANKS",
    "FULL_DATA_LIMIT",
    "GRID_RATIO",
    "THIN_GRID_RATIO",
    "FitError",
    "ModelFit",
    "RankLawFit",
    "default_floor",
    "fit_rank_law",
    "fit_spectrum",
    "kronecker_floor",
    "ks_distance",
    "parse_window",
    "rank_grid",
    "window_candidates",
]

#: Every rank up to this one is a grid point (the top of the spectrum, where each value matters).
DENSE_RANKS = 1000
#: Beyond ``DENSE_RANKS`` grid ranks grow by this factor (0.1%: ~2300 points per decade of rank).
GRID_RATIO = 1.001
#: Spectra with at most this many products are fitted on all their values, larger ones on the grid.
FULL_DATA_LIMIT = 20_000_000
#: Grid ratio of the thinned path (values computed by ``values_at_ranks``, ~2400 points for 1e9
#: products): the gap estimator loses O((ratio − 1)²) ≈ 1e-4 of efficiency.
THIN_GRID_RATIO = 1.01
#: A window holds at least this many spacings and spans at least this ratio of ranks (one decade).
MIN_SPACINGS = 10
MIN_RANK_RATIO = 10.0
#: Candidate starts of the window: skip up to a handful of top outliers (capped at 100 ranks).
K_LO_CANDIDATES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 20, 25, 30, 40, 50, 60, 80, 100)
#: Candidate ends of the window per decade of rank (geometric), plus the last value above the floor.
K_HI_PER_DECADE = 20


class FitError(CurvlabError):
    """A spectrum that cannot be fitted (too few positive values, flat, not finite)."""


# ---------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ModelFit:
    """One rank-law model fitted on the window's spacings (see docs/powerlaw.md, "Models").

    ``loglik`` is the spacings log-likelihood up to a constant shared by all models, ``lr`` is twice
    its gain over the pure power law (with ``lr_pvalue`` from χ²₁: every other model nests it or is
    nested in it by one parameter), ``ks_log_rank`` the log-rank KS distance of the fitted curve.
    """

    name: str
    formula: str
    params: dict[str, float]
    num_params: int
    loglik: float
    aic: float
    ks_log_rank: float
    lr: float
    lr_pvalue: float

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "formula": self.formula,
            "params": {k: _num(v) for k, v in self.params.items()},
            "num_params": self.num_params,
            "loglik": _num(self.loglik),
            "aic": _num(self.aic),
            "ks_log_rank": _num(self.ks_log_rank),
            "lr": _num(self.lr),
            "lr_pvalue": _num(self.lr_pvalue),
        }


@dataclass(frozen=True)
class RankLawFit:
    """The fitted rank law ``λ_(i) ≈ c · exp(−s ψ(i)) ≈ c (i − ½)^(-s)`` over ``window``.

    ``exponent`` is the MLE ``ŝ``; ``(ci_low, ci_high)`` its model-based interval at ``confidence``;
    ``(bootstrap_low, bootstrap_high)`` the percentile interval of ``bootstrap`` resamples of the
    window's gaps (None when ``bootstrap = 0``); ``ks`` the Clauset KS distance of the fit and
    ``ks_log_rank`` its KS distance on the log-rank scale;
    ``exponent_ols`` and ``ols_stderr`` the OLS cross-check; ``n`` the number of values (zeros
    included), ``n_fit`` those above ``floor``; ``method`` is ``"full"`` (every value) or ``"grid"``
    (values at grid ranks only). ``ranks``/``values`` hold the grid points, for plotting.
    """

    exponent: float
    ci_low: float
    ci_high: float
    confidence: float
    bootstrap_low: float | None
    bootstrap_high: float | None
    bootstrap: int
    window: tuple[int, int]
    window_auto: bool
    ks: float
    ks_log_rank: float
    exponent_ols: float
    ols_stderr: float
    c: float
    n: int
    n_fit: int
    num_zeros: int
    floor: float
    method: str
    dof: float
    models: tuple[ModelFit, ...]
    preferred_model: str
    ranks: np.ndarray = field(repr=False, compare=False)
    values: np.ndarray = field(repr=False, compare=False)

    @property
    def k_lo(self) -> int:
        return self.window[0]

    @property
    def k_hi(self) -> int:
        return self.window[1]

    def model(self, name: str) -> ModelFit:
        """The model fit called ``name`` (``power_law``, ``nqm``, ``log_quadratic``, ``log_corrected``)."""
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def line(self, ranks: np.ndarray) -> np.ndarray:
        """The fitted law ``ĉ · exp(−ŝ ψ(i))`` at ``ranks``."""
        return self.c * np.exp(-self.exponent * special.digamma(np.asarray(ranks, dtype=np.float64)))

    def curve(self, name: str, ranks: np.ndarray) -> np.ndarray:
        """The fitted curve of model ``name`` at ``ranks`` (same normalisation as :meth:`line`)."""
        m = self.model(name)
        psi = special.digamma(np.asarray(ranks, dtype=np.float64))
        spec = _MODELS[name]
        shape = spec.curve(psi, m.params, self._psi_window())
        return np.exp(m.params["log_c"] + shape)

    def _psi_window(self) -> tuple[float, float]:
        return float(special.digamma(self.k_lo)), float(special.digamma(self.k_hi))

    def to_json(self) -> dict[str, Any]:
        """The summary printed by ``curvlab fit --json`` (plain floats, NaN as null)."""
        return {
            "exponent": _num(self.exponent),
            "ci_low": _num(self.ci_low),
            "ci_high": _num(self.ci_high),
            "confidence": self.confidence,
            "bootstrap_low": _num(self.bootstrap_low),
            "bootstrap_high": _num(self.bootstrap_high),
            "bootstrap": self.bootstrap,
            "window": [int(self.window[0]), int(self.window[1])],
            "window_auto": self.window_auto,
            "window_decades": math.log10(self.window[1] / self.window[0]),
            "spectrum_decades": math.log10(self.n_fit) if self.n_fit > 0 else None,
            "ks": _num(self.ks),
            "ks_log_rank": _num(self.ks_log_rank),
            "exponent_ols": _num(self.exponent_ols),
            "ols_stderr": _num(self.ols_stderr),
            "c": _num(self.c),
            "n": self.n,
            "n_fit": self.n_fit,
            "num_zeros": self.num_zeros,
            "floor": _num(self.floor),
            "method": self.method,
            "dof": _num(self.dof),
            "nqm_in_ci": bool(self.ci_low <= 1.0 <= self.ci_high),
            "preferred_model": self.preferred_model,
            "models": [m.to_json() for m in self.models],
        }


def _num(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


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


# ------------------------------------------------------------------------------------ KS distance


def ks_distance(L: np.ndarray, curve: np.ndarray) -> tuple[float, float]:
    """Log-rank KS distance between points ``L = log λ`` and a fitted curve's shape, and the intercept.

    ``curve`` is the model's ``log λ̂`` at the same ranks up to an additive constant ``log c``. With the
    minimax intercept ``log ĉ`` (the one that minimises the distance), the distance is

        D = max_i |log λ_(i) − log ĉ − curve_i| / |curve_first − curve_last|,

    the largest vertical miss on the log-log plot as a fraction of the curve's drop over the window.
    For the pure law (curve = −ŝψ(i)) a vertical miss ``e`` is a horizontal miss of ``e/ŝ`` in log rank,
    so ``D`` is the Kolmogorov–Smirnov distance between the rank distributions of the data and of the
    fitted law under the measure uniform in log rank (each decade of rank weighs the same, as on the
    plot and in the NQM's ``h_i = 1/i``); see docs/powerlaw.md. Returns ``(D, log ĉ)``.
    """
    e = L - curve
    hi, lo = float(np.max(e)), float(np.min(e))
    drop = abs(float(curve[0] - curve[-1]))
    d = (hi - lo) / 2.0 / drop if drop > 0 else math.inf
    return d, (hi + lo) / 2.0


def _ks_pure(gaps: _Gaps, a: int, bs: np.ndarray, s: np.ndarray) -> np.ndarray:
    """KS distances of the pure law for windows ``[r[a], r[b]]`` for all ``b`` in ``bs`` at once."""
    stop = int(bs.max()) + 1
    L = gaps.L[a:stop]
    psi = gaps.psi[a:stop]
    e = L[None, :] + s[:, None] * psi[None, :]
    inside = np.arange(a, stop)[None, :] <= bs[:, None]
    hi = np.where(inside, e, -np.inf).max(axis=1)
    lo = np.where(inside, e, np.inf).min(axis=1)
    drop = s * (gaps.psi[bs] - gaps.psi[a])
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(drop > 0, (hi - lo) / 2.0 / drop, np.inf)
    return d


# ------------------------------------------------------------------------------------------ window


def parse_window(text: str) -> tuple[int | None, int | None]:
    """``"K_LO:K_HI"``, ``"K_LO:"`` or ``":K_HI"`` → ``(k_lo, k_hi)`` (None: chosen by the fit)."""
    parts = text.split(":")
    if len(parts) != 2:
        raise OptionError(f"--window {text!r}: expected K_LO:K_HI (either side may be empty)")
    out: list[int | None] = []
    for part in parts:
        part = part.strip()
        if not part:
            out.append(None)
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise OptionError(f"--window {text!r}: {part!r} is not an integer rank") from None
    return out[0], out[1]


def _check_window(k_lo: int | None, k_hi: int | None, n_fit: int) -> None:
    what = f"{n_fit} eigenvalues above the numerical floor"
    if k_lo is not None and not 1 <= k_lo < n_fit:
        raise OptionError(f"window start {k_lo} is out of range: ranks run 1..{n_fit} ({what})")
    if k_hi is not None and not 1 < k_hi <= n_fit:
        raise OptionError(f"window end {k_hi} is out of range: ranks run 1..{n_fit} ({what})")
    if k_lo is not None and k_hi is not None and k_hi - k_lo < 2:
        raise OptionError(f"window {k_lo}:{k_hi} is empty: it needs K_HI >= K_LO + 2")


def _ks_values(gaps: _Gaps, a: int, bs: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Clauset–Shalizi–Newman KS distance of the pure law on windows ``[r[a], r[b]]``, all ``b`` at once.

    With ``x_min = λ_(k_hi)`` the fitted law says ``P(λ ≥ x | λ ≥ x_min) = (x/x_min)^(-1/ŝ)``; the data
    say ``i/k_hi`` at ``x = λ_(i)``. The distance is the largest difference over the window's ranks
    ``k_lo ≤ i ≤ k_hi`` (with ``k_lo = 1`` exactly Clauset et al.'s statistic). It is taken at the grid
    ranks: exact on a complete grid; on the 0.1% grid the empirical side moves by at most
    ``g_j/k_hi ≤ 0.001`` between grid points.
    """
    stop = int(bs.max()) + 1
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        alpha = 1.0 / s
        model = np.exp(-alpha[:, None] * (gaps.L[None, a:stop] - gaps.L[bs][:, None]))
        data = gaps.r[None, a:stop] / gaps.r[bs][:, None]
        inside = np.arange(a, stop)[None, :] <= bs[:, None]
        d = np.where(inside, np.abs(model - data), 0.0).max(axis=1)
    return np.where(np.isfinite(d) & (s > 0), d, np.inf)


def _candidates(gaps: _Gaps, k_lo: int | None, k_hi: int | None) -> tuple[list[int], np.ndarray]:
    """Grid indices of the candidate window starts and ends (or of the user's fixed ends)."""
    r = gaps.r
    n_fit = int(r[-1])
    if k_lo is not None:
        los = [gaps.index(k_lo)]
    else:
        cap = min(K_LO_CANDIDATES[-1], max(10, n_fit // 1000))
        wanted = [k for k in K_LO_CANDIDATES if k <= cap]
        los = [int(j) for j in np.searchsorted(r, wanted) if j < len(r) and r[j] in wanted]
    if k_hi is not None:
        his = np.array([gaps.index(k_hi)])
    else:  # the candidates are grid points (see window_candidates); other grids snap upwards
        his = np.unique(np.searchsorted(r, window_candidates(n_fit)))
    return los, his


def window_candidates(n_fit: int) -> np.ndarray:
    """Candidate window ends: ``round(10^(j/20))`` = 10, 11, 13, …, 100, 112, … below ``n_fit``, and
    ``n_fit``. They are added to every grid, so full and thinned fits compare the same windows."""
    steps = np.arange(K_HI_PER_DECADE, K_HI_PER_DECADE * math.log10(max(n_fit, 10)))
    targets = np.round(10 ** (steps / K_HI_PER_DECADE)).astype(np.int64)
    return np.unique(np.concatenate([targets[targets < n_fit], [n_fit]]))


def _choose_window(gaps: _Gaps, k_lo: int | None, k_hi: int | None) -> tuple[int, int]:
    """Grid indices ``(a, b)`` of the window ``[k_lo, k_hi] = [r[a], r[b]]`` (docs/powerlaw.md, "Window").

    Candidates: ``k_lo`` in :data:`K_LO_CANDIDATES` up to ``max(10, n/1000)`` (at most 100), ``k_hi``
    on a geometric grid of :data:`K_HI_PER_DECADE` per decade plus the last rank above the floor; a
    window holds at least :data:`MIN_SPACINGS` spacings and spans a rank ratio of
    :data:`MIN_RANK_RATIO` (unless the user fixes both ends). Two KS distances, each where it sees:

    1. for each ``k_lo``, ``k_hi`` minimises the Clauset KS distance (:func:`_ks_values`), which weighs
       values by count and so sees the floor; ties go to the wider window;
    2. ``k_lo`` minimises the log-rank KS distance (:func:`ks_distance`) of its window, which weighs
       each decade of rank alike and so sees a handful of top outliers that the first cannot.
    """
    los, his = _candidates(gaps, k_lo, k_hi)
    r = gaps.r
    fixed = k_lo is not None and k_hi is not None
    best: tuple[float, int, int] | None = None
    for a in los:
        span = r[his] - r[a]
        ok = span >= 2 if fixed else (span >= MIN_SPACINGS) & (r[his] >= MIN_RANK_RATIO * r[a])
        bs = his[ok & (his > a)]
        if bs.size == 0:
            continue
        s = gaps.exponent(a, bs)
        d_values = _ks_values(gaps, a, bs, s)
        i = int(np.lexsort((-(r[bs] - r[a]), d_values))[0])
        if not math.isfinite(d_values[i]):
            continue
        b = int(bs[i])
        d_log = float(_ks_pure(gaps, a, bs[i : i + 1], s[i : i + 1])[0])
        if best is None or (d_log, -(r[b] - r[a])) < (best[0], -(r[best[2]] - r[best[1]])):
            best = (d_log, a, b)
    if best is None:
        raise FitError(
            f"no window of at least {MIN_SPACINGS} spacings spanning a factor {MIN_RANK_RATIO:g} in rank "
            f"fits among the {int(r[-1])} eigenvalues above the numerical floor (is the spectrum flat?)"
        )
    return best[1], best[2]


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


# ---------------------------------------------------------------------------------- other models


@dataclass(frozen=True)
class _ModelSpec:
    """A rank-law model ``log λ̂(i) = log c + curve(ψ(i))`` whose curve is linear in its parameters.

    ``basis(psi, window)`` gives the curve's basis functions (columns); the parameters multiply them;
    ``slope`` their derivatives in ``ψ``. ``fixed`` gives parameter values that are not fitted (the
    NQM's ``s = 1``).
    """

    name: str
    formula: str
    params: tuple[str, ...]
    basis: Callable[[np.ndarray, tuple[float, float]], np.ndarray]
    slope: Callable[[np.ndarray, tuple[float, float]], np.ndarray]
    fixed: dict[str, float] = field(default_factory=dict)

    def curve(self, psi: np.ndarray, params: dict[str, float], window: tuple[float, float]) -> np.ndarray:
        theta = np.array([params[p] for p in self.params])
        return self.basis(np.asarray(psi, dtype=np.float64), window) @ theta


def _centre(psi: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    return psi - (window[0] + window[1]) / 2.0


_LOG_SHIFT = 1.0 + np.euler_gamma  # 1 + H_{i-1} = ψ(i) + 1 + γ ≥ 1, ≈ ln i + 1.58 (finite at i = 1)

def _minus_one(p: np.ndarray, w: tuple[float, float]) -> np.ndarray:
    return -np.ones((len(p), 1))


_MODELS: dict[str, _ModelSpec] = {
    "power_law": _ModelSpec(
        "power_law", "c * exp(-s * psi(i))", ("s",), lambda p, w: -p[:, None], _minus_one
    ),
    "nqm": _ModelSpec(
        "nqm", "c / i (s = 1)", ("s",), lambda p, w: -p[:, None], _minus_one, fixed={"s": 1.0}
    ),
    "log_quadratic": _ModelSpec(
        "log_quadratic",
        "c * exp(-s * u + b * u**2), u = psi(i) - psi_mid",
        ("s", "b"),
        lambda p, w: np.stack([-_centre(p, w), _centre(p, w) ** 2], axis=1),
        lambda p, w: np.stack([-np.ones(len(p)), 2.0 * _centre(p, w)], axis=1),
    ),
    "log_corrected": _ModelSpec(
        "log_corrected",
        "c * (1 + H(i-1))**beta * exp(-s * psi(i)) ~ c (ln i)^beta / i^s",
        ("s", "beta"),
        lambda p, w: np.stack([-p, np.log(p + _LOG_SHIFT)], axis=1),
        lambda p, w: np.stack([-np.ones(len(p)), 1.0 / (p + _LOG_SHIFT)], axis=1),
    ),
}


def _local_exponents(spec: _ModelSpec, theta: np.ndarray, window: tuple[float, float]) -> dict[str, float]:
    """The local exponent ``−d log λ̂ / d ψ(i)`` at both ends of the window (equal for the pure laws)."""
    d = spec.slope(np.array(window), window) @ theta
    return {"s_at_k_lo": float(-d[0]), "s_at_k_hi": float(-d[1])}


def _gap_design(gaps: _Gaps, a: int, b: int, spec: _ModelSpec, window: tuple[float, float]) -> np.ndarray:
    """``E y_j = Σ_p θ_p X_jp``: each gap's expected normalised drop, ``ρ_j (curve_j − curve_{j+1})``."""
    basis = spec.basis(gaps.psi[a : b + 1], window)
    drop = -(basis[1:] - basis[:-1])  # the model's E[log λ_(r_j) − log λ_(r_{j+1})] per unit parameter
    return gaps.rho[a:b, None] * drop


def _neg_loglik(mu: np.ndarray, y: np.ndarray, kappa: np.ndarray) -> float:
    """Spacings NLL: gap ``j`` is Gamma(shape ``κ_j = g_j``, mean ``μ_j``), model-free terms dropped."""
    return float(kappa @ (np.log(mu) + y / mu))


def _fit_linear_mean(X: np.ndarray, y: np.ndarray, kappa: np.ndarray, theta0: np.ndarray) -> np.ndarray:
    """Maximum likelihood of ``μ = X θ`` by Fisher scoring with step halving (keeps every ``μ > 0``)."""
    theta = theta0.astype(np.float64)
    nll = _neg_loglik(X @ theta, y, kappa)
    for _ in range(200):
        mu = X @ theta
        grad = X.T @ (kappa * (1.0 / mu - y / mu**2))
        info = (X * (kappa / mu**2)[:, None]).T @ X
        try:
            step = np.linalg.solve(info, grad)
        except np.linalg.LinAlgError:
            break
        t = 1.0
        while t > 1e-10:
            cand = theta - t * step
            mu_c = X @ cand
            if np.all(mu_c > 0):
                nll_c = _neg_loglik(mu_c, y, kappa)
                if nll_c <= nll:
                    break
            t /= 2.0
        else:
            break
        converged = abs(nll - nll_c) <= 1e-12 * max(1.0, abs(nll))
        theta, nll = cand, nll_c
        if converged:
            break
    return theta


def _fit_models(gaps: _Gaps, a: int, b: int, s_hat: float) -> tuple[tuple[ModelFit, ...], str]:
    """Fit every model of :data:`_MODELS` on the window's gaps; the preferred one has the least AIC."""
    window = (float(gaps.psi[a]), float(gaps.psi[b]))
    y, kappa = gaps.y[a:b], gaps.g[a:b]
    L, psi = gaps.L[a : b + 1], gaps.psi[a : b + 1]
    results = []
    base_nll = None
    for spec in _MODELS.values():
        X = _gap_design(gaps, a, b, spec, window)
        free = [p for p in spec.params if p not in spec.fixed]
        if free == list(spec.params):
            theta0 = np.zeros(len(spec.params))
            theta0[0] = s_hat
            theta = _fit_linear_mean(X, y, kappa, theta0) if len(spec.params) > 1 else np.array([s_hat])
        else:
            theta = np.array([spec.fixed[p] for p in spec.params])
        nll = _neg_loglik(X @ theta, y, kappa) if np.all(X @ theta > 0) else math.inf
        if spec.name == "power_law":
            base_nll = nll
        params = dict(zip(spec.params, theta.tolist(), strict=True))
        ks, params["log_c"] = ks_distance(L, spec.basis(psi, window) @ theta)
        params.update(_local_exponents(spec, theta, window))
        results.append((spec, params, len(free), nll, ks))
    out = []
    for spec, params, k, nll, ks in results:
        lr = 2.0 * (base_nll - nll)  # > 0: the model fits better than the pure law
        df = abs(k - 1)
        pvalue = float(stats.chi2.sf(abs(lr), df)) if df else 1.0
        out.append(ModelFit(spec.name, spec.formula, params, k, -nll, 2.0 * k + 2.0 * nll, ks, lr, pvalue))
    preferred = min(out, key=lambda m: m.aic).name
    return tuple(out), preferred


# ------------------------------------------------------------------------------------------ public


def default_floor(top: float, n: int, dtype: np.dtype | type = np.float64) -> float:
    """The numerical floor ``λ_(1) · n · eps``: eigenvalues at or below it are rank-deficiency noise.

    A backward-stable eigensolver on an ``n × n`` matrix errs by up to ~``n · eps · ‖X‖`` per eigenvalue,
    so values below this bound carry no information about the spectrum's shape.
    """
    return float(top) * float(n) * float(np.finfo(dtype).eps)


def fit_rank_law(
    values: np.ndarray,
    *,
    ranks: np.ndarray | None = None,
    k_lo: int | None = None,
    k_hi: int | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    floor: float | None = None,
    total: int | None = None,
) -> RankLawFit:
    """Fit ``λ_(i) ≈ c · i^(-s)`` to a spectrum (seed E.4; docs/powerlaw.md has the derivation).

    ``values``: the eigenvalues (any order; never modified), or, with ``ranks``, the values at those
    1-based ranks of the descending spectrum (ranks increasing, values non-increasing: the thinned
    path for spectra too large to sort). ``k_lo``/``k_hi`` fix the window's ends (ranks), otherwise
    they are chosen by the log-rank KS distance. ``floor``: values at or below it are excluded
    (default :func:`default_floor` with ``n`` = ``total`` or the number of values). ``total``: the
    spectrum's size, for the report, with ``ranks``. ``bootstrap``: resamples (0: none).
    """
    if not 0.0 < confidence < 1.0:
        raise OptionError(f"confidence must lie in (0, 1), got {confidence}")
    if bootstrap < 0:
        raise OptionError(f"bootstrap must be >= 0, got {bootstrap}")
    vals = np.asarray(values)
    if vals.ndim != 1:
        raise FitError(f"expected a 1-D array of eigenvalues, got shape {vals.shape}")
    if not np.all(np.isfinite(vals)):
        raise FitError("the spectrum holds non-finite values (NaN or inf)")
    dtype = vals.dtype if np.issubdtype(vals.dtype, np.floating) else np.dtype(np.float64)
    vals = vals.astype(np.float64, copy=False)
    if ranks is None:
        desc = vals if _is_descending(vals) else np.sort(vals)[::-1]
        n = len(desc) if total is None else int(total)
        grid_ranks = None
    else:
        desc, grid_ranks = _check_ranked(vals, np.asarray(ranks))
        n = int(grid_ranks[-1]) if total is None else int(total)
    if desc.size == 0 or desc[0] <= 0:
        raise FitError("the spectrum is empty or has no positive eigenvalue")
    floor = default_floor(desc[0], n, dtype) if floor is None else float(floor)
    num_zeros = int(np.count_nonzero(vals == 0)) if ranks is None else 0
    keep = int(np.count_nonzero(desc > floor))  # a prefix: desc is non-increasing
    if grid_ranks is None:
        L_all = np.log(desc[:keep])
        n_fit = keep
        if n_fit < MIN_SPACINGS + 1:
            raise _too_few(n_fit, floor)
        _check_window(k_lo, k_hi, n_fit)
        extra = [k for k in (k_lo, k_hi) if k is not None]
        grid = rank_grid(n_fit, extra=np.concatenate([window_candidates(n_fit), extra]))
        gaps = _Gaps.from_full(L_all, grid)
        method = "full"
    else:
        L_all = None
        r = grid_ranks[:keep]
        n_fit = int(r[-1]) if keep else 0
        if keep < 2 or n_fit < MIN_SPACINGS + 1:
            raise _too_few(n_fit, floor)
        _check_window(k_lo, k_hi, n_fit)
        gaps = _Gaps.from_grid(r, np.log(desc[:keep]))
        method = "full" if np.array_equal(r, np.arange(1, n_fit + 1)) else "grid"
    return _fit_gaps(gaps, L_all, k_lo, k_hi, bootstrap, seed, confidence, n, n_fit, num_zeros, floor, method)


def _fit_gaps(
    gaps: _Gaps,
    L_all: np.ndarray | None,
    k_lo: int | None,
    k_hi: int | None,
    bootstrap: int,
    seed: int,
    confidence: float,
    n: int,
    n_fit: int,
    num_zeros: int,
    floor: float,
    method: str,
) -> RankLawFit:
    a, b = _choose_window(gaps, k_lo, k_hi)
    k = float(gaps.r[b] - gaps.r[a])
    s_hat = float(gaps.exponent(a, b))
    if not s_hat > 0:
        raise FitError(f"the spectrum is flat over ranks {gaps.r[a]}..{gaps.r[b]}: no exponent to fit")
    ks = float(_ks_values(gaps, a, np.array([b]), np.array([s_hat]))[0])
    var = float(gaps.cv[b] - gaps.cv[a])
    lo, hi, dof = _model_interval(s_hat, k, var, confidence)
    boot_lo = boot_hi = None
    if bootstrap:
        boot_lo, boot_hi = _bootstrap(gaps.y[a:b], gaps.g[a:b], bootstrap, seed, confidence)
    s_ols, se_ols = _ols_points(gaps, a, b, L_all)
    models, preferred = _fit_models(gaps, a, b, s_hat)
    power = next(m for m in models if m.name == "power_law")
    return RankLawFit(
        exponent=s_hat,
        ci_low=float(lo),
        ci_high=float(hi),
        confidence=confidence,
        bootstrap_low=boot_lo,
        bootstrap_high=boot_hi,
        bootstrap=int(bootstrap),
        window=(int(gaps.r[a]), int(gaps.r[b])),
        window_auto=k_lo is None or k_hi is None,
        ks=ks,
        ks_log_rank=power.ks_log_rank,
        exponent_ols=s_ols,
        ols_stderr=se_ols,
        c=math.exp(power.params["log_c"]),
        n=int(n),
        n_fit=int(n_fit),
        num_zeros=num_zeros,
        floor=float(floor),
        method=method,
        dof=float(dof),
        models=models,
        preferred_model=preferred,
        ranks=gaps.r.copy(),
        values=np.exp(gaps.L),
    )


def _is_descending(x: np.ndarray) -> bool:
    return bool(np.all(x[:-1] >= x[1:]))


def _check_ranked(vals: np.ndarray, ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if ranks.shape != vals.shape:
        raise FitError(f"ranks {ranks.shape} and values {vals.shape} differ in shape")
    if ranks.size and (not np.issubdtype(ranks.dtype, np.integer) and not np.all(ranks == np.round(ranks))):
        raise FitError("ranks must be integers")
    ranks = ranks.astype(np.int64)
    if ranks.size and (ranks[0] < 1 or np.any(np.diff(ranks) <= 0)):
        raise FitError("ranks must be increasing positive integers (1 = the largest value)")
    if not _is_descending(vals):
        raise FitError("values given at ranks must be non-increasing")
    return vals, ranks


def _too_few(n_fit: int, floor: float) -> FitError:
    return FitError(
        f"only {n_fit} eigenvalues lie above the numerical floor {floor:.3g}; a rank-law fit needs at "
        f"least {MIN_SPACINGS + 1}"
    )


def fit_spectrum(
    spectrum: KroneckerSpectrum,
    *,
    k_lo: int | None = None,
    k_hi: int | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    floor: float | None = None,
    max_count: int = FULL_DATA_LIMIT,
    grid_ratio: float = THIN_GRID_RATIO,
) -> RankLawFit:
    """Fit the rank law to a Kronecker spectrum (all products ``λ_S[i] λ_A[j]``, never materialised).

    Up to ``max_count`` products the fit uses every value (:meth:`KroneckerSpectrum.sorted_values`);
    beyond, the exact values at :func:`rank_grid` ranks with ``grid_ratio`` (plus the candidate window
    ends; :meth:`KroneckerSpectrum.values_at_ranks`) and the grid estimator. ``floor``: products at or
    below it are left out; pass
    :func:`kronecker_floor` of the layers' eigenvalues (the CLI does), else ``λ_max · eps · 2√count``
    is used (``2√count = d_S + d_A`` for one square layer).
    """
    count = int(spectrum.count)
    if count == 0 or spectrum.count_above(0.0) == 0:
        raise FitError("the spectrum is empty or has no positive eigenvalue")
    top = float(spectrum.max())
    if floor is None:
        floor = _spectrum_floor(spectrum, top)
    if count <= max_count:
        return fit_rank_law(
            spectrum.sorted_values(max_count=max_count),
            k_lo=k_lo,
            k_hi=k_hi,
            bootstrap=bootstrap,
            seed=seed,
            confidence=confidence,
            floor=floor,
        )
    n_fit = int(spectrum.count_above(floor))
    if n_fit < MIN_SPACINGS + 1:
        raise _too_few(n_fit, floor)
    _check_window(k_lo, k_hi, n_fit)
    extra = np.concatenate([window_candidates(n_fit), [k for k in (k_lo, k_hi) if k is not None]])
    grid = rank_grid(n_fit, ratio=grid_ratio, extra=extra)
    values = np.asarray(spectrum.values_at_ranks(grid), dtype=np.float64)
    fit = fit_rank_law(
        values,
        ranks=grid,
        k_lo=k_lo,
        k_hi=k_hi,
        bootstrap=bootstrap,
        seed=seed,
        confidence=confidence,
        floor=floor,
        total=count,
    )
    return dataclasses.replace(fit, num_zeros=int(spectrum.num_zeros))


def _spectrum_floor(spectrum: KroneckerSpectrum, top: float) -> float:
    return top * 2.0 * math.sqrt(float(spectrum.count)) * float(np.finfo(np.float64).eps)


def kronecker_floor(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
    """Numerical floor of a Kronecker spectrum: ``λ_max · eps · max_layers (d_S + d_A)``.

    Each computed factor eigenvalue errs by up to ``d · eps · λ_max(factor)`` (backward-stable eigh),
    so a product ``λ_S λ_A`` errs by up to ``λ_max,S λ_max,A · eps · (d_S + d_A)``; products below the
    largest such bound carry no information on the spectrum's shape.
    """
    top = max((float(np.max(s)) * float(np.max(a)) for s, a in pairs if len(s) and len(a)), default=0.0)
    d = max((len(s) + len(a) for s, a in pairs), default=0)
    return top * d * float(np.finfo(np.float64).eps)
