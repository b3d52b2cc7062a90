"""K-FAC, EKFAC and the exact GGN on one figure (``curvlab compare``; seed E.1's "true eigenspectrum").

Left: the eigenvalue densities per decade on log-log axes, as in Fig. 9 (:mod:`curvlab.plots.spectrum`):
K-FAC and EKFAC exactly (histograms of their spectra), the GGN from stochastic Lanczos quadrature (the
SLQ weights binned; its Wasserstein guarantee is in the legend). Eigenvalues below the floor
(``floor × λ_max`` of the GGN) cannot sit on the log axis: their fraction is given in the legend. Right:
the top-k eigenvalues of each against their rank, the GGN's from Lanczos.
"""

from __future__ import annotations

import os

import numpy as np

from curvlab.analysis.compare import ComparisonResult
from curvlab.plots import save_figure
from curvlab.plots.spectrum import density_per_decade, log_edges

COLOURS = {"kfac": "#1f77b4", "ekfac": "#2ca02c", "ggn": "#d62728"}
LABELS = {"kfac": "K-FAC", "ekfac": "EKFAC", "ggn": "exact GGN"}


def plot_comparison(result: ComparisonResult, path: str | os.PathLike, *, title: str | None = None) -> None:
    """Write the two-panel comparison figure to ``path`` (PNG/PDF/SVG, atomically)."""
    import matplotlib.pyplot as plt

    from curvlab.plots import STYLE

    s = result.summary
    floor = s["floor"] * s["ggn"]["lambda_max"]
    with plt.rc_context(STYLE):
        fig, (left, right) = plt.subplots(1, 2, figsize=(10.5, 4.0), constrained_layout=True)
    high = max(result.kfac.max(), result.ekfac.max(), s["ggn"]["lambda_max"])
    edges = log_edges(floor, high)
    centres = np.sqrt(edges[:-1] * edges[1:])
    for label, spectrum in (("kfac", result.kfac), ("ekfac", result.ekfac)):
        density = density_per_decade(spectrum, edges)
        density[density == 0] = np.nan
        below = s[label]["fraction_below_floor"]
        left.plot(
            centres,
            density,
            color=COLOURS[label],
            lw=1.5,
            marker="o",
            ms=2,
            label=f"{LABELS[label]} ({below:.0%} below floor)",
        )
    nodes, weights = result.ggn.atoms()
    counts = np.histogram(nodes, bins=edges, weights=weights)[0]
    ggn_density = counts / np.diff(np.log10(edges))
    ggn_density[ggn_density == 0] = np.nan
    bound = s["ggn"]["slq_w1_bound_over_range"]
    guarantee = f"W1 ≤ {bound:g}·λmax" if bound is not None else "no guarantee"
    left.plot(
        centres,
        ggn_density,
        color=COLOURS["ggn"],
        lw=1.5,
        marker="s",
        ms=2,
        label=f"{LABELS['ggn']}, SLQ ({guarantee}; {s['ggn']['fraction_below_floor']:.0%} below floor)",
    )
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("eigenvalue λ")
    left.set_ylabel("density (fraction per decade of λ)")
    left.legend(loc="lower left", fontsize=7)
    for label in ("ggn", "kfac", "ekfac"):
        values = result.top[label]
        ranks = np.arange(1, len(values) + 1)
        right.plot(ranks, values, color=COLOURS[label], marker="o", ms=3, lw=1.2, label=LABELS[label])
    right.set_yscale("log")
    from matplotlib.ticker import MaxNLocator

    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_xlabel("rank i")
    right.set_ylabel("i-th largest eigenvalue")
    k = s["kfac"]["top_k"]
    e = s["ekfac"]["top_k"]
    right.set_title(
        f"top-{len(result.top['ggn'])}: median rel. error K-FAC {k['median_relative_error']:.2f}, "
        f"EKFAC {e['median_relative_error']:.2f}; overlap {k['subspace_overlap']:.2f}, "
        f"{e['subspace_overlap']:.2f}",
        fontsize=8,
    )
    right.legend(fontsize=8)
    vs = s["kfac"]["vs_ggn"]
    fig.suptitle(
        title
        or f"K-FAC vs the exact GGN ({s['dimension']:,} weights, {s['num_examples']} examples): "
        f"KS {vs['ks']:.2f}, W1 {vs['w1_log10']:.2f} decades",
        fontsize=10,
    )
    save_figure(fig, path)
