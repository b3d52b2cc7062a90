"""A run of ``curvlab gradcov`` (seed E.2, Fig. 10): gradient variance against curvature along every
direction of the Kronecker-factored eigenbasis, cross-checked, summarised and written.

* :func:`bases_from_checkpoint`: the KFE (:class:`~curvlab.analysis.gradcov.LayerBasis`) of every layer
  of a checkpoint step, read layer by layer;
* :func:`run_gradcov`: the all-direction statistics of :func:`~curvlab.analysis.gradcov.project_gradients`
  (curvature by route ``exact``, ``mc``, or ``fvp``: gradients only; ``auto``: :func:`auto_route`), plus
  ``v^T F v`` by forward-mode jvp (:func:`curvlab.analysis.curvature.directional_curvature`) on
  ``directions`` directions per layer spread over its K-FAC eigenvalue range (:func:`select_directions`),
  all with the task's loss (:class:`~curvlab.capture.task.Task`);
* :func:`summarize`: the JSON summary — per layer and overall, over the directions where both values
  exceed the numerical floor ``NULL_FLOOR ×`` the largest curvature (:func:`numerical_floor`) and whose
  Monte-Carlo curvature is not noise (relative standard error at most :data:`NOISE_BOUND`; both kinds
  are counted and left out): the Spearman rank correlation, the least-squares slope of ``log10
  variance`` on ``log10 curvature`` with its 95% interval, the offset (median ``log10(variance /
  curvature)``) and the median ``|log10(variance / curvature)|``; and the largest relative error of the
  jvp curvature against the all-direction route, floored at ``1e-8 ×`` the layer's largest
  (:func:`_relative_errors`), with the jvp values' distance from it in standard errors;
* :func:`write_result`: the per-direction results, written atomically (layout in docs/gradcov.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from curvlab.analysis.curvature import directional_curvature
from curvlab.analysis.gradcov import DirectionStatistics, LayerBasis, project_gradients
from curvlab.capture.loss import Loss
from curvlab.capture.task import Task, batch_context, default_task

#: ``--curvature auto`` takes the exact route up to this many backward passes per batch.
AUTO_EXACT_PASSES = 100


def select_directions(kfac_eigenvalues: np.ndarray, count: int) -> list[tuple[int, int]]:
    """``count`` directions ``(i, j)`` spread over the K-FAC eigenvalue range of one layer.

    The largest and the smallest eigenvalue and evenly spaced order statistics between them (in rank,
    which is evenly spaced in quantile), without repeats.
    """
    flat = kfac_eigenvalues.ravel()
    count = min(count, flat.size)
    order = np.argsort(flat, kind="stable")
    picks = np.unique(np.round(np.linspace(0, flat.size - 1, count)).astype(int))
    return [tuple(int(v) for v in np.unravel_index(order[p], kfac_eigenvalues.shape)) for p in picks]



@dataclass
class GradcovResult:
    """Statistics of every layer, and the jvp cross-check on selected directions."""

    layers: dict[str, DirectionStatistics]
    selected: dict[str, list[tuple[int, int]]]
    fvp_curvature: dict[str, np.ndarray]
    route: str
    loss: Loss | None = None  #: the loss whose Fisher gave the curvature (None: softmax cross-entropy)

    def to_json(self) -> dict[str, Any]:
        """The ``curvlab gradcov --json`` summary (:func:`summarize`, with the loss; the command adds the
        files it wrote)."""
        summary = summarize(self)
        if self.loss is not None:
            summary.update({"loss": self.loss.name, "loss_options": self.loss.options()})
        return summary


def bases_from_checkpoint(path: str, step: int, layers: Sequence[str] | None = None) -> dict[str, LayerBasis]:
    """The KFE of every layer (or of the named ones) of a checkpoint step, read layer by layer."""
    from curvlab.io.checkpoint import CheckpointReader

    with CheckpointReader(path) as reader:
        names = reader.layer_names(step) if layers is None else list(layers)
        reader.check_layers(step, names)  # a damaged layer fails before any decomposition
        bases = {}
        for name in names:
            factors = reader.read_factors(step, name)
            bases[name] = LayerBasis.from_factors(factors.S, factors.A)
        return bases


def auto_route(model: nn.Module, batches: Sequence[Any], task: Task | None = None) -> str:
    """``exact`` when the exact Fisher of the task's loss takes at most :data:`AUTO_EXACT_PASSES`
    backward passes per batch (classes × label locations for cross-entropy, output values per example
    for mse and bce, read off the logits of the first batch), else ``mc``."""
    task = default_task(task)
    if not batches:
        return "exact"
    device = next(model.parameters()).device
    with batch_context(0), torch.no_grad():
        inputs, _ = task.split_batch(batches[0])
        logits = task.forward(model, task.move(inputs, device))
    return "exact" if task.loss.exact_passes(logits.shape) <= AUTO_EXACT_PASSES else "mc"


def run_gradcov(
    model: nn.Module,
    batches: Sequence[Any],
    bases: Mapping[str, LayerBasis],
    *,
    route: str,
    directions: int = 4,
    mc_samples: int = 1,
    seed: int = 0,
    progress: bool = False,
    task: Task | None = None,
    rao_blackwell: bool = True,
) -> GradcovResult:
    """All-direction statistics (curvature by ``route``: exact, mc, fvp-only or auto) plus jvp
    curvature on ``directions`` directions per layer spread over the K-FAC eigenvalue range, with the
    loss of ``task`` (default softmax cross-entropy)."""
    task = default_task(task)
    if route == "auto":
        route = auto_route(model, batches, task)
    all_route = None if route == "fvp" else route
    stats = project_gradients(
        model, batches, bases, curvature=all_route, mc_samples=mc_samples, seed=seed, progress=progress,
        task=task,
        rao_blackwell=rao_blackwell,
    )
    selected, fvp = {}, {}
    for name, layer_stats in stats.items():
        picks = select_directions(layer_stats.kfac_eigenvalue, directions) if directions else []
        basis = bases[name]
        vectors = [basis.direction(i, j) for i, j in picks]
        selected[name] = picks
        fvp[name] = (
            directional_curvature(model, name, vectors, batches, task=task).cpu().numpy()
            if picks else np.zeros(0)
        )
    return GradcovResult(stats, selected, fvp, route, task.loss)


def check_bases_fit(model: nn.Module, bases: Mapping[str, LayerBasis], where: str) -> None:
    """Refuse, before any work, an eigenbasis that is not one of the model's entries with factors or
    does not fit its shape (a checkpoint holding a layer the rebuilt model lacks, or a weight_shape
    that differs): one :class:`~curvlab.errors.CheckpointError` line ``where: layer L: ...``."""
    from curvlab.analysis.gradcov import _check_basis, _sources
    from curvlab.errors import CheckpointError

    try:
        for name, (source, adapter) in _sources(model, list(bases)).items():
            _check_basis(name, source, adapter, bases[name])
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc} (was the checkpoint written for this model?)") from None


def check_finite_result(result: GradcovResult, where: str) -> None:
    """Refuse statistics that overflowed (NaN or inf) before anything is summarised or written."""
    from curvlab.errors import CurvlabError

    for name, stats in result.layers.items():
        for key in ("kfac_eigenvalue", "mean", "variance", "second_moment", "curvature"):
            value = getattr(stats, key)
            if value is not None and not np.isfinite(value).all():
                raise CurvlabError(
                    f"{where}: layer {name}: the {key.replace('_', ' ')} of the gradients is not finite "
                    "(NaN or inf): weights or data too large for the model's precision?"
                )
        if name in result.fvp_curvature and not np.isfinite(result.fvp_curvature[name]).all():
            raise CurvlabError(f"{where}: layer {name}: the jvp curvature is not finite (NaN or inf)")


NULL_FLOOR = 1e-12
#: A Monte-Carlo curvature whose standard error exceeds this fraction of its value is noise: its 2-SE
#: interval reaches 0, so the estimate cannot tell the direction's curvature from none at all.
NOISE_BOUND = 0.5


def numerical_floor(curvatures: Sequence[np.ndarray]) -> float:
    """Values below ``NULL_FLOOR`` × the largest curvature are the numerical null space.

    With more directions than examples most KFE directions carry no gradient at all; both their
    variance and their curvature then come out as float64 rounding noise (1e-30 and below), which
    says nothing about ``H ≈ C`` and would dominate a log-log plot. They are counted and left out.
    """
    largest = max((float(np.abs(c).max(initial=0)) for c in curvatures), default=0.0)
    return NULL_FLOOR * largest


def _log_ratio_stats(
    variance: np.ndarray, curvature: np.ndarray, floor: float, se: np.ndarray | None = None
) -> dict[str, Any]:
    """Agreement of variance and curvature over the directions where both exceed the numerical floor
    and the curvature is not Monte-Carlo noise (``se / curvature <= NOISE_BOUND``); the others are
    counted in ``num_excluded_null`` and ``num_noisy``.

    * ``spearman``: rank correlation;
    * ``slope`` (``slope_low``, ``slope_high``): least-squares slope of ``log10 variance`` on ``log10
      curvature`` and its 95% interval (``± 1.96`` standard errors; it treats the directions' residuals
      as independent, so read it as a lower bound on the uncertainty). ``H ≈ C`` up to a constant means
      slope 1;
    * ``offset_log10``: median of ``log10(variance / curvature)`` (the constant factor between them), and
      ``median_abs_log10_ratio``: median of its absolute value (0 means equal).
    """
    from scipy.stats import spearmanr

    v, c = variance.ravel(), curvature.ravel()
    resolved = (v > floor) & (c > floor)
    noisy = np.zeros_like(resolved)
    if se is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            noisy = resolved & (se.ravel() > NOISE_BOUND * c)
    keep = resolved & ~noisy
    out: dict[str, Any] = {"num_directions": int(v.size), "num_excluded_null": int((~resolved).sum()),
                           "num_noisy": int(noisy.sum()), "num_compared": int(keep.sum())}
    none = dict.fromkeys(("spearman", "median_abs_log10_ratio", "offset_log10", "slope", "slope_low",
                          "slope_high"))
    if keep.sum() < 3:
        return {**out, **none}
    x, y = np.log10(c[keep]), np.log10(v[keep])
    ratio = y - x
    out["spearman"] = float(spearmanr(v[keep], c[keep]).statistic)
    out["median_abs_log10_ratio"] = float(np.median(np.abs(ratio)))
    out["offset_log10"] = float(np.median(ratio))
    xc = x - x.mean()
    sxx = float(xc @ xc)
    if sxx > 0:
        slope = float(xc @ (y - y.mean()) / sxx)
        resid = y - y.mean() - slope * xc
        stderr = float(np.sqrt(resid @ resid / (len(x) - 2) / sxx))
        out.update(slope=slope, slope_low=slope - 1.96 * stderr, slope_high=slope + 1.96 * stderr)
    else:
        out.update(slope=None, slope_low=None, slope_high=None)
    return out


def summarize(result: GradcovResult) -> dict[str, Any]:
    """The JSON summary of ``curvlab gradcov``: agreement of gradient variance and curvature."""
    compared = {name: _compared(result, name, stats) for name, stats in result.layers.items()}
    floor = numerical_floor([c for _, c, _ in compared.values()])
    per_layer = [
        {"name": name, "order": result.layers[name].order, "estimator": result.layers[name].estimator,
         **_log_ratio_stats(v, c, floor, se)}
        for name, (v, c, se) in compared.items()
    ]
    all_v = np.concatenate([v for v, _, _ in compared.values()])
    all_c = np.concatenate([c for _, c, _ in compared.values()])
    all_se = np.concatenate([se for _, _, se in compared.values()])
    summary: dict[str, Any] = {
        "curvature_route": result.route,
        "num_examples": next(iter(result.layers.values())).num_examples if result.layers else 0,
        "null_floor": floor,
        "noise_bound": NOISE_BOUND,
        **_log_ratio_stats(all_v, all_c, floor, all_se),
        "layers": per_layer,
    }
    if result.route != "fvp":
        errors = [
            _relative_errors(result.fvp_curvature[name], np.array([s.curvature[i, j] for i, j in picks]))
            for name, s in result.layers.items()
            if (picks := result.selected[name])
        ]
        summary["fvp_vs_" + result.route + "_max_rel_err"] = (
            float(max(e.max() for e in errors)) if errors else None
        )
        if result.route == "mc":
            summary["fvp_check"] = _fvp_check(result)
    return summary


def _fvp_check(result: GradcovResult) -> list[dict[str, Any]]:
    """Per layer: the jvp values against the mc route in standard errors, ``|fvp − mc| / SE``, over the
    selected directions (the flattest decile among them counted), and how many lie within 3 SE. Where the
    SE is below ``1e-8 ×`` the value (exact, e.g. a tied row whose token is not in the inputs: the closed
    form alone) the difference is measured against that rounding level instead."""
    out = []
    for name, stats in result.layers.items():
        picks = result.selected[name]
        if not picks or stats.curvature_se is None:
            continue
        fvp = result.fvp_curvature[name]
        mc = np.array([stats.curvature[i, j] for i, j in picks])
        se = np.array([stats.curvature_se[i, j] for i, j in picks])
        eig = np.array([stats.kfac_eigenvalue[i, j] for i, j in picks])
        decile = eig <= np.quantile(stats.kfac_eigenvalue, 0.1)
        # an exact value (SE 0: the closed form alone) is judged to float64 rounding, as _relative_errors
        tolerance = np.maximum(se, 1e-8 * np.maximum(np.abs(fvp), np.abs(mc)))
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.abs(fvp - mc) / tolerance
        out.append({
            "name": name, "directions": len(picks), "flattest_decile": int(decile.sum()),
            "within_3se": int((z <= 3).sum()), "max_z": float(np.nanmax(z)) if np.isfinite(z).any() else None,
            "max_rel_err": float(np.max(np.abs(fvp - mc) / np.maximum(np.abs(fvp), 1e-300))),
        })
    return out


def _relative_errors(fvp: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """``|fvp − exact| / max(|fvp|, |exact|, 1e-8 · largest)``: relative, except that directions whose
    curvature is below 1e-8 of the layer's largest compared one are measured against that floor.

    Why 1e-8: two float64 routes to ``v^T F v`` agree to about ``eps · ‖F‖ ≈ 1e-16 ·`` largest in
    absolute terms, whatever the direction; relative to a direction's own tiny value that is not
    small (measured: 1e-17 apart on a direction at 1e-14 of the largest, a "relative error" of 1e-3).
    With the floor at 1e-8 · largest, a reported error below 1e-8 means "relative 1e-8, or absolute
    1e-16 of the largest", float64's resolution; a real discrepancy on a small direction still shows
    (100 % off at 1e-9 of the largest reads 0.1)."""
    scale = max(float(np.abs(fvp).max(initial=0)), float(np.abs(exact).max(initial=0)))
    floor = max(1e-8 * scale, np.finfo(float).tiny)
    return np.abs(fvp - exact) / np.maximum(np.maximum(np.abs(fvp), np.abs(exact)), floor)


def _compared(
    result: GradcovResult, name: str, stats: DirectionStatistics
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(variance, curvature, its standard error) over the directions that have a curvature: all, or the
    jvp-selected (exact: SE 0)."""
    if stats.curvature is not None:
        se = stats.curvature_se if stats.curvature_se is not None else np.zeros_like(stats.curvature)
        return stats.variance.ravel(), stats.curvature.ravel(), se.ravel()
    picks = result.selected[name]
    fvp = result.fvp_curvature[name]
    return np.array([stats.variance[i, j] for i, j in picks]), fvp, np.zeros_like(fvp)


def write_result(path: str, result: GradcovResult, attrs: Mapping[str, Any]) -> None:
    """Write the per-direction results atomically (layout in docs/gradcov.md)."""
    import h5py

    from curvlab.io.atomic import atomic_output

    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"] = "curvlab.gradcov"
        f.attrs["format_version"] = 1
        f.attrs["curvature_route"] = result.route
        for key, value in attrs.items():
            f.attrs[key] = value
        group = f.create_group("layers", track_order=True)
        for name, stats in result.layers.items():
            g = group.create_group(name)
            g.attrs["contraction_order"] = stats.order
            g.attrs["num_examples"] = stats.num_examples
            if stats.estimator:
                g.attrs["curvature_estimator"] = stats.estimator
            for key in ("kfac_eigenvalue", "mean", "variance", "second_moment", "curvature", "curvature_se"):
                value = getattr(stats, key)
                if value is not None:
                    g.create_dataset(key, data=value)
            picks = np.array(result.selected[name], dtype=np.int64).reshape(-1, 2)
            g.create_dataset("selected_i", data=picks[:, 0])
            g.create_dataset("selected_j", data=picks[:, 1])
            g.create_dataset("selected_fvp_curvature", data=result.fvp_curvature[name])
