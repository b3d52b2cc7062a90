"""Rank power-law fit of a sorted eigenspectrum: ``λ_(i) ≈ c · i^(-s)`` (seed E.4, Fig. 12).

The NQM of the seed (Section 3.5/3.7) takes the curvature eigenvalues to be ``h_i = 1/i``; seed E.4
checks this against the K-FAC eigenspectrum of a real network. This package fits the rank law with
proper statistics; the derivation is written out in ``docs/powerlaw.md``. In short:

* **Model.** The sorted values ``λ_(1) ≥ λ_(2) ≥ …`` are the order statistics of a sample whose tail is
  Pareto with index ``α = 1/s`` (``P(λ > x) ∝ x^(-1/s)``), so ``E log λ_(i) = log c − s ψ(i)`` with
  ``ψ`` the digamma function (``ψ(i) ≈ log(i − ½)``).
* **Estimator** (:mod:`~curvlab.analysis.powerlaw.estimator`): the mean of the normalised
  log-spacings over a rank window (Hill's estimator from the top), on every value or on a rank grid
  for thinned spectra; its exact χ² interval, a bootstrap interval and an OLS cross-check.
* **Window** (:mod:`~curvlab.analysis.powerlaw.window`): chosen among candidate windows by minimising
  KS distances (Clauset et al.'s for ``k_hi``, a log-rank one for ``k_lo``).
* **Other models** (:mod:`~curvlab.analysis.powerlaw.models`, fitted and compared in
  :mod:`~curvlab.analysis.powerlaw.compare`): the NQM's fixed ``s = 1``, a log-quadratic curve and
  the log-corrected law ``c (ln i)^β i^(-s)``, compared by likelihood ratio, AIC and KS distance. No
  log-log R² is reported anywhere.
* **Results** (:mod:`~curvlab.analysis.powerlaw.result`): :class:`RankLawFit`, :class:`ModelFit`,
  :class:`FitError`.
* **Entry points** (:mod:`~curvlab.analysis.powerlaw.fit`): :func:`fit_rank_law`,
  :func:`fit_spectrum`, :func:`default_floor`, :func:`kronecker_floor`.
* **A network's spectrum** (:mod:`~curvlab.analysis.powerlaw.network`): :func:`fit_network` and its
  :class:`NetworkFit`, what ``curvlab fit`` and :func:`curvlab.fit` report.

Each module imports only modules listed before it here: ``estimator``, ``models``, ``result``,
``window``, ``compare``, ``fit``, ``network``.
"""

from curvlab.analysis.powerlaw.estimator import DENSE_RANKS, GRID_RATIO, rank_grid
from curvlab.analysis.powerlaw.fit import (
    FULL_DATA_LIMIT,
    THIN_GRID_RATIO,
    default_floor,
    fit_rank_law,
    fit_spectrum,
    kronecker_floor,
)
from curvlab.analysis.powerlaw.network import NetworkFit, fit_network
from curvlab.analysis.powerlaw.result import FitError, ModelFit, RankLawFit
from curvlab.analysis.powerlaw.window import ks_distance, parse_window, window_candidates

__all__ = [
    "DENSE_RANKS",
    "FULL_DATA_LIMIT",
    "GRID_RATIO",
    "THIN_GRID_RATIO",
    "FitError",
    "ModelFit",
    "NetworkFit",
    "RankLawFit",
    "default_floor",
    "fit_network",
    "fit_rank_law",
    "fit_spectrum",
    "kronecker_floor",
    "ks_distance",
    "parse_window",
    "rank_grid",
    "window_candidates",
]
