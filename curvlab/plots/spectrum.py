"""Fig. 9 of the seed: "Eigenspectra of the K-FAC approximate Fisher matrix of ResNet8 at different
training iterations" — the whole-network eigenvalue density on log-log axes, one curve per step.

The eigenvalues are the products ``λ_S[i] λ_A[j]`` over all layers (design.md, "Whole-network K-FAC
eigenspectrum"). They are binned on log-spaced edges, with counts exact from
:meth:`curvlab.analysis.spectrum.KroneckerSpectrum.histogram` (the products are never materialised), and
drawn as a density per decade: ``count / (N * Δlog10 λ)`` for ``N`` eigenvalues, so curves of
different steps (or sizes) are comparable and the area under a curve is the fraction of eigenvalues
that are positive. Exact zeros cannot sit on a log axis: they are left out and their number is given
in the legend.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from curvlab.analysis.spectrum import KroneckerSpectrum, SpectrumResult
from curvlab.plots import new_figure, save_figure

__all__ = ["density_per_decade", "log_edges", "plot_eigenvalue_density"]


def log_edges(low: float, high: float, *, per_decade: int = 8, max_bins: int = 160) -> np.ndarray:
    """Log-spaced bin edges from ``low`` to just above ``high`` (so the largest value is counted in
    the half-open last bin), ``per_decade`` bins a decade, at least 10 and at most ``max_bins``."""
    if not (0 < low <= high < math.inf):
        raise ValueError(f"log_edges: need 0 < low <= high < inf, got {low}, {high}")
    decades = max(math.log10(high / low), 1e-9)
    bins = int(min(max(round(decades * per_decade), 10), max_bins))
    top = high * (1 + 1e-12) if high > low else low * 10
    edges = np.geomspace(low, top, bins + 1)
    edges[0], edges[-1] = low, max(top, np.nextafter(high, math.inf))
    return edges


def density_per_decade(spectrum: KroneckerSpectrum, edges: np.ndarray) -> np.ndarray:
    """``count / (N * Δlog10 λ)`` per bin (``N`` = every eigenvalue, zeros included)."""
    counts = spectrum.histogram(edges).astype(np.float64)
    return counts / (spectrum.count * np.diff(np.log10(edges)))


def plot_eigenvalue_density(
    spectra: SpectrumResult | Mapping[int, KroneckerSpectrum],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    per_decade: int = 8,
) -> None:
    """Draw the K-FAC eigenvalue density of each step (Fig. 9) and write it to ``path`` atomically.

    ``spectra``: what :func:`curvlab.analysis.spectrum.compute_spectrum` returned, or ``{step: spectrum}``.
    All steps share one set of bins spanning every step's smallest positive to largest eigenvalue.
    """
    by_step = _by_step(spectra)
    positive = {s: k for s, k in by_step.items() if k.num_positive}
    fig, ax = new_figure(7.2, 3.8)
    if positive:
        low = min(k.min_positive() for k in positive.values())
        high = max(k.max() for k in positive.values())
        edges = log_edges(low, high, per_decade=per_decade)
        centres = np.sqrt(edges[:-1] * edges[1:])
        colours = _colours(len(positive))
        peak, low = 0.0, math.inf
        for colour, (step, spectrum) in zip(colours, sorted(positive.items()), strict=True):
            density = density_per_decade(spectrum, edges)
            peak = max(peak, float(density.max()))
            low = min(low, float(density[density > 0].min()))
            density[density == 0] = np.nan  # empty bins: a gap on the log axis
            label = f"step {step}"
            if spectrum.num_zeros:
                label += f" ({spectrum.num_zeros:,} zeros not shown)"
            ax.plot(centres, density, color=colour, lw=1.6, marker="o", ms=2.5, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    if positive:  # a little room below the lowest point and above the highest
        ax.set_ylim(low / 3, peak * 3)
    ax.set_xlabel("eigenvalue λ of the K-FAC Fisher")
    ax.set_ylabel("density (fraction per decade of λ)")
    total = max((k.count for k in by_step.values()), default=0)
    ax.set_title(title or f"K-FAC eigenspectrum ({total:,} eigenvalues)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, fontsize=8, frameon=False)
    save_figure(fig, path)


def _by_step(spectra: SpectrumResult | Mapping[int, KroneckerSpectrum]) -> dict[int, KroneckerSpectrum]:
    if isinstance(spectra, SpectrumResult):
        return {s.step: s.kronecker() for s in spectra.steps}
    return dict(spectra)


def _colours(n: int) -> Sequence:
    """Early steps light, late steps dark (viridis), as training progresses."""
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    if n == 1:
        return [cmap(0.35)]
    return [cmap(0.85 - 0.75 * i / (n - 1)) for i in range(n)]
