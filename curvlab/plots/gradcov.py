"""Fig. 10 style: gradient variance vs curvature along Kronecker-factored eigenbasis directions."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from curvlab.analysis.gradcov_run import NOISE_BOUND, GradcovResult, _compared, numerical_floor
from curvlab.plots import new_figure, save_figure


def layer_colours(count: int) -> list:
    """``count`` distinct colours: tab10 up to 10 layers, then tab20's 20 and, beyond, evenly spaced hues."""
    import matplotlib

    if count <= 10:
        return [matplotlib.colormaps["tab10"](k) for k in range(count)]
    if count <= 20:
        return [matplotlib.colormaps["tab20"](k) for k in range(count)]
    return [matplotlib.colormaps["hsv"](k / count) for k in range(count)]


def plot_variance_vs_curvature(result: GradcovResult, path: str | os.PathLike, title: str = "") -> None:
    """Scatter of ``Var_n(v^T g_n)`` (y) against ``v^T F v`` (x), log-log, one colour per layer, y = x.

    Directions in the numerical null space (either value below :func:`numerical_floor`) are left
    out, as in the JSON summary, which counts them. Directions whose Monte-Carlo curvature is noise
    (relative standard error above :data:`~curvlab.analysis.gradcov_run.NOISE_BOUND`) are drawn as
    hollow grey circles and counted in the legend; the summary leaves them out. The legend sits to the
    right of the axes, off the data.
    """
    fig, ax = new_figure(7.4, 4.4)
    compared = {name: _compared(result, name, stats) for name, stats in result.layers.items()}
    floor = numerical_floor([c for _, c, _ in compared.values()])
    lows, highs = [], []
    noisy_x: list[np.ndarray] = []
    noisy_y: list[np.ndarray] = []
    for colour, (name, (variance, curvature, se)) in zip(layer_colours(len(compared)), compared.items(),
                                                         strict=True):
        resolved = (variance > floor) & (curvature > floor)
        with np.errstate(divide="ignore", invalid="ignore"):
            noisy = resolved & (se > NOISE_BOUND * curvature)
        keep = resolved & ~noisy
        noisy_x.append(curvature[noisy])
        noisy_y.append(variance[noisy])
        if not resolved.any():
            continue
        size = 4 if keep.sum() > 2000 else 10
        ax.scatter(curvature[keep], variance[keep], s=size, alpha=0.5, lw=0, color=colour, label=name,
                   rasterized=True)
        lows.append(min(curvature[resolved].min(), variance[resolved].min()))
        highs.append(max(curvature[resolved].max(), variance[resolved].max()))
    _draw_noisy(ax, noisy_x, noisy_y)
    if lows:
        line = np.array([min(lows), max(highs)])
        ax.plot(line, line, color="black", lw=1, ls="--", label="y = x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(r"curvature $v^\top F v$" + (" (jvp)" if result.route == "fvp" else ""))
    ax.set_ylabel(r"gradient variance $\mathrm{Var}_n(v^\top g_n)$")
    ax.set_title(title or "Gradient variance vs curvature in the K-FAC eigenbasis", fontsize=9)
    ax.legend(fontsize=7, markerscale=2, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0,
              frameon=False)
    save_figure(fig, path)


def _draw_noisy(ax, xs: Sequence[np.ndarray], ys: Sequence[np.ndarray]) -> None:
    x, y = np.concatenate(xs) if xs else np.zeros(0), np.concatenate(ys) if ys else np.zeros(0)
    if x.size:
        ax.scatter(x, y, s=10, facecolors="none", edgecolors="0.55", lw=0.6, rasterized=True,
                   label=f"MC noise, SE > {NOISE_BOUND:g}× value ({x.size:,}, left out)")
