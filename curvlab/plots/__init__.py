"""Figures in the style of the seed's appendix. One module per figure family; this module holds
the shared pieces: a headless matplotlib, a consistent look, and atomic PNG/PDF output.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # headless: no display on the machines that make the figures

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from curvlab.io.atomic import atomic_output  # noqa: E402

STYLE = {
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "font.size": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
}


def new_figure(width: float = 5.0, height: float = 3.6) -> tuple[Figure, plt.Axes]:
    """A figure with one axes in the project's style."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(width, height), constrained_layout=True)
    return fig, ax


def save_figure(fig: Figure, path: str | os.PathLike) -> None:
    """Write the figure atomically; the format follows the suffix (``.png``, ``.pdf``, ``.svg``)."""
    suffix = os.path.splitext(str(path))[1].lstrip(".").lower() or "png"
    with plt.rc_context(STYLE), atomic_output(path) as tmp:
        fig.savefig(tmp, format=suffix)
    plt.close(fig)
