"""Model comparison: each model of :mod:`.models` fitted by maximum likelihood on the window's gaps.

Gap ``j`` of the window is Gamma with shape ``κ_j = g_j`` (its length) and mean
``μ_j = E y_j = ρ_j (curve_j − curve_{j+1})``, linear in the model's parameters; the spacings
likelihood is maximised by Fisher scoring. The models are compared with the pure power law by
likelihood ratio (χ²₁: every other model nests it or is nested in it by one parameter), AIC and the
log-rank KS distance (:func:`~curvlab.analysis.powerlaw.window.ks_distance`). No log-log R² is
reported anywhere.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from curvlab.analysis.powerlaw.estimator import _Gaps
from curvlab.analysis.powerlaw.models import _MODELS, _ModelSpec
from curvlab.analysis.powerlaw.result import ModelFit
from curvlab.analysis.powerlaw.window import ks_distance


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
