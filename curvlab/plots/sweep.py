"""Steps to a target vs batch size in the style of Zhang et al. 2019's Fig. 1 (and seed Fig. 13): log-log
axes, one line per optimizer (the median over seeds, the bar from the fewest to the most steps of a
seed), the perfect-scaling line ``S ∝ 1/B`` through each optimizer's smallest batch size (dotted, same
colour), the fitted ``S(B) = S_min (1 + B_crit / B)`` (thin) and ``B_crit`` marked on it (a diamond)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from curvlab.plots import new_figure

COLORS = {"sgd": "tab:blue", "momentum": "tab:orange", "adam": "tab:green", "kfac": "tab:red"}


def plot_sweep(results: Mapping[str, Any], title: str | None = None) -> Figure:
    """The figure of a ``results.json`` (:mod:`curvlab.sweep.results`)."""
    fig, ax = new_figure(5.6, 4.0)
    config = results["config"]
    all_sizes = [c["batch_size"] for r in results["optimizers"].values() for c in r["cells"]]
    lo, hi = min(all_sizes), max(all_sizes)
    grid = np.geomspace(lo, hi, 200)
    plotted = False
    for i, (opt, r) in enumerate(results["optimizers"].items()):
        color = COLORS.get(opt, f"C{i}")
        cells = [c for c in r["cells"] if c["steps"] is not None]
        if not cells:
            ax.plot([], [], color=color, label=f"{opt} (target not reached)")
            continue
        b = np.array([c["batch_size"] for c in cells], dtype=float)
        s = np.array([c["steps"] for c in cells], dtype=float)
        low = s - np.array([c["seeds"]["min"] for c in cells], dtype=float)
        high = np.array([c["seeds"]["max"] for c in cells], dtype=float) - s
        plotted = True
        ax.errorbar(b, s, yerr=[low, high], color=color, marker="o", ms=4, lw=1.6, capsize=2, label=opt)
        ax.plot(grid, s[0] * b[0] / grid, color=color, ls=":", lw=1, alpha=0.7)
        fit = r.get("fit") or {}
        if fit.get("s_min") and fit.get("b_crit"):
            ax.plot(grid, fit["s_min"] * (1 + fit["b_crit"] / grid), color=color, lw=0.8, alpha=0.6)
            if lo <= fit["b_crit"] <= hi:
                ax.plot([fit["b_crit"]], [2 * fit["s_min"]], marker="D", ms=7, color=color, mec="black",
                        mew=0.6, ls="none")
    ax.plot([], [], color="gray", ls=":", label="perfect scaling (S ∝ 1/B)")
    ax.plot([], [], color="gray", marker="D", mec="black", ls="none", label="B_crit (fit: S = 2 S_min)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    if not plotted:  # no batch size reached the target: empty log axes up to the budget
        ax.set_ylim(1, max(2, int(config["max_steps"])))
        ax.set_xlim(lo / 1.5, hi * 1.5)
    ax.set_xlabel("batch size B")
    ax.set_ylabel("steps to target")
    target = config["target"]
    split = config.get("eval_split") or ("train" if target.startswith("loss") else "test")
    ax.set_title(title or f"{config['model']} on {config['data']}: steps to {target} ({split} split)",
                 fontsize=9)
    ax.legend(fontsize=7, loc="best")
    return fig
