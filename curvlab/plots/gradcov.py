"""Fig. 10 style: gradient variance vs curvature along Kronecker-factored eigenbasis directions."""

from __future__ import annotations

import os

import numpy as np

from curvlab.analysis.gradcov_run import GradcovResult, _compared, numerical_floor
from curvlab.plots import new_figure, save_figure


def plot_variance_vs_curvature(result: GradcovResult, path: str | os.PathLike, title: str = "") -> None:
    """Scatter of ``Var_n(v^T g_n)`` (y) against ``v^T F v`` (x), log-log, one colour per layer, y = x.

    Directions in the numerical null space (either value below :func:`numerical_floor`) are left
    out, as in the JSON summary, which counts them.
    """
    fig, ax = new_figure(5.2, 4.2)
    compared = {name: _compared(result, name, stats) for name, stats in result.layers.items()}
    floor = numerical_floor([c for _, c in compared.values()])
    lows, highs = [], []
    for name, (variance, curvature) in compared.items():
        keep = (variance > floor) & (curvature > floor)
        if not keep.any():
            continue
        size = 4 if keep.sum() > 2000 else 10
        ax.scatter(curvature[keep], variance[keep], s=size, alpha=0.5, lw=0, label=name, rasterized=True)
        lows.append(min(curvature[keep].min(), variance[keep].min()))
        highs.append(max(curvature[keep].max(), variance[keep].max()))
    if lows:
        line = np.array([min(lows), max(highs)])
        ax.plot(line, line, color="black", lw=1, ls="--", label="y = x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(r"curvature $v^\top F v$" + (" (jvp)" if result.route == "fvp" else ""))
    ax.set_ylabel(r"gradient variance $\mathrm{Var}_n(v^\top g_n)$")
    ax.set_title(title or "Gradient variance vs curvature in the K-FAC eigenbasis")
    ax.legend(fontsize=7, markerscale=2, loc="upper left", ncol=1 + len(result.layers) // 8)
    save_figure(fig, path)
