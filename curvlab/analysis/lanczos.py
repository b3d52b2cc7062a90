"""Lanczos: extreme eigenpairs, stochastic Lanczos quadrature (SLQ) for the density, Hutchinson's trace.

All three need only products ``v ↦ M v`` with a symmetric ``M`` (a GGN, K-FAC or any
:class:`~curvlab.analysis.operators.CurvatureOperator`) and run in float64.

**Lanczos with full reorthogonalisation** (:func:`lanczos`). From a unit start ``q_1``,
``β_j q_{j+1} = M q_j − α_j q_j − β_{j−1} q_{j−1}`` with ``α_j = q_j^T M q_j``, and the new vector is
orthogonalised against every earlier one, twice (classical Gram–Schmidt twice is enough: Giraud et al.
2005), so the basis stays orthonormal to rounding and no spurious copies of converged eigenvalues
appear. ``Q_m^T M Q_m = T_m`` is tridiagonal; a zero ``β`` means an invariant subspace was found.
Memory: ``m`` vectors of length ``D``.

**Extreme eigenpairs** (:func:`extreme_eigenpairs`). The Ritz pairs ``(θ_i, Q_m s_i)`` of ``T_m`` have
residual ``‖M y_i − θ_i y_i‖ = |β_m s_{m,i}|`` exactly (in exact arithmetic, and to rounding with full
reorthogonalisation); the Krylov space grows until the ``k`` wanted pairs (largest or smallest) have
residuals below ``tol · max|θ|``. For a symmetric matrix the residual bounds the error of each Ritz
value: there is an eigenvalue within ``|β_m s_{m,i}|`` of ``θ_i``.

**SLQ** (:func:`slq`): for a probe ``v`` uniform on the unit sphere, the Gaussian quadrature of ``k``
Lanczos steps gives nodes ``θ_i`` (Ritz values) and weights ``(e_1^T s_i)²``; averaged over ``n_v``
probes they approximate the cumulative empirical spectral measure ``Φ(x) = #{λ_i ≤ x} / D``. Chen,
Trogdon & Ubaru (2021, "Analysis of stochastic Lanczos quadrature for spectrum approximation", ICML):
with ``k = ⌈12/t + 1/2⌉`` steps and ``n_v = ⌈4 (D+2)^-1 t^-2 ln(2D/η)⌉`` probes the Wasserstein-1
distance between the SLQ measure and ``Φ`` is at most ``t (λ_max − λ_min)`` with probability at least
``1 − η``. :func:`slq` takes ``t`` (``accuracy``) and ``η`` (``failure``) and chooses ``k`` and ``n_v``
so (more probes may be asked for; fewer steps are refused unless the Krylov space is exhausted).

**Hutchinson** (:func:`hutchinson`): ``tr M ≈ (1/n) Σ v_i^T M v_i`` with Rademacher probes, and its
standard error ``sd / sqrt(n)`` (the interval ``±1.96 SE`` covers the trace in ~95% of runs once ``n``
is a few dozen; tests/test_lanczos.py measures it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from curvlab.errors import OptionError

Matvec = Callable[[Tensor], Tensor]


def as_matvec(operator: object) -> tuple[Matvec, int]:
    """``(v ↦ M v, D)`` from a CurvatureOperator, a dense tensor or a ``(matvec, dim)`` pair."""
    if isinstance(operator, tuple):
        return operator  # type: ignore[return-value]
    if isinstance(operator, Tensor):
        return (lambda v: operator @ v), int(operator.shape[0])
    matvec = operator.matvec  # type: ignore[attr-defined]
    return (lambda v: matvec(v)), int(operator.shape[0])  # type: ignore[attr-defined]


@dataclass
class LanczosRun:
    """``T_m`` (``alpha``, ``beta``; ``beta[m-1]`` is the residual norm after the last step), the basis
    ``Q`` (``D × m``) if kept, and the number of products with ``M``."""

    alpha: np.ndarray
    beta: np.ndarray
    basis: Tensor | None
    matvecs: int
    exhausted: bool = False

    @property
    def steps(self) -> int:
        return len(self.alpha)

    def ritz(self) -> tuple[np.ndarray, np.ndarray]:
        """Eigenvalues (ascending) and eigenvectors of ``T_m``."""
        from scipy.linalg import eigh_tridiagonal

        if self.steps == 1:
            return self.alpha.copy(), np.ones((1, 1))
        return eigh_tridiagonal(self.alpha, self.beta[:-1])


def lanczos(matvec: Matvec, start: Tensor, steps: int) -> LanczosRun:
    """``steps`` Lanczos steps with full reorthogonalisation from ``start`` (normalised here); stops early
    at an invariant subspace (``exhausted``)."""
    state = _Krylov(matvec, start)
    state.extend(steps)
    return state.run


@dataclass
class Eigenpairs:
    """Extreme eigenvalues (``which="largest"``: descending; ``"smallest"``: ascending), the Ritz vectors
    (``D × k``), each pair's residual bound, whether all converged, and the cost in products with ``M``."""

    values: np.ndarray
    vectors: Tensor | None
    residuals: np.ndarray
    converged: bool
    matvecs: int
    steps: int


def extreme_eigenpairs(
    operator: object,
    k: int,
    *,
    which: str = "largest",
    tol: float = 1e-8,
    max_steps: int | None = None,
    seed: int = 0,
    vectors: bool = True,
    check_every: int = 5,
) -> Eigenpairs:
    """The ``k`` largest (or smallest) eigenpairs of a symmetric operator by Lanczos (module docstring).

    Converged when every wanted Ritz pair has residual ``|β_m s_{m,i}| <= tol · max|θ|``; ``max_steps``
    (default ``min(D, max(20 k, 100))``) bounds the Krylov dimension, and ``converged`` says whether
    the tolerance was met within it.
    """
    if which not in ("largest", "smallest"):
        raise OptionError(f"which must be 'largest' or 'smallest', got {which!r}")
    matvec, dim = as_matvec(operator)
    k = int(k)
    if not 1 <= k <= dim:
        raise OptionError(f"k must be in [1, {dim}], got {k}")
    limit = min(dim, max_steps or max(20 * k, 100))
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(dim, generator=gen, dtype=torch.float64)
    state = _Krylov(matvec, start)
    while True:
        state.extend(min(max(k + 1, check_every) if state.steps == 0 else check_every, limit - state.steps))
        run = state.tridiagonal()
        theta, s = run.ritz()
        order = np.argsort(-theta) if which == "largest" else np.argsort(theta)
        chosen = order[: min(k, len(theta))]
        residual = np.abs(run.beta[-1] * s[-1, chosen])
        if run.exhausted:
            residual = np.zeros_like(residual)
        scale = max(float(np.abs(theta).max()), 1e-300)
        done = len(chosen) == k and bool((residual <= tol * scale).all())
        if done or run.exhausted or state.steps >= limit:
            break
    ritz_vectors = state.combine(s[:, chosen]) if vectors else None
    return Eigenpairs(theta[chosen], ritz_vectors, residual, done or run.exhausted, run.matvecs, state.steps)


class _Krylov:
    """A Lanczos run grown a few steps at a time (the basis kept, the last residual carried over)."""

    def __init__(self, matvec: Matvec, start: Tensor) -> None:
        self.matvec = matvec
        start = start.to(torch.float64)
        norm = float(torch.linalg.norm(start))
        if not math.isfinite(norm) or norm == 0:
            raise OptionError("the Lanczos start vector must be finite and non-zero")
        q = start / norm
        self.vectors = [q]
        self.alpha: list[float] = []
        self.beta: list[float] = []
        self.matvecs = 0
        self.exhausted = False
        self.scale = 0.0

    @property
    def steps(self) -> int:
        return len(self.alpha)

    def extend(self, count: int) -> None:
        dim = self.vectors[0].shape[0]
        for _ in range(max(count, 0)):
            if self.exhausted:
                break
            q = self.vectors[len(self.alpha)]
            w = self.matvec(q).to(torch.float64)
            self.matvecs += 1
            if not torch.isfinite(w).all():
                raise OptionError("the operator returned non-finite values during Lanczos")
            a = float(q @ w)
            self.alpha.append(a)
            # classical Gram-Schmidt against the whole basis, twice ("twice is enough"), one vector at a
            # time: no D × m copy of the basis per step (a 23M-parameter model's basis is GBs)
            w = w.clone()
            for _ in range(2):
                coefficients = [float(v @ w) for v in self.vectors]
                for v, c in zip(self.vectors, coefficients, strict=True):
                    w.sub_(v, alpha=c)
            b = float(torch.linalg.norm(w))
            self.beta.append(b)
            self.scale = max(self.scale, abs(a) + b)
            if b <= 1e-13 * max(self.scale, 1e-300) or len(self.vectors) == dim:
                self.exhausted = True
                break
            self.vectors.append(w / b)

    def tridiagonal(self) -> LanczosRun:
        """``T_m`` and the counts, without the basis (nothing of size ``D`` copied)."""
        return LanczosRun(np.array(self.alpha), np.array(self.beta), None, self.matvecs, self.exhausted)

    def combine(self, coefficients: np.ndarray) -> Tensor:
        """``Q_m C`` for ``C`` (``m × j``), one basis vector at a time."""
        first = self.vectors[0]
        c = torch.as_tensor(coefficients, dtype=torch.float64, device=first.device)
        out = torch.zeros(first.shape[0], c.shape[1], dtype=torch.float64, device=first.device)
        for i in range(c.shape[0]):
            out += self.vectors[i][:, None] * c[i][None, :]
        return out

    @property
    def run(self) -> LanczosRun:
        m = len(self.alpha)
        return LanczosRun(
            np.array(self.alpha),
            np.array(self.beta),
            torch.stack(self.vectors[:m], dim=1),
            self.matvecs,
            self.exhausted,
        )


def slq_plan(dim: int, accuracy: float, failure: float) -> tuple[int, int]:
    """``(steps, probes)`` of Chen, Trogdon & Ubaru (2021) for ``W1 <= accuracy · (λ_max − λ_min)`` with
    probability ``>= 1 − failure``: ``⌈12/t + 1/2⌉`` and ``⌈4 (D+2)^-1 t^-2 ln(2D/η)⌉``."""
    if not (0 < accuracy < 1) or not (0 < failure < 1):
        raise OptionError(f"accuracy and failure must lie in (0, 1), got {accuracy}, {failure}")
    steps = math.ceil(12 / accuracy + 0.5)
    probes = math.ceil(4 / (dim + 2) / accuracy**2 * math.log(2 * dim / failure))
    return steps, max(probes, 1)


@dataclass
class SpectralDensity:
    """An SLQ estimate of the spectral measure: ``nodes[p]`` and ``weights[p]`` (summing to 1) of each
    probe ``p``; the measure is their average. ``accuracy``/``failure``: the W1 guarantee in units of
    the spectral range (``None`` when fewer steps or probes than the guarantee needs were run)."""

    nodes: list[np.ndarray]
    weights: list[np.ndarray]
    dim: int
    steps: int
    matvecs: int
    accuracy: float | None
    failure: float | None
    extra: dict = field(default_factory=dict)

    def atoms(self, probes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """All nodes and their weights in the averaged measure (sorted by node), optionally of a subset
        (with repeats) of the probes — a bootstrap resample."""
        chosen = range(len(self.nodes)) if probes is None else probes
        nodes = np.concatenate([self.nodes[p] for p in chosen])
        weights = np.concatenate([self.weights[p] for p in chosen]) / len(list(chosen))
        order = np.argsort(nodes, kind="stable")
        return nodes[order], weights[order]

    def cdf(self, x: np.ndarray) -> np.ndarray:
        nodes, weights = self.atoms()
        cum = np.concatenate([[0.0], np.cumsum(weights)])
        return cum[np.searchsorted(nodes, np.asarray(x, dtype=np.float64), side="right")]

    def trace(self) -> float:
        """``D Σ w θ``: the SLQ estimate of the trace."""
        nodes, weights = self.atoms()
        return float(self.dim * (nodes * weights).sum())


def slq(
    operator: object,
    *,
    accuracy: float = 0.05,
    failure: float = 0.05,
    steps: int | None = None,
    probes: int | None = None,
    seed: int = 0,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature (module docstring): steps and probes from :func:`slq_plan` unless given.

    Fewer steps or probes than the plan are allowed but then the result carries no guarantee
    (``accuracy=None``) — except that fewer steps do no harm when every probe's Krylov space was
    exhausted (the quadrature is then exact; the probes' sampling error remains).
    """
    matvec, dim = as_matvec(operator)
    plan_steps, plan_probes = slq_plan(dim, accuracy, failure)
    k = min(plan_steps if steps is None else int(steps), dim)
    n_v = plan_probes if probes is None else int(probes)
    if k < 1 or n_v < 1:
        raise OptionError(f"steps and probes must be >= 1, got {k}, {n_v}")
    gen = torch.Generator().manual_seed(seed)
    nodes, weights = [], []
    matvecs, exhausted_all = 0, True
    for _ in range(n_v):
        v = torch.randn(dim, generator=gen, dtype=torch.float64)
        state = _Krylov(matvec, v)
        state.extend(k)
        run = state.tridiagonal()
        theta, s = run.ritz()
        nodes.append(theta)
        weights.append(s[0] ** 2 / (s[0] ** 2).sum())
        matvecs += run.matvecs
        exhausted_all &= run.exhausted
    # an exhausted Krylov space makes the quadrature exact; the probes' sampling error remains
    guaranteed = (k >= min(plan_steps, dim) or exhausted_all) and n_v >= plan_probes
    return SpectralDensity(
        nodes, weights, dim, k, matvecs, accuracy if guaranteed else None, failure if guaranteed else None
    )


@dataclass
class TraceEstimate:
    estimate: float
    standard_error: float
    probes: int
    samples: np.ndarray


def hutchinson(operator: object, probes: int = 64, *, seed: int = 0) -> TraceEstimate:
    """``tr M ≈ (1/n) Σ v^T M v`` with ``n`` Rademacher probes; SE ``= sd(v^T M v) / sqrt(n)``."""
    matvec, dim = as_matvec(operator)
    if probes < 2:
        raise OptionError(f"Hutchinson needs at least 2 probes for a standard error, got {probes}")
    gen = torch.Generator().manual_seed(seed)
    samples = np.empty(probes)
    for i in range(probes):
        v = torch.randint(0, 2, (dim,), generator=gen).to(torch.float64) * 2 - 1
        samples[i] = float(v @ matvec(v).to(torch.float64))
    return TraceEstimate(
        float(samples.mean()), float(samples.std(ddof=1) / math.sqrt(probes)), probes, samples
    )
