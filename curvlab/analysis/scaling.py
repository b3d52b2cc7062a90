"""Steps to a target against the batch size: McCandlish et al. 2018's ``S(B) = S_min (1 + B_crit / B)``.

The paper's main experiment (Zhang et al. 2019, Fig. 1; seed E.5 and Fig. 13 for the NQM) measures,
per optimizer, the number of steps ``S(B)`` a network needs to reach a target at batch size ``B``, each
batch size tuned separately. McCandlish et al. (2018, eq. 2.11) model the trade-off between steps and
examples as ``(S / S_min − 1)(E / E_min − 1) = 1`` with ``E = B S``, i.e.

    S(B) = S_min (1 + B_crit / B),      B_crit = E_min / S_min:

perfect scaling (``S ∝ 1/B``, slope −1 in log-log) for ``B ≪ B_crit``, a floor ``S_min`` for
``B ≫ B_crit``, and twice the floor at ``B = B_crit``.

**Fit.** Steps are counts whose noise is multiplicative (a seed changes them by a factor), so the fit
is least squares in log space over every measured (batch size, seed) pair,

    min over (S_min, B_crit) of  Σ_{B, k} [log s_{B,k} − log S_min − log(1 + B_crit / B)]²,

which weights every batch size by its number of seeds and equals a fit to the geometric mean of the
seeds at each batch size when the seed counts are equal. For a fixed ``B_crit`` the best ``log S_min``
is the mean of ``log s − log(1 + B_crit/B)``, so the fit is a one-dimensional search over
``log B_crit``: a grid over ``[B_min / 100, B_max · 100]`` refined by Brent's method. An estimate at
either end of that range means the data do not identify ``B_crit`` (no floor seen: the curve is still
perfect scaling at ``B_max``; or no perfect scaling seen: flat from ``B_min``); :attr:`ScalingFit.identified`
says so and the intervals are then open on that side (``None``).

**Intervals** (:func:`fit_scaling`): a percentile bootstrap over seeds — each replicate resamples, at
every batch size independently, its seeds with replacement and refits. Resampling ``K`` seeds
shrinks their spread by ``sqrt((K − 1)/K)`` (a 90 % interval from 3 seeds covered the truth 77 % of
the time), so the seeds are first spread back by ``sqrt(K/(K − 1))`` about their log-mean (the
"expanded" bootstrap). Their coverage at a given
number of seeds is measured by simulation (:func:`interval_coverage`, docs/sweep.md gives the numbers);
with one seed per batch size there is nothing to resample and no interval is given.

``curvlab sweep`` fits its measured curves with this module, and ``curvlab predict`` fits its predicted
ones with the same function, so measured and predicted ``B_crit`` are the same estimator.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from curvlab.errors import CurvlabError

__all__ = ["ScalingFit", "ScalingFitError", "fit_curve", "fit_scaling", "interval_coverage", "steps_model"]

#: How far beyond the measured batch sizes ``B_crit`` is searched (a factor on each side).
SEARCH_MARGIN = 100.0


class ScalingFitError(CurvlabError):
    """Too few usable points to fit ``S(B)`` (fewer than two batch sizes with finite, positive steps)."""


def steps_model(batch_sizes: Sequence[float] | np.ndarray, s_min: float, b_crit: float) -> np.ndarray:
    """``S(B) = S_min (1 + B_crit / B)`` at each batch size."""
    b = np.asarray(batch_sizes, dtype=float)
    return s_min * (1.0 + b_crit / b)


@dataclass(frozen=True)
class ScalingFit:
    """A fitted ``S(B) = S_min (1 + B_crit / B)`` with its percentile-bootstrap intervals.

    ``identified`` is False when ``B_crit`` sits at an end of its search range (see the module doc);
    an interval end at the search range is ``None`` (open). ``rms_log_residual`` is the root mean
    square of the log-space residuals of every fitted point (natural log: 0.1 ≈ 10 % scatter).
    """

    s_min: float
    b_crit: float
    batch_sizes: tuple[int, ...]
    num_seeds: tuple[int, ...]
    rms_log_residual: float
    identified: bool
    level: float | None = None
    s_min_interval: tuple[float | None, float | None] | None = None
    b_crit_interval: tuple[float | None, float | None] | None = None
    replicates: int = 0

    def predict(self, batch_sizes: Sequence[float] | np.ndarray) -> np.ndarray:
        return steps_model(batch_sizes, self.s_min, self.b_crit)

    def to_json(self) -> dict[str, Any]:
        def interval(pair):
            return None if pair is None else [_num(pair[0]), _num(pair[1])]

        return {
            "model": "S(B) = S_min (1 + B_crit / B)",
            "s_min": _num(self.s_min),
            "b_crit": _num(self.b_crit),
            "identified": self.identified,
            "level": self.level,
            "s_min_interval": interval(self.s_min_interval),
            "b_crit_interval": interval(self.b_crit_interval),
            "bootstrap_replicates": self.replicates,
            "batch_sizes": list(self.batch_sizes),
            "num_seeds": list(self.num_seeds),
            "rms_log_residual": _num(self.rms_log_residual),
        }


def _num(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _points(batch_sizes: Sequence[float], steps: Sequence[Any]) -> list[tuple[float, np.ndarray]]:
    """Per batch size, its finite positive step counts (a scalar counts as one seed)."""
    if len(batch_sizes) != len(steps):
        raise ScalingFitError(f"{len(batch_sizes)} batch sizes but {len(steps)} step lists")
    points = []
    for b, values in zip(batch_sizes, steps, strict=True):
        arr = np.atleast_1d(np.asarray(values if values is not None else [], dtype=float))
        arr = arr[np.isfinite(arr) & (arr > 0)]
        if not (math.isfinite(float(b)) and b > 0):
            raise ScalingFitError(f"batch size {b!r} is not a positive number")
        if arr.size:
            points.append((float(b), arr))
    if len({b for b, _ in points}) < 2:
        raise ScalingFitError("S(B) needs finite, positive steps at two batch sizes at least")
    return points


def _profile(log_b: np.ndarray, log_s: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(sum of squares, log S_min)`` at each ``log B_crit = v``, ``log S_min`` profiled out."""
    shape = np.logaddexp(0.0, v[:, None] - log_b[None, :])  # log(1 + B_crit / B)
    u = np.mean(log_s[None, :] - shape, axis=1)
    return np.sum((log_s[None, :] - u[:, None] - shape) ** 2, axis=1), u


def _search(log_b: np.ndarray, log_s: np.ndarray, low: float, high: float) -> tuple[float, float, float]:
    """``(log B_crit, log S_min, sum of squares)`` minimising the profile on ``[low, high]``: a grid of
    241 points, then two finer grids of 201 points around the best (resolution ~1e-6 in log B_crit)."""
    grid = np.linspace(low, high, 241)
    for _ in range(3):
        sse, u = _profile(log_b, log_s, grid)
        k = int(np.argmin(sse))
        best = (float(grid[k]), float(u[k]), float(sse[k]))
        a, c = grid[max(k - 1, 0)], grid[min(k + 1, grid.size - 1)]
        grid = np.linspace(a, c, 201)
    return best


def fit_curve(batch_sizes: Sequence[float], steps: Sequence[Any]) -> tuple[float, float, bool, float]:
    """Least-squares fit in log space (module doc): ``(S_min, B_crit, identified, rms_log_residual)``.

    ``steps[i]`` is the steps at ``batch_sizes[i]``: a number or a sequence over seeds; values that
    are not finite and positive (target not reached) are left out.
    """
    points = _points(batch_sizes, steps)
    log_b = np.concatenate([np.full(s.size, math.log(b)) for b, s in points])
    log_s = np.concatenate([np.log(s) for _, s in points])
    low = math.log(min(b for b, _ in points) / SEARCH_MARGIN)
    high = math.log(max(b for b, _ in points) * SEARCH_MARGIN)
    v, u, sse = _search(log_b, log_s, low, high)
    step = (high - low) / 240
    identified = low + step < v < high - step
    return math.exp(u), math.exp(v), bool(identified), math.sqrt(sse / log_s.size)


def fit_scaling(
    batch_sizes: Sequence[float],
    steps: Sequence[Any],
    *,
    level: float = 0.9,
    replicates: int = 1000,
    seed: int = 0,
) -> ScalingFit:
    """Fit ``S(B)`` (:func:`fit_curve`) with percentile-bootstrap intervals over seeds at ``level``.

    Each of ``replicates`` bootstrap replicates resamples, at every batch size independently, its
    seeds (expanded, module doc) with replacement and refits; the interval is the ``(1 ± level)/2``
    quantiles of the refits.
    With no batch size holding two seeds there is no interval (``None``).
    """
    if not 0 < level < 1:
        raise ScalingFitError(f"level must be in (0, 1), got {level!r}")
    points = _points(batch_sizes, steps)
    sizes = [b for b, _ in points]
    s_min, b_crit, identified, rms = fit_curve(sizes, [s for _, s in points])
    base = dict(s_min=s_min, b_crit=b_crit, batch_sizes=tuple(int(round(b)) for b in sizes),
                num_seeds=tuple(int(s.size) for _, s in points), rms_log_residual=rms, identified=identified)
    if replicates < 1 or max(s.size for _, s in points) < 2:
        return ScalingFit(**base)
    rng = np.random.default_rng(seed)
    draws = np.empty((replicates, 2))
    edge = np.zeros(replicates, dtype=bool)
    expanded = [_expand(s) for _, s in points]
    for r in range(replicates):
        sample = [s[rng.integers(0, s.size, s.size)] for s in expanded]
        draws[r, 0], draws[r, 1], ok, _ = fit_curve(sizes, sample)
        edge[r] = not ok
    tail = (1 - level) / 2
    s_lo, s_hi = np.quantile(draws[:, 0], [tail, 1 - tail])
    b_lo, b_hi = np.quantile(draws[:, 1], [tail, 1 - tail])
    # an interval end beyond the search range is open: the data do not bound B_crit on that side
    low_edge = min(sizes) / SEARCH_MARGIN * 1.1
    high_edge = max(sizes) * SEARCH_MARGIN / 1.1
    b_interval = (None if b_lo <= low_edge else float(b_lo), None if b_hi >= high_edge else float(b_hi))
    return ScalingFit(**base, level=level, s_min_interval=(float(s_lo), float(s_hi)),
                      b_crit_interval=b_interval, replicates=replicates)


def _expand(steps: np.ndarray) -> np.ndarray:
    """The seeds of one batch size spread by ``sqrt(K / (K − 1))`` about their mean in log space: resampling
    ``K`` values has a variance ``(K − 1)/K`` of theirs, which this undoes (the expanded bootstrap)."""
    k = steps.size
    if k < 2:
        return steps
    logs = np.log(steps)
    return np.exp(logs.mean() + math.sqrt(k / (k - 1)) * (logs - logs.mean()))


def interval_coverage(
    s_min: float,
    b_crit: float,
    batch_sizes: Sequence[int],
    *,
    seeds: int,
    sigma: float,
    level: float = 0.9,
    repeats: int = 200,
    replicates: int = 200,
    seed: int = 0,
) -> Mapping[str, float]:
    """The measured coverage of :func:`fit_scaling`'s intervals on synthetic curves with known truth.

    Each repeat draws ``s_{B,k} = S(B) · exp(σ z)`` (``z`` standard normal, ``seeds`` per batch size),
    fits with ``replicates`` bootstrap replicates and records whether each interval holds the truth
    (an open end counts as covering on its side). Returns the fractions and their binomial standard
    errors.
    """
    rng = np.random.default_rng(seed)
    truth = steps_model(batch_sizes, s_min, b_crit)
    hits = np.zeros(2)
    for r in range(repeats):
        sample = [t * np.exp(sigma * rng.standard_normal(seeds)) for t in truth]
        fit = fit_scaling(batch_sizes, sample, level=level, replicates=replicates, seed=seed + 1 + r)
        for j, (value, interval) in enumerate(((s_min, fit.s_min_interval), (b_crit, fit.b_crit_interval))):
            if interval is None:
                continue
            lo, hi = interval
            hits[j] += (lo is None or lo <= value) and (hi is None or value <= hi)
    cover = hits / repeats
    se = np.sqrt(cover * (1 - cover) / repeats)
    return {"s_min": float(cover[0]), "s_min_se": float(se[0]), "b_crit": float(cover[1]),
            "b_crit_se": float(se[1]), "level": level, "seeds": seeds, "sigma": sigma, "repeats": repeats}
