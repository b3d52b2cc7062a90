"""Fig. 12: the sorted K-FAC eigenspectrum of ResNet8 against the 1/i law of the NQM, with the fit; and
what the measured spectrum does to the NQM (``fig12_nqm.png``).

The fit is ``curvlab fit`` on the last saved step (its calibrated interval and its verdict on whether a
power law describes the spectrum at all: docs/powerlaw.md). The NQM comparison puts the measured
spectrum in place of the assumed one: the ``d = 10^4`` largest K-FAC eigenvalues, scaled so that the
largest is 1 (as ``h_1 = 1`` of ``h_i = 1/i``), with ``c_i = h_i`` (seed E.2) and ``E[θ_i(0)²] = 1``,
against the NQM's ``h_i = 1/i``; for each, plain SGD's steps to reach 1% of its initial risk, tuned over
the same constant learning rates, at batch sizes ``2^2 … 2^20``. Both problems are binned (100 geometric
bins) at the small scale, exact at the paper's.
"""

from __future__ import annotations

import numpy as np

from analyses.config import DEVICE, FIGURES, SETTINGS, capture_json, timed, write_json
from analyses.train import run_dir

NQM_D = 10_000
TARGET_FRACTION = 0.01


def nqm_comparison(eigenvalues: np.ndarray) -> dict:
    """Steps to 1% of the initial risk vs batch size: the measured spectrum against ``h_i = 1/i``."""
    from curvlab.nqm.analysis import Grid, paper_lr_grid, steps_to_target
    from curvlab.nqm.figures import BATCH_SIZES
    from curvlab.nqm.problem import binned, default_problem, spectrum_problem

    top = np.sort(eigenvalues[eigenvalues > 0])[::-1][:NQM_D]
    problems = {"measured": spectrum_problem(top / top[0]), "1/i": default_problem(d=len(top))}
    grid = Grid("sgd", paper_lr_grid("sgd"))
    out = {"d": int(len(top)), "batch_sizes": list(BATCH_SIZES), "target_fraction": TARGET_FRACTION,
           "mode": "exact" if SETTINGS["nqm_mode"] == "exact" else "binned"}
    for label, problem in problems.items():
        if SETTINGS["nqm_mode"] != "exact":
            problem = binned(problem)
        res = steps_to_target(problem, TARGET_FRACTION * problem.initial_risk(), BATCH_SIZES, grid)
        out[label] = [int(v) if v >= 0 else None for v in res.steps]
    return out


def plot_nqm(data: dict, path) -> None:
    from curvlab.plots import new_figure, save_figure

    fig, ax = new_figure(6.4, 3.8)
    b = np.array(data["batch_sizes"], dtype=float)
    for label, style in (("measured", dict(color="tab:red", marker="o")), ("1/i", dict(color="tab:blue",
                                                                                    marker="s", ls="--"))):
        steps = np.array([np.nan if v is None else v for v in data[label]], dtype=float)
        name = "measured K-FAC spectrum (top d, scaled)" if label == "measured" else "NQM, h_i = 1/i"
        ax.plot(b, steps, ms=3, lw=1.4, label=name, **style)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("steps to 1% of the initial risk")
    ax.set_title(f"NQM: measured spectrum vs h = 1/i\n(d = {data['d']:,}, {data['mode']} mode, SGD, "
                 "tuned lr)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, frameon=False)
    save_figure(fig, path)


def main() -> None:
    from curvlab.analysis.spectrum import load_layer_eigenvalues
    from curvlab.analysis.spectrum.kronecker import KroneckerSpectrum

    ckpt = run_dir("resnet8") / "ckpt.h5"
    with timed("fig12"):
        summary = capture_json(
            "fit", str(ckpt), "--step", "latest", "--device", DEVICE, "--plot", str(FIGURES / "fig12.png"),
        )
        _, layers = load_layer_eigenvalues(str(ckpt), step="latest", device=DEVICE)
        spectrum = KroneckerSpectrum(list(layers.values()))
        summary["nqm"] = nqm_comparison(spectrum.top(min(NQM_D, spectrum.num_positive)))
        plot_nqm(summary["nqm"], FIGURES / "fig12_nqm.png")
        write_json(FIGURES / "fig12.json", summary)


if __name__ == "__main__":
    main()
