"""``figures/index.html`` and ``figures/summary.json``: every figure with the paper's claim, the numbers
this run measured, and whether the claim held.

Every number on the page is read from the JSON the analyses wrote next to their figures; the only
constants here are the criteria a claim is judged by, printed on the page with each verdict.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from analyses.config import FIGURES, SCALE, write_json
from analyses.sweep import page_entry as sweep_entry


def _load(name: str) -> dict[str, Any] | None:
    path = FIGURES / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y on log x."""
    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    num = sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True))
    den = sum((a - mx) ** 2 for a in lx)
    return num / den


def _critical_batch(batch_sizes: list[int], steps: list[float]) -> int | None:
    """First batch size whose steps exceed twice perfect linear scaling from the smallest batch."""
    b0, s0 = batch_sizes[0], steps[0]
    for b, s in zip(batch_sizes, steps, strict=True):
        if s is not None and s >= 2 * s0 * b0 / b:
            return b
    return None


def fig09() -> dict[str, Any]:
    data = _load("fig09")
    if not data:
        return {}
    steps = data["steps"]
    late = [s for s in steps if s["step"] >= 50] or steps[-2:]
    drift = 0.0
    if len(late) >= 2:
        a, b = late[-2]["quantiles"], late[-1]["quantiles"]
        drift = max(abs(math.log10(b[q] / a[q])) for q in ("0.1", "0.5", "0.9") if a[q] > 0 and b[q] > 0)
    top_over_median = [s["max"] / s["quantiles"]["0.5"] for s in steps if s["quantiles"]["0.5"] > 0]
    return {
        "claim": "Only a few large and a few small eigenvalues, the bulk in the middle; after 200 "
        "iterations the eigenspectrum remains mostly unchanged.",
        "measured": {
            "steps": [s["step"] for s in steps],
            "num_eigenvalues": steps[-1]["num_eigenvalues"],
            "max_over_median_last_step": top_over_median[-1] if top_over_median else None,
            "max_abs_log10_quantile_change_between_last_two_late_steps": drift,
        },
        "criterion": "the 10/50/90% quantiles of the last two saved steps from step 50 on differ by "
        "less than a factor of 3 (|log10| < 0.5)",
        "held": bool(drift < 0.5) if len(late) >= 2 else None,
    }


def fig10(panel: str) -> dict[str, Any]:
    data = _load(f"fig10{panel}")
    if not data:
        return {}
    measured = {
        k: data.get(k)
        for k in ("num_directions", "num_excluded_null", "spearman", "median_abs_log10_ratio",
                  "fvp_vs_exact_max_rel_err", "fvp_vs_mc_max_rel_err", "num_examples", "skipped_layers")
        if k in data
    }
    # per layer, so that one layer's disagreement (e.g. the tied embedding's rare tokens, whose
    # Monte-Carlo curvature is very noisy) is visible next to the aggregate
    measured["spearman_by_layer"] = {
        layer["name"]: layer.get("spearman") for layer in data.get("layers", []) if "name" in layer
    }
    return {
        "claim": "Gradient variances closely match the curvature along the Kronecker-factored "
        "eigenbasis (H ≈ C), especially for ResNet8.",
        "measured": measured,
        "criterion": "Spearman rank correlation > 0.9 and median |log10(variance/curvature)| < 0.5",
        "held": bool((data.get("spearman") or 0) > 0.9 and (data.get("median_abs_log10_ratio") or 9) < 0.5),
    }


def fig11() -> dict[str, Any]:
    data = _load("fig11")
    if not data:
        return {}
    return {
        "claim": "The convergence of momentum SGD closely matches plain SGD at the effective learning "
        "rate α/(1−β).",
        "measured": {k: data[k] for k in ("alpha_h", "steps", "max_abs_difference") if k in data},
        "criterion": "see the plotted curves (normalised first term of eq. 6)",
        "held": None,
    }


def fig12() -> dict[str, Any]:
    data = _load("fig12")
    if not data:
        return {}
    low, high = data.get("ci_low"), data.get("ci_high")
    return {
        "claim": "The K-FAC eigenspectrum of ResNet8 closely matches the 1/i distribution of the NQM.",
        "measured": {
            k: data.get(k) for k in ("exponent", "ci_low", "ci_high", "window", "ks", "exponent_ols")
        },
        "criterion": "fitted exponent within 0.25 of 1",
        "held": bool(abs(data["exponent"] - 1) < 0.25) if data.get("exponent") is not None else None,
        "interval_contains_1": bool(low <= 1 <= high) if low is not None and high is not None else None,
    }


def fig13() -> dict[str, Any]:
    data = _load("fig13")
    if not data:
        return {}
    sizes = data["batch_sizes"]
    critical = {
        str(t): _critical_batch(sizes, s) for t, s in zip(data["thresholds"], data["steps"], strict=True)
    }
    first_ratio = [s[0] / s[1] for s in data["steps"]]
    values = [c for c in critical.values() if c is not None]
    return {
        "claim": "Increasing the batch size first cuts the steps proportionally, then with diminishing "
        "returns; the critical batch size grows for harder thresholds.",
        "measured": {"critical_batch_size_by_threshold": critical, "steps_ratio_first_doubling": first_ratio},
        "criterion": "first doubling of B cuts steps by 1.8–2.2×; critical batch size (steps ≥ 2× perfect "
        "scaling) does not decrease as the threshold gets harder",
        "held": bool(
            all(1.8 <= r <= 2.2 for r in first_ratio)
            and values == sorted(values)
            and len(values) == len(critical)
        ),
    }


def fig14(panel: str) -> dict[str, Any]:
    data = _load(f"fig14{panel}")
    if not data:
        return {}
    sizes = data["batch_sizes"]
    slopes = [_slope(sizes[:4], lr[:4]) for lr in data["optimal_lr"]]
    tails = [_slope(sizes[-4:], lr[-4:]) for lr in data["optimal_lr"]]
    return {
        "claim": "The optimal learning rate grows with the batch size until it is capped by stability; "
        "larger preconditioning powers extend the batch size where it levels off.",
        "measured": {
            "powers": data["powers"],
            "log_log_slope_smallest_batches": slopes,
            "log_log_slope_largest_batches": tails,
        },
        "criterion": "slope in log-log of the optimal rate over the 4 smallest batch sizes within 0.7–1.3, "
        "and below 0.3 over the 4 largest",
        "held": bool(all(0.7 <= s <= 1.3 for s in slopes) and all(t < 0.3 for t in tails)),
    }


def fig15() -> dict[str, Any]:
    data = _load("fig15")
    if not data:
        return {}
    sizes = data.get("batch_sizes")
    finals = data.get("final_lr")
    # the scaling regime: the batch sizes below the first one whose final rate reaches half the largest
    # final rate (beyond it the rate is capped by stability, as for a constant rate)
    cap = next((k for k, f in enumerate(finals or []) if f >= 0.5 * max(finals)), None) if finals else None
    slope = _slope(sizes[:cap], finals[:cap]) if cap and cap >= 2 else None
    return {
        "claim": "The final learning rate of the optimised piecewise-constant schedule scales linearly "
        "with the batch size.",
        "measured": {
            "log_log_slope_scaling_regime": slope,
            "scaling_regime_batch_sizes": sizes[:cap] if cap else None,
        },
        "criterion": "log-log slope of final rate vs batch size within 0.7–1.3 over the batch sizes whose "
        "final rate is below half the largest (above, stability caps it)",
        "held": bool(0.7 <= slope <= 1.3) if slope is not None else None,
    }


def kfac_vs_ggn(name: str) -> dict[str, Any]:
    data = _load(f"kfac_vs_ggn_{name}")
    if not data:
        return {}
    k, e, g = data["kfac"], data["ekfac"], data["ggn"]
    return {
        "claim": "The K-FAC eigenspectrum may shed light upon the true (Fisher = GGN) eigenspectrum "
        "(seed E.1).",
        "measured": {
            "kfac_top_k_median_relative_error": k["top_k"]["median_relative_error"],
            "ekfac_top_k_median_relative_error": e["top_k"]["median_relative_error"],
            "kfac_top_k_subspace_overlap": k["top_k"]["subspace_overlap"],
            "kfac_vs_ggn": k["vs_ggn"], "ekfac_vs_ggn": e["vs_ggn"],
            "slq_w1_bound_over_lambda_max": g["slq_w1_bound_over_range"],
            "trace_ggn_hutchinson": [g["trace_hutchinson"], g["trace_hutchinson_se"]],
            "trace_kfac": k["trace"],
            "fraction_below_floor": {"ggn": g["fraction_below_floor"], "kfac": k["fraction_below_floor"]},
            "relative_frobenius_error_by_layer": {
                r["name"]: r["kfac_relative_frobenius_error"] for r in data["layers"]
            },
        },
        "criterion": "K-FAC's top eigenvalues within a factor 2 of the GGN's (median relative error < 0.5) "
        "and KS distance between the two spectra above the floor < 0.2",
        "held": bool(k["top_k"]["median_relative_error"] < 0.5 and k["vs_ggn"]["ks"] < 0.2),
    }


FIGURES_ON_PAGE = [
    ("fig09", "Fig. 9 — K-FAC eigenspectra of ResNet8 at several training iterations", fig09),
    ("fig10a", "Fig. 10a — gradient variance vs curvature, ResNet8", lambda: fig10("a")),
    ("fig10b", "Fig. 10b — gradient variance vs curvature, shallow Transformer (tied embedding included)",
     lambda: fig10("b")),
    ("fig11", "Fig. 11 — momentum vs SGD at the effective learning rate (NQM)", fig11),
    ("fig12", "Fig. 12 — K-FAC eigenspectrum vs the 1/i law", fig12),
    ("fig13", "Fig. 13 — steps to target vs batch size (NQM)", fig13),
    ("fig14a", "Fig. 14a — optimal learning rate vs batch size, no momentum (NQM)", lambda: fig14("a")),
    ("fig14b", "Fig. 14b — optimal effective learning rate, momentum 0.9 (NQM)", lambda: fig14("b")),
    ("fig14c", "Fig. 14c — optimal effective learning rate, tuned momentum (NQM)", lambda: fig14("c")),
    ("fig15", "Fig. 15 — final rate of the piecewise-constant schedule (NQM)", fig15),
    ("sweep_mlp", "Steps to target vs batch size, mlp on digits (curvlab sweep)", lambda: sweep_entry("mlp")),
    ("kfac_vs_ggn_resnet8", "K-FAC vs the exact GGN, ResNet8 (seed E.1's question)",
     lambda: kfac_vs_ggn("resnet8")),
    ("kfac_vs_ggn_transformer", "K-FAC vs the exact GGN, shallow Transformer",
     lambda: kfac_vs_ggn("transformer")),
]


def _verdict(held: bool | None) -> str:
    return {True: "held", False: "did not hold", None: "not judged automatically"}[held]


def build() -> dict[str, Any]:
    summary: dict[str, Any] = {"scale": SCALE, "figures": {}}
    sections = []
    for name, title, fn in FIGURES_ON_PAGE:
        png = FIGURES / f"{name}.png"
        if not png.exists():
            summary["figures"][name] = {"produced": False}
            sections.append(f"<section><h2>{html.escape(title)}</h2><p>Not produced in this run.</p>")
            sections.append("</section>")
            continue
        entry = {"produced": True, "image": png.name, **fn()}
        summary["figures"][name] = entry
        measured = html.escape(json.dumps(entry.get("measured", {}), indent=1))
        sections.append(
            f"<section><h2>{html.escape(title)}</h2>"
            f'<img src="{html.escape(png.name)}" alt="{html.escape(title)}">'
            f"<p><b>Paper:</b> {html.escape(entry.get('claim', ''))}</p>"
            f"<p><b>Criterion:</b> {html.escape(entry.get('criterion', ''))} — "
            f"<b>{_verdict(entry.get('held'))}</b></p>"
            f"<details open><summary>Measured</summary><pre>{measured}</pre></details></section>"
        )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>curvlab — appendix figures</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto}img{max-width:100%}"
        "section{border-top:1px solid #ccc;padding:1em 0}pre{background:#f6f6f6;padding:.5em}</style>"
        f"</head><body><h1>Zhang et al. 2019, appendix figures (scale: {html.escape(SCALE)})</h1>"
        + "".join(sections)
        + "</body></html>"
    )
    from curvlab.io.atomic import atomic_output

    with atomic_output(FIGURES / "index.html") as tmp:
        Path(tmp).write_text(page)
    write_json(FIGURES / "summary.json", summary)
    return summary


if __name__ == "__main__":
    build()
