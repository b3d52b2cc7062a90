"""What a rank-law fit returns: :class:`RankLawFit`, a :class:`ModelFit` per model, or :class:`FitError`.

:class:`RankLawFit` holds the fitted law ``λ_(i) ≈ c · exp(−s ψ(i)) ≈ c (i − ½)^(-s)`` over its window
with the exponent's intervals, KS distances, the OLS cross-check and the comparison with the other
models of :mod:`.models` (one :class:`ModelFit` each), and evaluates the fitted curves for plots.
``to_json`` gives the summary ``curvlab fit --json`` prints (plain floats, NaN as null).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import special

from curvlab.analysis.powerlaw.models import _MODELS
from curvlab.errors import CurvlabError


class FitError(CurvlabError):
    """A spectrum that cannot be fitted (too few positive values, flat, not finite)."""


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
    ``(calibrated_low, calibrated_high)``: the interval that covers both the sampling noise (the χ²
    interval) and the spread of the spectrum's local exponent over the window (``local_exponents``, the
    log-quadratic model's at ``k_lo`` and ``k_hi``), whose coverage was measured by simulation
    (:mod:`.calibration`, docs/powerlaw.md); ``power_law_supported`` is False when that local exponent
    changes by more than :data:`~curvlab.analysis.powerlaw.fit.CURVATURE_TOLERANCE` of ``ŝ`` across the
    window: the data then support no single power law.
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
    calibrated_low: float = math.nan
    calibrated_high: float = math.nan
    local_exponents: tuple[float, float] = (math.nan, math.nan)
    power_law_supported: bool = True

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
            "calibrated_low": _num(self.calibrated_low),
            "calibrated_high": _num(self.calibrated_high),
            "nqm_in_calibrated": bool(self.calibrated_low <= 1.0 <= self.calibrated_high),
            "local_exponents": [_num(v) for v in self.local_exponents],
            "power_law_supported": self.power_law_supported,
            "preferred_model": self.preferred_model,
            "models": [m.to_json() for m in self.models],
        }


def _num(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None
