"""The rank-law models compared on a window: ``log λ̂(i) = log c + curve(ψ(i))``, linear in the parameters.

Besides the pure power law ``c · exp(−s ψ(i)) ≈ c i^(-s)`` (the model the estimator fits), three
other models on the same window: the NQM's fixed ``s = 1``, a log-quadratic curve and the
log-corrected law ``c (ln i)^β i^(-s)`` of a product of two ``1/i`` spectra (docs/powerlaw.md,
"Models"). Each is a ``_ModelSpec`` in ``_MODELS``: its basis functions of ``ψ(i)`` and their
slopes; fitting and comparing them is :mod:`.compare`::

    model           log λ̂(i) − log c                                    fitted
    power_law       −s ψ(i)                                              s
    nqm             −ψ(i)   (λ̂ ≈ c / i)                                 none (s = 1)
    log_quadratic   −s u + b u²,  u = ψ(i) − (ψ(k_lo) + ψ(k_hi)) / 2     s, b
    log_corrected   −s ψ(i) + β log(1 + H_{i−1})   (≈ (ln i)^β i^(-s))   s, β

(``1 + H_{i−1} = ψ(i) + 1 + γ``, finite at ``i = 1``.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


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
