"""The README's benchmark table, generated from ``benchmarks/results/*.json`` (no number typed by hand).

``python -m benchmarks.report`` prints Markdown rows; ``make bench`` runs the benchmarks first.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.harness import RESULTS


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def factor_capture(d: dict) -> str:
    t = {k: v["median_s"] for k, v in d["timings"].items()}
    r = d["ratios"]
    return (
        "| factor capture: ResNet8, 2,048 CIFAR-shaped inputs, batch 256, MC Fisher | "
        f"curvlab {t['curvlab']:.2f} s = **{r['curvlab_over_floor']:.2f}×** the floor (gradient pass "
        f"{t['gradient_pass']:.2f} s + covariance products {t['covariance_products']:.2f} s) | "
        f"curvlinops {t['curvlinops']:.2f} s = **{r['curvlinops_over_curvlab']:.2f}×** curvlab; "
        f"factors agree to {d['convention_max_rel_err']:.1e} |"
    )


def factor_capture_attention(d: dict) -> str:
    t = {k: v["median_s"] for k, v in d["timings"].items()}
    c = d["coverage"]
    return (
        "| factor capture: Transformer with nn.MultiheadAttention + LayerNorm + tied head, 256 × 64 tokens, "
        f"batch 32, MC Fisher | curvlab {t['curvlab']:.2f} s = **{d['ratios']['curvlab_over_floor']:.2f}×** "
        f"the floor (gradient pass {t['gradient_pass']:.2f} s + covariance products "
        f"{t['covariance_products']:.2f} s); coverage {c['covered_parameters']:,} of "
        f"{c['total_parameters']:,} parameters | no peer timed |"
    )


def spectrum(d: dict) -> str:
    parts = []
    for name, case in d["cases"].items():
        r = case["ratios"]
        parts.append(
            f"{name} ({case['num_eigenvalues']:,} eigenvalues): curvlab "
            f"**{r['curvlab_over_raw_eigh']:.2f}×** the raw eigendecompositions, "
            f"scipy loop {r['scipy_loop_over_curvlab']:.2f}× curvlab"
        )
    return (
        "| spectrum: read + eigh + Kronecker statistics + write | "
        + "; ".join(parts)
        + " | see JSON for memory |"
    )


def gradcov(d: dict) -> str:
    parts = []
    for name, m in d["models"].items():
        q = m["ratios"]
        parts.append(
            f"{name}: vmap(grad) **{q['vmap_grad_over_curvlab_time']:.1f}×** time and "
            f"**{q['vmap_grad_over_curvlab_memory']:.1f}×** memory of curvlab, BackPACK "
            f"{q['backpack_over_curvlab_time']:.1f}× / {q['backpack_over_curvlab_memory']:.1f}×; "
            f"one v^T F v = {q['one_vFv_over_gradient_pass']:.2f}× a gradient pass"
        )
    return (
        "| gradcov: all-direction KFE variance, 1,024 examples | "
        + "; ".join(parts)
        + " | same sums to 1e-6 |"
    )


def nqm_sweep(d: dict) -> str:
    return (
        "| NQM Fig. 14c sweep: tuned momentum, exact mode, 80,000 (lr, momentum, B, p) points | "
        f"curvlab {d['curvlab_s']:.1f} s | reference loop ~{d['reference_full_s_extrapolated']:.0f} s "
        f"(extrapolated from {d['reference_subset']['pairs']} pairs) = "
        f"**{d['speedup_vs_reference_extrapolated']:.0f}×**; same answers on the subset: "
        f"{d['same_best_on_subset']} |"
    )


def train_step(d: dict) -> str:
    parts = [
        f"{name}: K-FAC **{r['kfac_over_sgd_time']:.1f}×** SGD+momentum per step "
        f"({r['kfac_s_per_step'] * 1e3:.0f} ms), factor state {r['factor_state_mb']:.1f} MB "
        f"({r['factor_state_over_parameters']:.1f}× the parameters)"
        for name, r in d["models"].items()
    ]
    return "| training step: K-FAC vs SGD with momentum | " + "; ".join(parts) + " | |"


def distributed(d: dict) -> str:
    by = {(c["processes"], c["threads_per_process"]): c["median_s"] for c in d["configurations"]}
    return (
        "| factor capture in 2 processes (torchrun, gloo) vs 1: ResNet8, 2,048 inputs, batch 128 | "
        f"2 processes × 1 thread {by[(2, 1)]:.2f} s: **{d['speedup_2proc_vs_1x1']:.2f}×** faster than 1 × 1 "
        f"thread ({by[(1, 1)]:.2f} s), scaling efficiency **{d['scaling_efficiency']:.2f}**; all-reduce "
        f"{100 * d['all_reduce_share']:.1f}% of the run | 1 process × 2 threads {by[(1, 2)]:.2f} s "
        f"(2 processes are {d['speedup_2proc_vs_1x2']:.2f}× its speed); factors agree to "
        f"{d['factors_max_rel_diff_2proc_vs_1proc']:.0e} |"
    )


def sweep(d: dict) -> str:
    r = d["trials_per_hour"]
    return (
        f"| curvlab sweep: {d['work']} | 1 worker **{r['workers_1']:.0f}** trials/h, 2 workers "
        f"**{r['workers_2']:.0f}** trials/h: scaling efficiency "
        f"**{d['scaling_efficiency_2_workers']:.2f}** | "
        f"trials without Optuna {r['direct']:.0f} trials/h: the study database costs "
        f"{d['db_overhead_s_per_trial']:.3f} s per trial ({100 * d['db_overhead_share_of_trial']:.1f}% of a "
        "trial) |"
    )


def operators(d: dict) -> str:
    p, q = d["products"], d["lanczos"]
    r = p["ratios"]
    return (
        f"| K-FAC operator: one product and one exact damped inverse, ResNet8 ({p['dimension']:,} weights, "
        f"float32); Lanczos top-10 of the exact GGN ({q['dimension']:,} weights) | product "
        f"{p['timings']['curvlab_product']['median_s'] * 1e3:.1f} ms, inverse "
        f"{p['timings']['curvlab_inverse']['median_s'] * 1e3:.1f} ms; Lanczos "
        f"**{q['curvlab']['matvecs_per_eigenvalue']:.1f}** GGN products per eigenvalue | curvlinops product "
        f"**{r['curvlinops_over_curvlab_product']:.2f}×**, inverse "
        f"**{r['curvlinops_over_curvlab_inverse']:.2f}×** curvlab (same factors, outputs agree to "
        f"{max(p['max_rel_diff_float64'].values()):.0e} in float64); scipy eigsh on curvlinops' GGN "
        f"{q['curvlinops_scipy_eigsh']['matvecs_per_eigenvalue']:.1f} products per eigenvalue, "
        f"eigenvalues agree to {q['max_rel_diff_eigenvalues']:.0e} |"
    )


def predict(d: dict) -> str:
    t, r = d["seconds"], d["ratios"]
    return (
        f"| curvlab predict vs the sweep it predicts: {d['work']} | predict {t['predict']:.1f} s (measuring "
        f"{t['predict_measure']:.1f} s, NQM {t['predict_nqm']:.1f} s) = "
        f"**{r['predict_over_sweep']:.2f}×** the sweep; with the factors "
        f"{r['factors_and_predict_over_sweep']:.2f}× | sweep {t['sweep']:.1f} s |"
    )


ROWS = {
    "factor_capture": factor_capture,
    "factor_capture_attention": factor_capture_attention,
    "spectrum": spectrum,
    "gradcov": gradcov,
    "nqm_sweep": nqm_sweep,
    "train_step": train_step,
    "distributed": distributed,
    "sweep": sweep,
    "operators": operators,
    "predict": predict,
}


def table() -> str:
    lines = ["| benchmark | curvlab | baseline / peer |", "|---|---|---|"]
    for name, row in ROWS.items():
        data = _load(name)
        if data is not None:
            lines.append(row(data))
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
    print(f"\n(from {Path(RESULTS).as_posix()}/*.json)")
