"""Predicted steps to target vs batch size (``curvlab predict``, docs/predict.md): one colour per optimizer,
the measured-curvature NQM solid, the paper's ``h = c = 1/i`` NQM dashed, the fitted ``B_crit`` of the
measured NQM marked (a diamond at ``S = 2 S_min``), ``B_simple`` and ``B_noise`` as vertical lines, and,
with a sweep's ``results.json``, its measured seed medians (circles with the seeds' range). The two
curves share the NQM's step unit; the measured points are real training steps."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from curvlab.plots import new_figure, save_figure

COLORS = {"sgd": "tab:blue", "momentum": "tab:orange", "kfac": "tab:red", "ema": "tab:purple"}
STYLES = {"nqm": "-", "nqm_1_over_i": "--"}


def plot_prediction(
    prediction: Mapping[str, Any],
    path: str | os.PathLike,
    results: Mapping[str, Any] | None = None,
    title: str | None = None,
) -> None:
    """Write the figure of a prediction file's body (and optionally a sweep's results) to ``path``."""
    fig, ax = new_figure(5.8, 4.2)
    predictors = prediction["predictors"]
    for variant, style in STYLES.items():
        if variant not in predictors:
            continue
        for i, (opt, curve) in enumerate(predictors[variant]["optimizers"].items()):
            color = COLORS.get(opt, f"C{i}")
            pairs = [(b, s) for b, s in zip(curve["batch_sizes"], curve["steps"], strict=True) if s]
            if not pairs:
                continue
            b, s = np.array(pairs, dtype=float).T
            label = f"{opt}: {'measured NQM' if variant == 'nqm' else '1/i NQM'}"
            ax.plot(b, s, color=color, ls=style, lw=1.4 if variant == "nqm" else 1.0, marker=".", label=label)
            fit = curve.get("fit") or {}
            if (
                variant == "nqm"
                and fit.get("identified")
                and fit.get("s_min")
                and b[0] <= (fit.get("b_crit") or 0) <= b[-1]
            ):
                ax.plot(
                    [fit["b_crit"]],
                    [2 * fit["s_min"]],
                    marker="D",
                    ms=6,
                    color=color,
                    mec="black",
                    mew=0.6,
                    ls="none",
                )
    if results is not None:
        for i, (opt, r) in enumerate(results.get("optimizers", {}).items()):
            cells = [c for c in r["cells"] if c.get("steps")]
            if not cells:
                continue
            color = COLORS.get(opt, f"C{i + 4}")
            b = np.array([c["batch_size"] for c in cells], dtype=float)
            s = np.array([c["steps"] for c in cells], dtype=float)
            low = s - np.array([c["seeds"]["min"] for c in cells], dtype=float)
            high = np.array([c["seeds"]["max"] for c in cells], dtype=float) - s
            ax.errorbar(
                b,
                s,
                yerr=[low, high],
                color=color,
                marker="o",
                ms=5,
                mfc="white",
                ls="none",
                capsize=2,
                label=f"{opt}: measured (sweep)",
            )
    scales = prediction.get("noise_scales", {})
    for key, style, name in (("b_simple", ":", "B_simple"), ("b_noise", "-.", "B_noise")):
        if scales.get(key):
            ax.axvline(scales[key], color="gray", ls=style, lw=1, label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size B")
    ax.set_ylabel("steps to target")
    checkpoint = prediction.get("checkpoint", {})
    ax.set_title(
        title
        or f"{checkpoint.get('model') or 'model'} step {checkpoint.get('step')}: "
        f"steps to {prediction['target']['spec']} (predicted)",
        fontsize=9,
    )
    ax.legend(fontsize=6.5, loc="best")
    save_figure(fig, path)
