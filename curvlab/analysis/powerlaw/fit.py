"""The public fits: :func:`fit_rank_law` on eigenvalues, :func:`fit_spectrum` on a Kronecker spectrum.

Each checks its input and leaves out the values at or below the numerical floor, where eigenvalues
are rank-deficiency noise: ``λ_(1) · n · eps`` (:func:`default_floor`) for ``n`` eigenvalues of an
``n × n`` matrix, ``λ_max · eps · max_layers (d_S + d_A)`` (:func:`kronecker_floor`) for the products
``λ_S λ_A`` of a Kronecker spectrum. It then builds the gap table (:mod:`.estimator`) on every value,
or on the values at given ranks (``fit_rank_law(ranks=...)``; :func:`fit_spectrum` beyond
:data:`FULL_DATA_LIMIT` products, at :func:`~curvlab.analysis.powerlaw.estimator.rank_grid` ranks
with :data:`THIN_GRID_RATIO`), chooses the window (:mod:`.window`), estimates the exponent with its
intervals and cross-checks (:mod:`.estimator`), compares the models (:mod:`.compare`) and returns a
:class:`~curvlab.analysis.powerlaw.result.RankLawFit`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from curvlab.analysis.powerlaw.compare import _fit_models
from curvlab.analysis.powerlaw.estimator import _bootstrap, _Gaps, _model_interval, _ols_points, rank_grid
from curvlab.analysis.powerlaw.result import FitError, RankLawFit
from curvlab.analysis.powerlaw.window import (
    MIN_SPACINGS,
    _check_window,
    _choose_window,
    _ks_values,
    window_candidates,
)
from curvlab.errors import OptionError

if TYPE_CHECKING:
    from curvlab.analysis.spectrum import KroneckerSpectrum

#: A power law describes the window's spectrum when its local exponent changes by at most this fraction
#: of the exponent across the window (log-quadratic model; docs/powerlaw.md, "Calibrated interval").
CURVATURE_TOLERANCE = 0.2
#: Spectra with at most this many products are fitted on all their values, larger ones on the grid.
FULL_DATA_LIMIT = 20_000_000
#: Grid ratio of the thinned path (values computed by ``values_at_ranks``, ~2400 points for 1e9
#: products): the gap estimator loses O((ratio − 1)²) ≈ 1e-4 of efficiency.
THIN_GRID_RATIO = 1.01


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
    curved = next(m for m in models if m.name == "log_quadratic")
    local = (float(curved.params["s_at_k_lo"]), float(curved.params["s_at_k_hi"]))
    if not all(math.isfinite(v) for v in local):
        local = (s_hat, s_hat)
    supported = abs(local[1] - local[0]) <= CURVATURE_TOLERANCE * s_hat
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
        calibrated_low=float(min(lo, *local)),
        calibrated_high=float(max(hi, *local)),
        local_exponents=local,
        power_law_supported=bool(supported),
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
