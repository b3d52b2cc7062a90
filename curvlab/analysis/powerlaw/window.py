"""The window of ranks the rank law is fitted on, chosen by KS distances; ``--window`` parsing.

Chosen among candidate windows (``k_lo`` among the top 100 ranks, ``k_hi`` on a geometric grid up to
the last value above the numerical floor, at least one decade wide) by minimising KS distances:
``k_hi`` by Clauset, Shalizi & Newman's KS distance between the window's values and the fitted power
law (it sees the floor), ``k_lo`` by a KS distance on the log-rank scale (:func:`ks_distance`, it sees
a handful of top outliers). docs/powerlaw.md, "Window", has the details.
"""

from __future__ import annotations

import math

import numpy as np

from curvlab.analysis.powerlaw.estimator import _Gaps
from curvlab.analysis.powerlaw.result import FitError
from curvlab.errors import OptionError

#: A window holds at least this many spacings and spans at least this ratio of ranks (one decade).
MIN_SPACINGS = 10
MIN_RANK_RATIO = 10.0
#: Candidate starts of the window: skip up to a handful of top outliers (capped at 100 ranks).
K_LO_CANDIDATES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 20, 25, 30, 40, 50, 60, 80, 100)
#: Candidate ends of the window per decade of rank (geometric), plus the last value above the floor.
K_HI_PER_DECADE = 20


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
