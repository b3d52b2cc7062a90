"""Fig. 12 of the seed: "Comparison between K-FAC Fisher eigenspectra and the 1/i distribution used in
the NQM" — the sorted eigenvalues against their rank on log-log axes, with the NQM's ``h_i = 1/i``.

The sorted spectrum is normalised by its largest eigenvalue, ``λ_(i)/λ_(1)``, so the curve starts at
1. The fitted rank law ``λ_(i) ≈ ĉ · exp(−ŝ ψ(i)) ≈ ĉ (i − ½)^(−ŝ)``
(:mod:`curvlab.analysis.powerlaw`) is drawn over its window only, with the exponent and its
confidence interval in the legend. The NQM's
``h_i ∝ 1/i`` fixes a shape, not a scale: its line is drawn through the fitted law at the window's
geometric centre, so the two slopes can be compared where the fit holds. The ranks outside the
window (top outliers skipped, the tail below it) are shaded; the best curved alternative is drawn
dash-dotted when it beats the pure law (AIC).
"""

from __future__ import annotations

import os

import numpy as np

from curvlab.analysis.powerlaw import RankLawFit
from curvlab.plots import new_figure, save_figure

__all__ = ["plot_rank_law"]


def plot_rank_law(
    fit: RankLawFit,
    path: str | os.PathLike,
    *,
    title: str | None = None,
    label: str = "K-FAC eigenspectrum",
) -> None:
    """Draw the normalised sorted spectrum, the fitted law and the NQM's ``1/i``; write ``path``."""
    fig, ax = new_figure(5.6, 4.0)
    ranks = fit.ranks.astype(np.float64)
    top = float(fit.values[0])
    ax.plot(ranks, fit.values / top, color="tab:blue", lw=1.8, label=f"{label} ({fit.n_fit:,} > floor)")
    k_lo, k_hi = fit.window
    inside = np.geomspace(k_lo, k_hi, 200)
    pct = round(100 * fit.confidence)
    ax.plot(
        inside,
        fit.line(inside) / top,
        color="tab:red",
        lw=1.6,
        ls="--",
        label=f"fit: $s$ = {fit.exponent:.3f} [{fit.ci_low:.3f}, {fit.ci_high:.3f}] ({pct}% CI)",
    )
    if fit.preferred_model in ("log_quadratic", "log_corrected"):
        alt = fit.model(fit.preferred_model)
        ax.plot(
            inside,
            fit.curve(alt.name, inside) / top,
            color="tab:green",
            lw=1.2,
            ls="-.",
            label=f"{alt.name.replace('_', '-')}: local $s$ {alt.params['s_at_k_lo']:.2f}"
            f"→{alt.params['s_at_k_hi']:.2f}",
        )
    everywhere = np.geomspace(1.0, max(float(ranks[-1]), 10.0), 200)
    centre = float(np.sqrt(k_lo * k_hi))
    scale = float(fit.line(np.array([centre]))[0]) * centre / top
    ax.plot(everywhere, scale / everywhere, color="black", lw=1.0, ls=":", label=r"NQM: $h_i \propto 1/i$")
    if k_lo > 1:
        ax.axvspan(1.0, k_lo, color="0.85", alpha=0.6, lw=0)
    if k_hi < ranks[-1]:
        ax.axvspan(k_hi, ranks[-1], color="0.85", alpha=0.6, lw=0)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(0.8, ranks[-1] * 1.25)
    ax.set_xlabel("rank $i$ (largest eigenvalue first)")
    ax.set_ylabel(r"$\lambda_{(i)} / \lambda_{(1)}$")
    ax.text(
        0.02,
        0.03,
        f"window {k_lo:,}–{k_hi:,} (shaded: outside), KS {fit.ks:.3f}\n"
        f"OLS on log(i−½): $s$ = {fit.exponent_ols:.3f} ± {fit.ols_stderr:.3f}",
        transform=ax.transAxes,
        fontsize=7.5,
        va="bottom",
    )
    ax.set_title(title or "K-FAC eigenspectrum vs the NQM's 1/i")
    ax.legend(loc="upper right", fontsize=7.5)
    save_figure(fig, path)
