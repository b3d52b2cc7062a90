"""How close K-FAC comes: K-FAC, EKFAC and the exact GGN of one model on the same examples (seed E.1).

Seed E.1 reads the K-FAC spectrum because it "may shed light upon the true eigenspectrum". For the
model at a checkpoint step and ``N`` examples this module puts side by side

* **K-FAC** ``blockdiag(S_l ⊗ A_l)`` (:class:`~curvlab.analysis.operators.KFACOperator`) — exact
  spectrum (:class:`~curvlab.analysis.spectrum.KroneckerSpectrum`), top-k eigenpairs from the KFE;
* **EKFAC** in the same basis with the GGN's own second moments ``Λ_ij = diag(Q^T G Q)``
  (:func:`curvlab.analysis.gradcov.project_gradients`, exact or Monte-Carlo route) — the best diagonal
  in the KFE (George et al. 2018);
* **the exact GGN** ``(1/N) Σ J^T H J`` (:class:`~curvlab.analysis.ggn.GGNOperator`, including the
  blocks between layers K-FAC drops): top-k by Lanczos (residual ``<= tol · λ_max``), the spectral
  measure by SLQ with the Chen-Trogdon-Ubaru guarantee ``W1 <= t λ_max`` (probability ``1 − η``), the
  trace by Hutchinson (± SE).

**Distances between spectra** (each spectrum as the distribution of its ``D`` eigenvalues):
``KS = sup_{x >= floor} |F_1(x) − F_2(x)|`` (evaluated at every SLQ node and at ``levels`` quantiles
of the other spectrum; below ``floor · λ_max`` both are numerical null space);
``W1 = ∫ |F_1^-1(u) − F_2^-1(u)| du`` on the linear scale, divided by the GGN's ``λ_max`` (the unit
of SLQ's guarantee: the true distance lies within ``± t`` of the reported one), and on
``log10 max(λ, floor · λ_max)`` (decades; eigenvalues below the floor count as the floor), both by
the midpoint rule on ``levels`` quantile levels. The SLQ-based figures carry a bootstrap standard
error over the probes.

**Top-k**: relative errors ``|λ_i − λ_i^GGN| / λ_i^GGN`` of the ``i``-th largest, and the subspace
overlap ``‖U_GGN^T U‖_F² / k`` of the top-k eigenvectors (1: the same subspace; a random one gets
``k / D``).

**Per layer**: the relative Frobenius error ``‖G_ll − K_l‖_F / ‖G_ll‖_F`` of the layer's diagonal
block, where it has at most ``max_block`` rows: ``G_ll = (1/N) Σ_n Σ_c g_nc g_nc^T`` with ``g_nc =
J_n^T b_nc`` the per-example gradients along the columns ``b_nc`` of the loss Hessian's square root
(exact, ``torch.func.vmap``; one pass per class and label location, so by default only for models
with at most 100 of them, the line ``--fisher auto`` draws).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from curvlab.analysis.ggn import GGNOperator
from curvlab.analysis.lanczos import SpectralDensity, extreme_eigenpairs, hutchinson, slq
from curvlab.analysis.operators import EKFACOperator, FactorBasis, KFACOperator


@dataclass
class ComparisonResult:
    """The JSON summary and what the plot needs."""

    summary: dict[str, Any]
    kfac: Any  # KroneckerSpectrum
    ekfac: Any  # KroneckerSpectrum
    ggn: SpectralDensity
    top: dict[str, np.ndarray]


def _quantiles_of_atoms(nodes: np.ndarray, weights: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Inverse CDF of a discrete measure (sorted ``nodes``) at ``levels`` in (0, 1)."""
    cum = np.cumsum(weights)
    cum /= cum[-1]
    return nodes[np.minimum(np.searchsorted(cum, levels, side="left"), len(nodes) - 1)]


def _distances(qa: np.ndarray, qb: np.ndarray, scale: float, floor: float) -> tuple[float, float]:
    """``(W1 / scale, W1 of log10 max(·, floor))`` between two quantile functions on the same levels."""
    w1 = float(np.mean(np.abs(qa - qb))) / scale
    la, lb = np.log10(np.maximum(qa, floor)), np.log10(np.maximum(qb, floor))
    return w1, float(np.mean(np.abs(la - lb)))


def spectrum_vs_density(
    spectrum: Any,
    density: SpectralDensity,
    *,
    scale: float,
    floor: float,
    levels: int = 2048,
    bootstrap: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """KS and W1 (linear / ``scale``, and log10) between an exact spectrum and an SLQ measure, with
    bootstrap standard errors over the SLQ probes (module docstring)."""
    u = (np.arange(levels) + 0.5) / levels
    q_exact = spectrum.quantiles(u)
    nodes, weights = density.atoms()
    points = np.unique(np.concatenate([nodes, q_exact, [floor]]))
    points = points[points >= floor]  # below the floor is the numerical null space of both
    f_exact = 1.0 - spectrum.count_above(points) / spectrum.count

    def figures(nodes: np.ndarray, weights: np.ndarray) -> tuple[float, float, float]:
        cum = np.concatenate([[0.0], np.cumsum(weights) / weights.sum()])
        f_slq = cum[np.searchsorted(nodes, points, side="right")]
        ks = float(np.max(np.abs(f_exact - f_slq)))
        w1, w1_log = _distances(q_exact, _quantiles_of_atoms(nodes, weights, u), scale, floor)
        return ks, w1, w1_log

    ks, w1, w1_log = figures(nodes, weights)
    out: dict[str, Any] = {"ks": ks, "w1_over_lambda_max": w1, "w1_log10": w1_log}
    probes = len(density.nodes)
    if probes >= 2 and bootstrap:
        rng = np.random.default_rng(seed)
        draws = np.array([figures(*density.atoms(rng.integers(0, probes, probes))) for _ in range(bootstrap)])
        out.update(
            {
                "ks_se": float(draws[:, 0].std(ddof=1)),
                "w1_over_lambda_max_se": float(draws[:, 1].std(ddof=1)),
                "w1_log10_se": float(draws[:, 2].std(ddof=1)),
            }
        )
    return out


def spectrum_vs_spectrum(
    a: Any, b: Any, *, scale: float, floor: float, levels: int = 2048
) -> dict[str, float]:
    """KS (at ``levels`` quantiles of each) and W1 (linear / ``scale``, log10) between two exact spectra."""
    u = (np.arange(levels) + 0.5) / levels
    qa, qb = a.quantiles(u), b.quantiles(u)
    points = np.unique(np.concatenate([qa, qb, [floor]]))
    points = points[points >= floor]
    ks = float(np.max(np.abs(a.count_above(points) / a.count - b.count_above(points) / b.count)))
    w1, w1_log = _distances(qa, qb, scale, floor)
    return {"ks": ks, "w1_over_lambda_max": w1, "w1_log10": w1_log}


def top_k_figures(values: np.ndarray, vectors: Tensor, ggn_values: np.ndarray, ggn_vectors: Tensor) -> dict:
    k = min(len(values), len(ggn_values))
    rel = np.abs(values[:k] - ggn_values[:k]) / np.maximum(ggn_values[:k], np.finfo(float).tiny)
    overlap = float((ggn_vectors[:, :k].T @ vectors[:, :k].to(ggn_vectors.dtype)).pow(2).sum()) / k
    return {
        "values": [float(v) for v in values[:k]],
        "relative_errors": [float(r) for r in rel],
        "median_relative_error": float(np.median(rel)),
        "subspace_overlap": overlap,
    }


def dense_blocks(
    model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]], layout: Any, names: Sequence[str]
) -> dict[str, Tensor]:
    """The exact GGN's diagonal blocks ``G_ll`` of ``names`` (module docstring), in ``vec W`` coordinates."""
    from torch.func import functional_call, grad, vmap

    from curvlab.capture.loss import logit_gradient_samples

    sources = layout.sources()
    params = {k: v.detach() for k, v in model.named_parameters()}
    name_of = {id(p): k for k, p in model.named_parameters()}
    keys = {}
    for name in names:
        source, adapter = sources[name]
        weight, bias = adapter.parameters(source)
        keys[name] = (name_of[id(weight)], None if bias is None else name_of[id(bias)])
    blocks = {
        name: torch.zeros(layout.index[name].size, layout.index[name].size, dtype=torch.float64)
        for name in names
    }

    def projected(p: dict, x: Tensor, u: Tensor) -> Tensor:
        return (functional_call(model, p, (x[None],))[0] * u).sum()

    per_example = vmap(grad(projected), in_dims=(None, 0, 0))
    count = 0
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for x, _ in batches:
        logits = model(x).detach()
        for u, weight in logit_gradient_samples(logits, None, "exact"):
            with sdpa_kernel(SDPBackend.MATH):
                g = per_example(params, x, u)
            for name in names:
                source, adapter = sources[name]
                wk, bk = keys[name]
                mats = (
                    torch.stack(
                        [
                            adapter.to_matrix(source, g[wk][i], None if bk is None else g[bk][i])
                            for i in range(x.shape[0])
                        ]
                    )
                    .reshape(x.shape[0], -1)
                    .double()
                )
                blocks[name] += weight * mats.T @ mats
        count += x.shape[0]
    return {name: b / count for name, b in blocks.items()}


def compare_curvatures(
    model: nn.Module,
    batches: Sequence[tuple[Tensor, Tensor]],
    factors: Mapping[str, Any],
    *,
    route: str = "exact",
    mc_samples: int = 8,
    top_k: int = 10,
    accuracy: float = 0.1,
    failure: float = 0.05,
    probes: int | None = None,
    trace_probes: int = 16,
    floor: float = 1e-6,
    max_block: int = 4096,
    max_block_passes: int = 100,
    lanczos_tol: float = 1e-6,
    seed: int = 0,
    progress: bool = False,
) -> ComparisonResult:
    """K-FAC (``factors``), EKFAC and the exact GGN of ``model`` on ``batches``, compared (module docstring).

    ``route``: how EKFAC's second moments are computed (``exact`` or ``mc`` with ``mc_samples``);
    ``max_block``/``max_block_passes``: the dense blocks are built for layers of at most that many weights
    and models of at most that many exact passes (classes × label locations) per batch;
    ``accuracy``/``failure``: SLQ's ``t`` and ``η``; ``floor``: relative to the GGN's ``λ_max``.
    """
    from curvlab.analysis.gradcov import project_gradients

    def note(what: str) -> None:
        if progress:
            import sys

            print(f"compare: {what}", file=sys.stderr, flush=True)

    kfac = KFACOperator(factors, model=model)
    ggn = GGNOperator(model, batches, layout=kfac.layout)
    note("EKFAC second moments in the KFE")
    bases, columns = {}, {}
    for name, (bs, ba) in kfac.bases().items():
        bases[name], columns[name] = _layer_basis(bs, ba)
    stats = project_gradients(model, batches, bases, curvature=route, mc_samples=mc_samples, seed=seed)
    ekfac = EKFACOperator.from_kfac(
        kfac, {name: np.maximum(s.curvature[:, columns[name]], 0.0) for name, s in stats.items()}
    )
    note(f"GGN top-{top_k} by Lanczos")
    top = extreme_eigenpairs(ggn, top_k, tol=lanczos_tol, seed=seed)
    lam_max = float(top.values[0])
    note("GGN spectral density by SLQ")
    density = slq(ggn, accuracy=accuracy, failure=failure, probes=probes, seed=seed + 1)
    note("GGN trace by Hutchinson")
    trace = hutchinson(ggn, trace_probes, seed=seed + 2)
    k_spec, e_spec = kfac.eigenvalues(), ekfac.eigenvalues()
    fl = floor * lam_max
    nodes, weights = density.atoms()
    summary: dict[str, Any] = {
        "dimension": kfac.layout.dim,
        "num_layers": len(kfac.layout.blocks),
        "num_examples": ggn.num_examples,
        "ekfac_route": route,
        "floor": floor,
        "ggn": {
            "lambda_max": lam_max,
            "top_converged": bool(top.converged),
            "top_residuals": [float(r) for r in top.residuals],
            "lanczos_matvecs": top.matvecs,
            "lanczos_matvecs_per_eigenvalue": top.matvecs / len(top.values),
            "slq_steps": density.steps,
            "slq_probes": len(density.nodes),
            "slq_matvecs": density.matvecs,
            "slq_w1_bound_over_range": density.accuracy,
            "slq_failure_probability": density.failure,
            "trace_hutchinson": trace.estimate,
            "trace_hutchinson_se": trace.standard_error,
            "trace_slq": density.trace(),
            "fraction_below_floor": float(weights[nodes < fl].sum()),
        },
    }
    top_values = {"ggn": np.asarray(top.values)}
    for label, op, spec in (("kfac", kfac, k_spec), ("ekfac", ekfac, e_spec)):
        values, vectors = op.top_eigenpairs(top_k)
        top_values[label] = values.cpu().numpy()
        summary[label] = {
            "trace": op.trace(),
            "lambda_max": spec.max(),
            "fraction_below_floor": 1.0 - spec.count_above(np.nextafter(fl, 0)) / spec.count,
            "vs_ggn": spectrum_vs_density(spec, density, scale=lam_max, floor=fl, seed=seed),
            "top_k": top_k_figures(values.cpu().numpy(), vectors, np.asarray(top.values), top.vectors),
        }
    summary["kfac_vs_ekfac"] = spectrum_vs_spectrum(k_spec, e_spec, scale=lam_max, floor=fl)
    note("dense diagonal blocks")
    summary["layers"] = _layer_errors(model, batches, kfac, ekfac, max_block, max_block_passes)
    return ComparisonResult(summary, k_spec, e_spec, density, top_values)


def _layer_basis(bs: FactorBasis, ba: FactorBasis) -> tuple[Any, np.ndarray]:
    """gradcov's :class:`~curvlab.analysis.basis.LayerBasis` of an operator's basis, and where its
    directions' columns go: the operator's column ``i`` is the LayerBasis's column ``columns[i]``.

    A diagonal ``S`` stays a permutation; a blocks ``A`` (``NormAffine``) keeps its ``(C, k, k)``
    eigenvectors, whose columns the LayerBasis takes in block order (``c·k + j``) where the operator
    sorts them by eigenvalue (``order``)."""
    from curvlab.analysis.basis import LayerBasis

    columns = np.arange(ba.size)
    if ba.blocks is not None:
        q_a, values_a = ba.blocks, ba.values[ba.inverse]
        columns = ba.order.cpu().numpy()
    else:
        q_a, values_a = ba.dense(), ba.values
    if bs.q is None and bs.blocks is None:
        return LayerBasis(None, q_a, bs.values, values_a, order_S=bs.order), columns
    return LayerBasis(bs.dense(), q_a, bs.values, values_a), columns


def _layer_errors(
    model: nn.Module,
    batches: Sequence,
    kfac: KFACOperator,
    ekfac: EKFACOperator,
    max_block: int,
    max_passes: int,
) -> list[dict[str, Any]]:
    from curvlab.capture.loss import exact_passes

    with torch.no_grad():
        logits_shape = model(batches[0][0][:1]).shape
    passes = exact_passes(logits_shape)
    rows: list[dict[str, Any]] = []
    fits = [b.name for b in kfac.layout.blocks if b.size <= max_block]
    reason = None
    if passes > max_passes:
        reason = (f"the exact GGN block takes {passes} passes per batch (classes × label locations; "
                  f"at most {max_passes})")
        fits = []
    blocks = dense_blocks(model, batches, kfac.layout, fits) if fits else {}
    for b in kfac.layout.blocks:
        row: dict[str, Any] = {"name": b.name, "module_type": b.module_type, "size": b.size}
        if b.name in blocks:
            G = blocks[b.name]
            eye = torch.eye(b.size, dtype=torch.float64).reshape(b.size, b.m, b.n)
            norm = float(torch.linalg.norm(G))
            for label, op in (("kfac", kfac), ("ekfac", ekfac)):
                K = op._apply({b.name: eye})[b.name].reshape(b.size, b.size)
                row[f"{label}_relative_frobenius_error"] = (
                    float(torch.linalg.norm(G - K)) / norm if norm else None
                )
        else:
            row["kfac_relative_frobenius_error"] = row["ekfac_relative_frobenius_error"] = None
            row["reason"] = reason or f"block of {b.size} rows is above max_block={max_block}"
        rows.append(row)
    return rows
