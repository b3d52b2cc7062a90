"""Figures 11, 13, 14 a/b/c and 15 of the seed's appendix (the NQM), drawn from the dicts of
:mod:`curvlab.nqm.figures`."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from curvlab.plots import new_figure

COLORS = ("tab:red", "tab:green", "tab:blue", "tab:cyan", "tab:purple", "tab:orange")


def _arr(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _mode_note(ax, data: dict) -> None:
    """Second title line: which problem mode produced the numbers."""
    problem = data.get("problem")
    text = f"{data['mode']} mode" + (f", d = {problem['d']}" if problem else "")
    ax.set_title(f"{ax.get_title()}\n{text}", fontsize=9)


def plot_fig11(data: dict) -> Figure:
    """Red: momentum's convergence term; blue: plain SGD at the effective rate; vs 1 − β (log x)."""
    fig, ax = new_figure(7.0, 3.8)
    x = _arr(data["one_minus_beta"])
    for i, t in enumerate(data["steps"]):
        ax.plot(x, _arr(data["momentum"][i]), color="tab:red", lw=1.6, label="momentum" if i == 0 else None)
        ax.plot(x, _arr(data["sgd_effective_lr"][i]), color="tab:blue", lw=1.2, ls="--",
                label="SGD, lr = α/(1−β)" if i == 0 else None)
        sgd = _arr(data["sgd_effective_lr"][i])
        j = int(np.nanargmin(np.abs(sgd - 0.5)))
        ax.annotate(f"t={t}", (x[j], sgd[j]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("1 − β")
    ax.set_ylabel("first term of eq. (6), normalised")
    ax.set_title(f"Convergence: momentum vs SGD at the effective rate (αh = {data['alpha_h']:g})", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, frameon=False)
    return fig


def plot_fig13(data: dict) -> Figure:
    """Steps to each threshold vs batch size (log-log)."""
    fig, ax = new_figure()
    b = np.array(data["batch_sizes"], dtype=np.float64)
    for i, c in enumerate(data["thresholds"]):
        ax.plot(b, _arr(data["steps"][i]), marker="o", ms=3, color=COLORS[i % len(COLORS)],
                label=f"loss {c:g}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("steps to reach the loss threshold")
    ax.set_title("Steps to target vs batch size (SGD, tuned constant lr)", fontsize=9)
    ax.legend(fontsize=8)
    _mode_note(ax, data)
    return fig


def plot_fig14(data: dict) -> Figure:
    """Optimal (effective) learning rate vs batch size per preconditioning power; (a) dashed in b, c."""
    fig, ax = new_figure()
    b = np.array(data["batch_sizes"], dtype=np.float64)
    for i, p in enumerate(data["powers"]):
        color = COLORS[i % len(COLORS)]
        ax.plot(b, _arr(data["optimal_lr"][i]), marker="o", ms=3, color=color, label=f"power {p:g}")
        if "dashed" in data:
            ax.plot(b, _arr(data["dashed"][i]), ls="--", lw=1.0, color=color)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("optimal " + ("learning rate" if data["figure"] == "14a" else "effective lr α/(1−β)"))
    titles = {"14a": "(a) without momentum", "14b": "(b) fixed momentum 0.9", "14c": "(c) tuned momentum"}
    ax.set_title(titles[data["figure"]] + f", target {data['target']:g}", fontsize=9)
    ax.legend(fontsize=8, title="preconditioning" + (" (dashed: a)" if "dashed" in data else ""),
              title_fontsize=8, loc="upper left")
    _mode_note(ax, data)
    return fig


def plot_fig15(data: dict) -> Figure:
    """Final rate of the optimised piecewise-constant schedule vs batch size, with a line ∝ B."""
    fig, ax = new_figure()
    b = np.array(data["batch_sizes"], dtype=np.float64)
    final = _arr(data["final_lr"])
    ax.plot(b, final, marker="o", ms=3, color="tab:blue", label="final learning rate")
    ok = np.isfinite(final)
    if ok.any():
        k = int(np.flatnonzero(ok)[0])
        ax.plot(b, final[k] * b / b[k], ls=":", color="0.5", lw=1.0, label="∝ batch size")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_ylim(np.nanmin(final) / 2, np.nanmax(final) * 2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("final learning rate")
    pieces = data["optimizer"].split(", ")[-1]
    ax.set_title(f"Piecewise-constant schedule ({pieces}), target {data['target']:g}", fontsize=9)
    ax.legend(fontsize=8)
    _mode_note(ax, data)
    return fig


PLOTTERS = {"11": plot_fig11, "13": plot_fig13, "14a": plot_fig14, "14b": plot_fig14, "14c": plot_fig14,
            "15": plot_fig15}


def plot_figure(data: dict) -> Figure:
    """The figure for any dict of :mod:`curvlab.nqm.figures`."""
    return PLOTTERS[data["figure"]](data)
