"""A network's batch-size scaling predicted from its measured curvature and gradient noise (docs/predict.md).

The noisy quadratic model (seed B, docs/nqm.md) has three ingredients per eigen-direction: the
curvature ``h_i``, the per-example gradient-noise variance ``c_i`` and the initial error ``θ_i(0)``.
For a real network ``curvlab gradcov`` (seed E.2, :mod:`curvlab.analysis.gradcov`) measures, along every
direction ``v_i`` of the Kronecker-factored eigenbasis (KFE) of a checkpoint, over ``n`` training
examples:

* ``h_i = v_iᵀ F v_i``, the curvature of the true Fisher (= GGN) of the per-example loss ``ℓ_n``;
* ``c_i = Var_n(v_iᵀ g_n)``, the unbiased variance of the per-example gradients;
* ``ĝ_i = (1/n) Σ_n v_iᵀ g_n``, the mean gradient.

**The NQM built from them** (:func:`measured_problem`), with ``N`` the number of training examples the
batches are drawn from (the *population*; ``None``: an unlimited stream):

* ``H = diag(h)``, ``C = diag(c)``: the GGN and the gradient covariance in the KFE, their off-diagonal
  parts dropped (exact when the KFE diagonalises ``H``, e.g. a linear model with squared loss);
* ``θ_i(0) = g_i / h_i``, the quadratic model's distance to its minimum along ``v_i`` (a Newton step),
  so ``E[θ_i(0)²] = g_i² / h_i²`` and the initial excess risk is ``R0 = Σ_i ½ g_i² / h_i``. With
  ``n < N`` the mean is a sample mean and ``E[ĝ_i²] = g_i² + c_i (1/n − 1/N)``: ``g_i²`` is estimated
  by ``max(ĝ_i² − c_i (1/n − 1/N), 0)`` (unbiased before the clip; nothing is subtracted when the
  examples are the whole population);
* the mini-batch noise of a batch of ``B`` distinct examples drawn from ``N`` is ``c_i (1/B − 1/N)``
  (the variance of a mean drawn without replacement; ``c_i / B`` for an unlimited stream): the NQM runs
  at the effective batch size ``B_eff = 1 / (1/B − 1/N)`` (noise-free from ``B = N`` on);
* the target is a fraction ``φ`` of ``R0`` (:func:`target_fraction` maps a loss target: ``φ = (X − L*)
  / (L0 − L*)`` with ``L0`` the training objective at the checkpoint and ``L*`` its floor);
* directions with ``h_i`` at or below the numerical null floor (``1e-12 ×`` the largest, gradcov's
  :data:`~curvlab.analysis.gradcov_run.NULL_FLOOR`) have no quadratic model: they are left out of the
  NQM and counted, with their share of ``tr(Σ)`` and ``|G|²``.

Every quantity is invariant under a rescaling of the loss (``h → κh``, ``c → κ²c``, ``g → κg``, the
learning rate ``→ α/κ``), so the normalisation of ``ℓ_n`` (sum over label locations) does not matter.

**Optimizers** (:data:`OPTIMIZERS`): ``sgd``; ``momentum`` (heavy ball, β tuned); ``kfac`` = the NQM's
preconditioning with power 1, ``H^{-1}``, with tuned heavy-ball momentum (``curvlab sweep`` tunes
K-FAC's momentum too; ``β = 0`` is on the grid); ``ema`` (iterate averaging, decay tuned). Each is tuned
per batch size exactly as ``curvlab nqm steps`` does (:func:`curvlab.nqm.steps_to_target` on the
notebook's grids, :func:`curvlab.nqm.paper_lr_grid` and :func:`~curvlab.nqm.paper_decay_grid`), with the
learning rates in units of ``1 / max h^{1−p}`` (the notebook's grid is for ``h_max = 1``).

**Predictors of the critical batch size**: the NQM's curve fitted with ``S(B) = S_min (1 + B_crit/B)``
(:func:`curvlab.analysis.scaling.fit_scaling`, the fit ``curvlab sweep`` makes of its measured curves);
McCandlish et al. 2018's ``B_simple = tr(Σ)/|G|²`` and ``B_noise = tr(HΣ)/(Gᵀ H G)``
(:func:`noise_scales`), and the ingredient swaps of :data:`VARIANTS` — among them the paper's
``h = c = 1/i`` NQM with as many directions — which say which ingredient a prediction depends on.
``B_simple`` is exact over the layers' parameters (trace and norm do not depend on the orthonormal
basis); ``B_noise`` in the KFE keeps only the diagonal of ``H`` there (the K-FAC-basis approximation).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from curvlab.errors import CurvlabError

__all__ = [
    "OPTIMIZERS",
    "VARIANTS",
    "Curve",
    "Measurements",
    "PredictError",
    "effective_batch_sizes",
    "fit_noise_exponent",
    "measured_problem",
    "noise_histogram",
    "noise_scales",
    "optimizer_grid",
    "predict_curves",
    "target_fraction",
]

#: optimizer name -> (NQM kind, preconditioning power p); docs/predict.md.
OPTIMIZERS: dict[str, tuple[str, float]] = {
    "sgd": ("sgd", 0.0),
    "momentum": ("momentum", 0.0),
    "kfac": ("momentum", 1.0),
    "ema": ("ema", 0.0),
}

#: The NQMs a prediction is made with: the measured one and ingredient swaps (each keeps the measured
#: totals, so that only the distribution over directions changes).
VARIANTS: dict[str, str] = {
    "nqm": "measured h, c and θ(0) = g/h",
    "nqm_isotropic_theta": "measured h and c; E[θ_i(0)²] the same in every direction (the paper's "
    "θ(0) ~ N(0, I)), scaled to the measured initial risk R0",
    "nqm_c_prop_h": "measured h and θ(0) = g/h; c ∝ h (the paper's C = H), scaled to the measured tr(Σ)",
    "nqm_1_over_i": "the paper's NQM: h_i = c_i = 1/i, E[θ_i(0)²] = 1, as many directions as the measured "
    "NQM",
}


class PredictError(CurvlabError):
    """Measurements that cannot make an NQM (non-finite, negative, too few examples), or a bad target."""


@dataclass(frozen=True)
class Measurements:
    """Per KFE direction, all layers concatenated in order: ``curvature`` ``h``, ``variance`` ``c``
    (unbiased over ``num_examples``), ``mean`` ``ĝ``. ``layers`` lists ``(name, directions)``;
    ``population`` is ``N``, the training examples batches are drawn from (``None``: unlimited).

    A Monte-Carlo curvature may be negative (the unbiased Rao-Blackwellised estimator of a tied weight,
    gradcov's ``mc`` route): such directions fall below the null floor, are left out of the NQM like the
    null space and counted (``negative_curvature_directions``); the noise scales use ``max(h, 0)``."""

    curvature: np.ndarray
    variance: np.ndarray
    mean: np.ndarray
    layers: tuple[tuple[str, int], ...]
    num_examples: int
    population: int | None = None

    def __post_init__(self) -> None:
        arrays = [np.asarray(a, dtype=np.float64).ravel() for a in (self.curvature, self.variance, self.mean)]
        if len({a.size for a in arrays}) != 1 or arrays[0].size == 0:
            raise PredictError(
                "curvature, variance and mean must hold the same, non-zero number of directions"
            )
        if sum(count for _, count in self.layers) != arrays[0].size:
            raise PredictError("the layers' direction counts do not add up to the number of directions")
        for name, a in zip(("curvature", "variance", "mean gradient"), arrays, strict=True):
            if not np.all(np.isfinite(a)):
                raise PredictError(f"the measured {name} holds NaN or infinite values")
        if np.any(arrays[1] < 0):
            raise PredictError("the measured variance must be non-negative")
        if not arrays[0].max() > 0:
            raise PredictError(
                "the measured curvature is zero in every direction: there is no quadratic model"
            )
        if int(self.num_examples) < 2:
            raise PredictError(f"the gradient variance needs at least 2 examples, got {self.num_examples}")
        if self.population is not None and int(self.population) < int(self.num_examples):
            raise PredictError(
                f"the population ({self.population}) is smaller than the {self.num_examples} "
                "examples measured"
            )
        for key, a in zip(("curvature", "variance", "mean"), arrays, strict=True):
            object.__setattr__(self, key, a)

    @classmethod
    def from_statistics(cls, stats: Mapping[str, Any], population: int | None = None) -> Measurements:
        """From gradcov's per-layer :class:`~curvlab.analysis.gradcov.DirectionStatistics` (all directions
        need a curvature: the ``exact`` or ``mc`` route)."""
        if not stats:
            raise PredictError("no layers were measured")
        missing = [name for name, s in stats.items() if s.curvature is None]
        if missing:
            raise PredictError(
                f"layer {missing[0]}: no all-direction curvature (the fvp route measures only "
                "selected directions); use the exact or mc route"
            )
        examples = {int(s.num_examples) for s in stats.values()}
        return cls(
            curvature=np.concatenate([np.ravel(s.curvature) for s in stats.values()]),
            variance=np.concatenate([np.ravel(s.variance) for s in stats.values()]),
            mean=np.concatenate([np.ravel(s.mean) for s in stats.values()]),
            layers=tuple((name, int(np.size(s.mean))) for name, s in stats.items()),
            num_examples=min(examples),
            population=population,
        )

    @property
    def sampling_factor(self) -> float:
        """``1/n − 1/N``: the variance of the sample mean per unit ``c`` (0 when n = N)."""
        n = self.num_examples
        return 1.0 / n - (0.0 if self.population is None else 1.0 / self.population)

    def gradient_sq(self) -> np.ndarray:
        """Unbiased per-direction ``g_i²``: ``ĝ_i² − c_i (1/n − 1/N)`` (may be negative: not clipped)."""
        return self.mean**2 - self.variance * self.sampling_factor

    def null_floor(self) -> float:
        """Curvatures at or below this are the numerical null space (``NULL_FLOOR ×`` the largest)."""
        from curvlab.analysis.gradcov_run import NULL_FLOOR

        return NULL_FLOOR * float(self.curvature.max())

    def null_mask(self) -> np.ndarray:
        return self.curvature <= self.null_floor()

    def layer_of(self) -> np.ndarray:
        """Index into :attr:`layers` of every direction."""
        return np.repeat(np.arange(len(self.layers)), [count for _, count in self.layers])


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 and num >= 0 and math.isfinite(num / den) else None


def noise_scales(meas: Measurements) -> dict[str, Any]:
    """McCandlish et al. 2018's ``B_simple = tr(Σ)/|G|²`` and ``B_noise = tr(HΣ)/(Gᵀ H G)`` in the KFE.

    ``tr(Σ) = Σ c_i`` and ``|G|² = Σ g_i²`` (unbiased, :meth:`Measurements.gradient_sq`) are exact sums
    over an orthonormal basis of every layer; ``tr(HΣ) ≈ Σ h_i c_i`` and ``GᵀHG ≈ Σ h_i g_i²`` keep the
    diagonal of ``H`` in the KFE. ``None`` where a denominator is not positive (no signal measured).
    """
    g2 = meas.gradient_sq()
    null = meas.null_mask()
    h = np.maximum(meas.curvature, 0.0)  # a Monte-Carlo estimate below 0 counts as 0 (class docstring)
    out = {
        "tr_sigma": float(meas.variance.sum()),
        "gradient_norm_sq": float(g2.sum()),
        "tr_h_sigma": float(np.sum(h * meas.variance)),
        "gHg": float(np.sum(h * g2)),
        "negative_curvature_directions": int(np.sum(meas.curvature < 0)),
        "null_share_tr_sigma": float(meas.variance[null].sum() / meas.variance.sum())
        if meas.variance.sum() > 0
        else 0.0,
        "null_share_gradient_norm_sq": float(
            np.maximum(g2[null], 0).sum() / max(np.maximum(g2, 0).sum(), 1e-300)
        ),
    }
    out["b_simple"] = _ratio(out["tr_sigma"], out["gradient_norm_sq"])
    out["b_noise"] = _ratio(out["tr_h_sigma"], out["gHg"])
    return out


@dataclass(frozen=True)
class MappedProblem:
    """An NQM :class:`~curvlab.nqm.Problem` and what the mapping did (left-out directions, totals)."""

    problem: Any
    variant: str
    kept: np.ndarray  # bool mask over the measured directions
    info: dict[str, Any] = field(default_factory=dict)


def measured_problem(meas: Measurements, variant: str = "nqm") -> MappedProblem:
    """The NQM of one of :data:`VARIANTS` built from ``meas`` (module docstring)."""
    from curvlab.nqm.problem import spectrum_problem

    if variant not in VARIANTS:
        raise PredictError(f"unknown NQM variant {variant!r} (choose from {', '.join(VARIANTS)})")
    null = meas.null_mask()
    kept = ~null
    h = meas.curvature[kept]
    c = meas.variance[kept]
    g2 = np.maximum(meas.gradient_sq()[kept], 0.0)
    a0 = g2 / h**2
    risk0 = float(0.5 * np.sum(h * a0))
    if variant == "nqm_1_over_i":
        inv = 1.0 / np.arange(1, h.size + 1, dtype=np.float64)
        h, c, a0 = inv, inv.copy(), np.ones_like(inv)
    elif variant == "nqm_isotropic_theta":
        a0 = np.full_like(h, risk0 / (0.5 * h.sum()))
    elif variant == "nqm_c_prop_h":
        c = h * (c.sum() / h.sum())
    if not 0.5 * np.sum(h * a0) > 0:
        raise PredictError(
            "the measured mean gradient is zero along every direction with curvature: the "
            "NQM starts at its minimum"
        )
    problem = spectrum_problem(h, c, a0)
    info = {
        "variant": variant,
        "description": VARIANTS[variant],
        "directions": int(meas.curvature.size),
        "null_directions": int(null.sum()),
        "negative_curvature_directions": int(np.sum(meas.curvature < 0)),
        "null_floor": meas.null_floor(),
        "nqm_directions": int(h.size),
        "initial_risk": problem.initial_risk(),
        "h_max": float(h.max()),
        "h_min": float(h.min()),
        "tr_c": float(c.sum()),
        "clipped_gradient_directions": int(np.sum(meas.gradient_sq()[kept] < 0)),
        "risk_share_top_curvature": risk_shares(h, a0),
    }
    return MappedProblem(problem, variant, kept, info)


def risk_shares(h: np.ndarray, a0: np.ndarray, tops: Sequence[float] = (0.01, 0.1, 0.5)) -> dict[str, float]:
    """The share of the initial risk ``Σ ½ h a0`` held by the top 1 %, 10 %, 50 % of the directions by
    curvature: where the initial error sits (the paper's NQM puts it where the curvature is large)."""
    risk = 0.5 * h * a0
    order = np.argsort(-h, kind="stable")
    cumulative = np.cumsum(risk[order]) / risk.sum()
    return {f"{top:g}": float(cumulative[max(1, int(round(top * h.size))) - 1]) for top in tops}


def target_fraction(target: str, initial_loss: float | None = None, loss_floor: float = 0.0) -> float:
    """``φ``, the target as a fraction of the initial excess risk: ``fraction=F`` gives F, ``loss=X``
    gives ``(X − L*) / (L0 − L*)`` (``L0 = initial_loss``, ``L* = loss_floor``). It must lie in (0, 1):
    ``≥ 1`` means the checkpoint already meets the target."""
    kind, sep, text = target.partition("=")
    kind = kind.strip().lower()
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not sep or kind not in ("fraction", "loss") or not math.isfinite(value):
        raise PredictError(f"--target {target!r}: expected fraction=F or loss=X with a finite number")
    if kind == "fraction":
        if not 0 < value < 1:
            raise PredictError(f"--target {target}: the fraction must lie in (0, 1)")
        return value
    if initial_loss is None or not math.isfinite(initial_loss):
        raise PredictError(f"--target {target}: the initial loss is unknown")
    if not math.isfinite(loss_floor):
        raise PredictError(f"--loss-floor {loss_floor}: not a finite number")
    if not initial_loss > loss_floor:
        raise PredictError(
            f"--target {target}: the loss at the checkpoint ({initial_loss:.6g}) is not above "
            f"the loss floor {loss_floor:g}"
        )
    if not value > loss_floor:
        raise PredictError(f"--target {target}: the target must lie above the loss floor {loss_floor:g}")
    if not value < initial_loss:
        raise PredictError(
            f"--target {target}: the loss at the checkpoint ({initial_loss:.6g}) already meets it"
        )
    return (value - loss_floor) / (initial_loss - loss_floor)


def effective_batch_sizes(batch_sizes: Sequence[int], population: int | None) -> np.ndarray:
    """``B_eff = 1/(1/B − 1/N)``: the NQM batch size with the noise of ``B`` distinct examples out of
    ``N`` (``B`` itself for an unlimited stream; the largest float, i.e. no noise, from ``B = N`` on)."""
    batch = np.asarray(batch_sizes, dtype=np.float64)
    if population is None:
        return batch
    inv = 1.0 / batch - 1.0 / population
    with np.errstate(divide="ignore"):
        return np.where(inv > 0, 1.0 / np.where(inv > 0, inv, 1.0), np.finfo(np.float64).max)


def optimizer_grid(name: str, h: np.ndarray, lr_grid: int = 100, decay_grid: int = 20):
    """The :class:`~curvlab.nqm.Grid` of ``name``: the notebook's grids, learning rates divided by
    ``max h^{1−p}`` (the curvature the optimizer sees; the notebook's grid is for a largest one of 1)."""
    from curvlab.nqm.analysis import Grid, paper_decay_grid, paper_lr_grid

    if name not in OPTIMIZERS:
        raise PredictError(f"unknown optimizer {name!r} (choose from {', '.join(OPTIMIZERS)})")
    kind, power = OPTIMIZERS[name]
    scale = float(np.max(np.asarray(h, dtype=np.float64) ** (1.0 - power)))
    return Grid(kind, paper_lr_grid(kind, lr_grid) / scale, paper_decay_grid(decay_grid), power)


@dataclass
class Curve:
    """One predictor's steps to target against the batch size for one optimizer, and its ``S(B)`` fit."""

    optimizer: str
    batch_sizes: list[int]
    steps: list[int | None]
    lr: list[float | None]
    decay: list[float | None]
    fit: Any = None  # ScalingFit, or None with fit_error
    fit_error: str | None = None

    @property
    def b_crit(self) -> float | None:
        return None if self.fit is None else float(self.fit.b_crit)

    def to_json(self) -> dict[str, Any]:
        kind, power = OPTIMIZERS[self.optimizer]
        out: dict[str, Any] = {
            "nqm_kind": kind,
            "precond_power": power,
            "batch_sizes": self.batch_sizes,
            "steps": self.steps,
            "lr": self.lr,
            "decay": self.decay,
        }
        out["fit"] = self.fit.to_json() if self.fit is not None else {"error": self.fit_error}
        return out


def predict_curves(
    mapped: MappedProblem,
    fraction: float,
    batch_sizes: Sequence[int],
    optimizers: Sequence[str],
    *,
    population: int | None,
    lr_grid: int = 100,
    decay_grid: int = 20,
    t_max: int = 10**9,
    mode: str = "exact",
    bins: int = 100,
    progress: bool = False,
) -> dict[str, Curve]:
    """Steps to ``fraction × R0`` per batch size and optimizer, tuned per batch size (module docstring)."""
    from curvlab.analysis.scaling import ScalingFitError, fit_scaling
    from curvlab.nqm.analysis import steps_to_target
    from curvlab.nqm.problem import binned

    if not (math.isfinite(fraction) and fraction > 0):
        raise PredictError(f"the target fraction must be positive, got {fraction}")
    if mode not in ("exact", "binned"):
        raise PredictError(f"mode must be exact or binned, got {mode!r}")
    problem = mapped.problem
    solved = binned(problem, bins) if mode == "binned" else problem
    target = fraction * problem.initial_risk()
    b_eff = effective_batch_sizes(batch_sizes, population)
    curves = {}
    for name in optimizers:
        grid = optimizer_grid(name, problem.h, lr_grid, decay_grid)
        result = steps_to_target(solved, target, b_eff, grid, t_max=t_max, progress=progress)
        reached = result.steps >= 0
        steps = [int(s) if ok else None for s, ok in zip(result.steps, reached, strict=True)]
        curve = Curve(
            name,
            [int(b) for b in batch_sizes],
            steps,
            [float(v) if ok else None for v, ok in zip(result.lr, reached, strict=True)],
            [
                float(v) if ok and grid.kind != "sgd" else None
                for v, ok in zip(result.decay, reached, strict=True)
            ],
        )
        usable = [(b, s) for b, s in zip(batch_sizes, steps, strict=True) if s]
        try:
            curve.fit = fit_scaling([b for b, _ in usable], [s for _, s in usable])
        except ScalingFitError as exc:
            curve.fit_error = str(exc)
        curves[name] = curve
    return curves


def noise_histogram(
    curvature: np.ndarray, variance: np.ndarray, floor: float, bins: int = 40
) -> dict[str, Any]:
    """Counts of directions on a ``bins × bins`` grid of ``(log10 h, log10 c)`` over the directions where
    both exceed ``floor``: the ``c`` against ``h`` picture of a network in a few kilobytes."""
    h = np.asarray(curvature, dtype=np.float64).ravel()
    c = np.asarray(variance, dtype=np.float64).ravel()
    keep = (h > floor) & (c > floor)
    if keep.sum() < 2:
        return {"log10_h_edges": [], "log10_c_edges": [], "counts": []}
    counts, xe, ye = np.histogram2d(np.log10(h[keep]), np.log10(c[keep]), bins=bins)
    return {"log10_h_edges": xe.tolist(), "log10_c_edges": ye.tolist(), "counts": counts.astype(int).tolist()}


def fit_noise_exponent(
    curvature: np.ndarray, variance: np.ndarray, floor: float, *, level: float = 0.9
) -> dict[str, Any]:
    """``c ∝ h^γ``: least squares of ``log c`` on ``log h`` over the directions where both exceed
    ``floor``, with a heteroscedasticity-robust (HC1 sandwich) normal interval at ``level``.

    The NQM assumes γ = 1 (``C = H``, seed E.2). The interval treats the directions as independent
    draws around the line; its coverage under that model is measured in ``tests/test_predict.py``.
    Directions of one layer are not independent, so it understates the uncertainty of a description
    of the network: the per-layer slopes show how much the relation differs between layers.
    """
    from scipy.stats import norm

    h = np.asarray(curvature, dtype=np.float64).ravel()
    c = np.asarray(variance, dtype=np.float64).ravel()
    keep = (h > floor) & (c > floor)
    n = int(keep.sum())
    if n < 3:
        return {"gamma": None, "interval": None, "level": level, "directions": n}
    x, y = np.log(h[keep]), np.log(c[keep])
    xc = x - x.mean()
    sxx = float(np.sum(xc * xc))
    if sxx <= 0:
        return {"gamma": None, "interval": None, "level": level, "directions": n}
    gamma = float(np.sum(xc * (y - y.mean())) / sxx)
    intercept = float(y.mean() - gamma * x.mean())
    resid = y - intercept - gamma * x
    se = math.sqrt(n / (n - 2) * float(np.sum(xc * xc * resid * resid)) / sxx**2)
    z = float(norm.ppf(0.5 + level / 2))
    return {
        "gamma": gamma,
        "interval": [gamma - z * se, gamma + z * se],
        "standard_error": se,
        "level": level,
        "log_intercept": intercept,
        "rms_log_residual": float(np.sqrt(np.mean(resid * resid))),
        "directions": n,
    }
