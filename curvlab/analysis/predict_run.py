"""A run of ``curvlab predict``: measure a checkpoint's ingredients with gradcov's machinery, build the
NQMs of :mod:`curvlab.analysis.predict`, and collect everything the prediction file records.

* :func:`training_objective`: the training objective ``L0`` at the checkpoint (the loss's
  ``reduction="mean"``, :meth:`curvlab.capture.loss.Loss.mean`, over all the measured examples), which
  a ``loss=X`` target is mapped with;
* :func:`run_predict`: :func:`curvlab.analysis.gradcov_run.run_gradcov` (all-direction curvature by the
  exact or Monte-Carlo route, plus the jvp cross-check on a few directions per layer) → per-direction
  :class:`~curvlab.analysis.predict.Measurements` → noise scales, the ``c ∝ h^γ`` fit, and per NQM
  variant the tuned steps against the batch size with their ``S(B)`` fits;
* :class:`Prediction`: the result; :meth:`Prediction.to_json` is the prediction file's body (docs/predict.md
  adds what the command records around it: the checkpoint's sha256, the options, the time).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from curvlab.analysis.gradcov_run import GradcovResult, run_gradcov
from curvlab.analysis.predict import (
    OPTIMIZERS,
    VARIANTS,
    Curve,
    Measurements,
    fit_noise_exponent,
    measured_problem,
    noise_histogram,
    noise_scales,
    predict_curves,
    target_fraction,
)
from curvlab.capture.task import Task, batch_context, default_task

FORMAT = "curvlab.predict"
FORMAT_VERSION = 1


def training_objective(model: nn.Module, batches: Sequence[Any], task: Task | None = None) -> float:
    """``Σ_n ℓ_n / K`` over all batches (``K`` the counted loss terms): the objective ``curvlab train``
    minimises and ``curvlab sweep``'s ``loss=X`` target measures, in the model's current mode."""
    task = default_task(task)
    device = next(model.parameters()).device
    total, terms = 0.0, 0
    with torch.no_grad():
        for k, batch in enumerate(batches):
            with batch_context(k):
                inputs, labels = task.split_batch(batch)
                logits = task.forward(model, task.move(inputs, device))
                labels = task.loss.check(logits, task.move(labels, device))
                total += float(task.loss.per_example(logits, labels).double().sum())
                terms += task.loss.num_terms(logits, labels)
    return total / terms if terms else float("nan")


@dataclass
class Prediction:
    """Everything a prediction found (see the module docstring)."""

    measurements: Measurements
    gradcov: GradcovResult
    initial_loss: float
    target: str
    loss_floor: float
    fraction: float
    scales: dict[str, Any]
    noise_exponent: dict[str, Any]
    problems: dict[str, dict[str, Any]]
    curves: dict[str, dict[str, Curve]]
    batch_sizes: list[int]
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        meas = self.measurements
        summary = self.gradcov.to_json()
        checks = {k: v for k, v in summary.items() if k.endswith("_max_rel_err")}
        predictors: dict[str, Any] = {}
        for variant, curves in self.curves.items():
            predictors[variant] = {
                **self.problems[variant],
                "optimizers": {name: curve.to_json() for name, curve in curves.items()},
            }
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "measured": {
                "num_examples": meas.num_examples,
                "population": meas.population,
                "layers": [{"name": n, "directions": k} for n, k in meas.layers],
                "curvature_route": self.gradcov.route,
                "spearman_variance_curvature": summary.get("spearman"),
                **checks,
            },
            "initial_loss": self.initial_loss,
            "target": {"spec": self.target, "loss_floor": self.loss_floor, "fraction": self.fraction},
            "batch_sizes": self.batch_sizes,
            "noise_scales": self.scales,
            "noise_exponent": self.noise_exponent,
            "predictors": predictors,
            "b_crit": self.b_crit_table(),
            "seconds": self.seconds,
        }

    def b_crit_table(self) -> dict[str, Any]:
        """Every predictor's critical batch size: per NQM variant and optimizer, and B_simple, B_noise."""
        table: dict[str, Any] = {
            v: {o: c.b_crit for o, c in curves.items()} for v, curves in self.curves.items()
        }
        table["b_simple"] = self.scales.get("b_simple")
        table["b_noise"] = self.scales.get("b_noise")
        return table


def run_predict(
    model: nn.Module,
    batches: Sequence[Any],
    bases: Mapping[str, Any],
    *,
    target: str,
    batch_sizes: Sequence[int],
    optimizers: Sequence[str] = tuple(OPTIMIZERS),
    variants: Sequence[str] = tuple(VARIANTS),
    population: int | None = None,
    loss_floor: float = 0.0,
    route: str = "exact",
    directions: int = 2,
    mc_samples: int = 4,
    seed: int = 0,
    lr_grid: int = 100,
    decay_grid: int = 20,
    t_max: int = 10**9,
    mode: str = "exact",
    bins: int = 100,
    progress: bool = False,
    task: Task | None = None,
) -> Prediction:
    """Measure, build the NQMs and predict (module docstring). ``route``: ``exact``, ``mc`` or ``auto``
    (gradcov's); the model is used as it is (eval mode, its dtype and device)."""
    from curvlab.analysis.predict import PredictError

    if route == "fvp":
        raise PredictError(
            "the prediction needs the curvature of every direction: use --curvature exact, "
            "mc or auto, not fvp"
        )
    task = default_task(task)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    result = run_gradcov(
        model,
        batches,
        bases,
        route=route,
        directions=directions,
        mc_samples=mc_samples,
        seed=seed,
        progress=progress,
        task=task,
    )
    initial = training_objective(model, batches, task)
    seconds["measure"] = time.perf_counter() - start
    meas = Measurements.from_statistics(result.layers, population)
    fraction = target_fraction(target, initial, loss_floor)
    scales = noise_scales(meas)
    floor = meas.null_floor()
    exponent = fit_noise_exponent(meas.curvature, meas.variance, floor)
    layer_index = meas.layer_of()
    exponent["layers"] = {
        name: fit_noise_exponent(meas.curvature[layer_index == k], meas.variance[layer_index == k], floor)
        for k, (name, _) in enumerate(meas.layers)
    }
    exponent["histogram"] = noise_histogram(meas.curvature, meas.variance, floor)
    start = time.perf_counter()
    problems, curves = {}, {}
    for variant in variants:
        mapped = measured_problem(meas, variant)
        problems[variant] = mapped.info
        curves[variant] = predict_curves(
            mapped,
            fraction,
            batch_sizes,
            optimizers,
            population=population,
            lr_grid=lr_grid,
            decay_grid=decay_grid,
            t_max=t_max,
            mode=mode,
            bins=bins,
            progress=progress,
        )
    seconds["nqm"] = time.perf_counter() - start
    return Prediction(
        meas,
        result,
        initial,
        target,
        loss_floor,
        fraction,
        scales,
        exponent,
        problems,
        curves,
        [int(b) for b in batch_sizes],
        seconds,
    )
