"""The noisy quadratic model (NQM) problem: spectrum ``h``, gradient-noise variances ``c``, initial
second moments ``E[θ_i(0)²]``, in exact mode (all d dimensions) or binned mode (geometric bins with
counts).

Model (docs/nqm.md, shared/nqm.md): loss ``L(θ) = ½ θᵀHθ`` with ``H = diag(h)``; a mini-batch gradient
is ``Hθ + ε`` with ``Cov(ε) = diag(c)/B``. Every dimension evolves independently, so the expected risk
is ``Σ_i ½ h_i E[θ_i²]`` (seed B: "the expected risk is totally decided by E[θ]² + V[θ]"). With
preconditioner ``H^{-p}`` the update of dimension i is ``θ ← θ − α h_i^{-p}(h_i θ + ε)``: the dynamics
see the curvature ``h_i^{1-p}`` and the per-example noise variance ``c_i h_i^{-2p}``, while the risk
keeps the weight ``½ h_i`` (:func:`preconditioned`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODES = ("exact", "binned")
DEFAULT_D = 10_000
DEFAULT_BINS = 100


@dataclass(frozen=True)
class Problem:
    """A diagonal NQM. ``counts[k]`` dimensions share ``(h[k], c[k], a0[k])`` (all 1 in exact mode).

    ``h``: curvatures (eigenvalues of H), ``c``: per-example gradient-noise variances (``C = diag(c)``,
    the mini-batch noise is ``c/B``), ``a0``: ``E[θ(0)²]`` per dimension, ``mode``: ``"exact"`` or
    ``"binned"``, ``d``: the number of dimensions represented (``counts.sum()``).
    """

    h: np.ndarray
    c: np.ndarray
    a0: np.ndarray
    counts: np.ndarray
    mode: str = "exact"

    @property
    def d(self) -> int:
        return int(round(float(self.counts.sum())))

    @property
    def size(self) -> int:
        """Number of stored entries (d in exact mode, the number of non-empty bins in binned mode)."""
        return int(self.h.size)

    def initial_risk(self) -> float:
        """``Σ_i ½ h_i E[θ_i(0)²]``."""
        return float(0.5 * np.sum(self.counts * self.h * self.a0))

    def risk(self, second_moment: np.ndarray) -> np.ndarray:
        """Expected risk ``Σ_i ½ counts_i h_i A_i`` of per-entry second moments (last axis = entries)."""
        return 0.5 * np.sum(self.counts * self.h * second_moment, axis=-1)

    def describe(self) -> dict:
        """JSON-ready description (mode, d, entries, spectrum range)."""
        return {
            "mode": self.mode,
            "d": self.d,
            "entries": self.size,
            "h_max": float(self.h.max()),
            "h_min": float(self.h.min()),
            "initial_risk": self.initial_risk(),
        }


def preconditioned(h: np.ndarray, c: np.ndarray, power: float) -> tuple[np.ndarray, np.ndarray]:
    """Curvature and per-example noise seen by SGD preconditioned with ``H^{-p}``: ``(h^{1-p}, c h^{-2p})``.

    The update ``θ ← θ − α h^{-p}(hθ + ε)`` contracts with ``1 − α h^{1-p}`` and injects the noise
    ``α h^{-p} ε`` of variance ``(α h^{-p})² c / B``.
    """
    h = np.asarray(h, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    power = np.asarray(power, dtype=np.float64)
    return h ** (1.0 - power), c * h ** (-2.0 * power)


def spectrum_problem(h, c=None, a0=None) -> Problem:
    """An exact-mode problem from a spectrum; ``c`` defaults to ``h`` (C = H, seed E.2), ``a0`` to 1."""
    h = np.asarray(h, dtype=np.float64).ravel()
    if h.size == 0 or not np.all(np.isfinite(h)) or np.any(h <= 0):
        raise ValueError("the spectrum h must be non-empty, finite and positive")
    c = h.copy() if c is None else np.broadcast_to(np.asarray(c, dtype=np.float64), h.shape).copy()
    a0 = np.ones_like(h) if a0 is None else np.broadcast_to(np.asarray(a0, dtype=np.float64), h.shape).copy()
    if np.any(c < 0) or np.any(a0 < 0) or not (np.all(np.isfinite(c)) and np.all(np.isfinite(a0))):
        raise ValueError("c and a0 must be finite and non-negative")
    return Problem(h=h, c=c, a0=a0, counts=np.ones_like(h), mode="exact")


def binned(problem: Problem, bins: int = DEFAULT_BINS) -> Problem:
    """Group the entries into ``bins`` geometric bins of h (edges ``geomspace(h_min, h_max, bins+1)``).

    A bin is represented by the count-weighted means of h, c and a0 of its members, so the initial risk
    and ``Σ counts·c`` are preserved exactly when c and a0 are proportional to h or constant within a bin
    (the default problem); other sums are approximated to within the bin width (factor
    ``(h_max/h_min)^{1/bins}``, 1.096 for the default). Empty bins are dropped.
    """
    if bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins}")
    h, w = problem.h, problem.counts
    lo, hi = float(h.min()), float(h.max())
    if hi == lo:
        index = np.zeros(h.shape, dtype=np.int64)
    else:
        edges = np.geomspace(lo, hi, bins + 1)
        index = np.clip(np.searchsorted(edges, h, side="right") - 1, 0, bins - 1)
    counts = np.bincount(index, weights=w, minlength=bins)
    keep = counts > 0

    def mean(x: np.ndarray) -> np.ndarray:
        return np.bincount(index, weights=w * x, minlength=bins)[keep] / counts[keep]

    return Problem(h=mean(h), c=mean(problem.c), a0=mean(problem.a0), counts=counts[keep], mode="binned")


def default_problem(d: int = DEFAULT_D, mode: str = "exact", bins: int = DEFAULT_BINS) -> Problem:
    """The NQM of the paper: ``h_i = 1/i`` (i = 1..d), ``c_i = h_i``, ``E[θ_i(0)²] = 1`` (θ(0) ~ N(0, I))."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if d < 1:
        raise ValueError(f"d must be a positive integer, got {d}")
    problem = spectrum_problem(1.0 / np.arange(1, d + 1, dtype=np.float64))
    return binned(problem, bins) if mode == "binned" else problem
