"""How close K-FAC's spectrum comes to the true one (seed E.1: it "may shed light upon the true
eigenspectrum"): ``curvlab compare`` on the last step of the ResNet8 and Transformer runs.

``python -m analyses.kfac_vs_ggn resnet8|transformer`` writes ``kfac_vs_ggn_<name>.png`` and ``.json``.
"""

from __future__ import annotations

import sys

from analyses.config import DEVICE, FIGURES, SETTINGS, capture_json, write_json
from analyses.registry import Verdict, figure
from analyses.train import run_dir


def main(name: str) -> None:
    s = SETTINGS[name]["compare"]
    summary = capture_json(
        "compare",
        str(run_dir(name) / "ckpt.h5"),
        "--data",  # the run's data: a recorded data file is read only when named
        SETTINGS[name]["data"],
        "--examples",
        str(s["examples"]),
        "--batch-size",
        str(s["batch_size"]),
        "--top-k",
        str(s["top_k"]),
        "--accuracy",
        str(s["accuracy"]),
        "--probes",
        str(s["probes"]),
        "--trace-probes",
        str(s["trace_probes"]),
        "--device",
        DEVICE,
        "--quiet",
        "--plot",
        str(FIGURES / f"kfac_vs_ggn_{name}.png"),
    )
    write_json(FIGURES / f"kfac_vs_ggn_{name}.json", summary)


def _page_verdict(data: dict) -> Verdict:
    """The figures page's verdict (:mod:`analyses.registry`) on one run's K-FAC vs exact-GGN comparison."""
    k, e, g = data["kfac"], data["ekfac"], data["ggn"]
    top, ks = k["top_k"]["median_relative_error"], k["vs_ggn"]["ks"]
    held = bool(top < 0.5 and ks < 0.2)
    why = (f"K-FAC's top eigenvalues are off by a median {top:.2f} (relative) and the spectra's KS distance "
           f"is {ks:.2f}" + ("" if held else "; " + " and ".join(
               w for w, bad in (("the top eigenvalues are off by more than a factor 2", top >= 0.5),
                                ("the spectra differ in shape (KS ≥ 0.2)", ks >= 0.2)) if bad)))
    numbers = {
        "K-FAC top-k median relative error": top,
        "EKFAC top-k median relative error": e["top_k"]["median_relative_error"],
        "K-FAC top-k subspace overlap": k["top_k"]["subspace_overlap"],
        "KS distance K-FAC vs GGN": ks,
        "W1 (log10) K-FAC vs GGN": k["vs_ggn"].get("w1_log10"),
        "SLQ W1 bound / λ_max": g["slq_w1_bound_over_range"],
        "GGN trace (Hutchinson ± SE)": [g["trace_hutchinson"], g["trace_hutchinson_se"]],
        "K-FAC trace": k["trace"],
        "fraction of GGN eigenvalues below the floor": g["fraction_below_floor"],
        "fraction of K-FAC eigenvalues below the floor": k["fraction_below_floor"],
    }
    for r in data["layers"]:
        numbers[f"relative Frobenius error, {r['name']}"] = r["kfac_relative_frobenius_error"]
    return Verdict(held, why, numbers)


for _run, _title in (("resnet8", "K-FAC vs the exact GGN, ResNet8 (seed E.1's question)"),
                     ("transformer", "K-FAC vs the exact GGN, shallow Transformer")):
    figure(
        f"kfac_vs_ggn_{_run}", _title,
        claim="The K-FAC eigenspectrum may shed light upon the true (Fisher = GGN) eigenspectrum (seed E.1).",
        criterion="K-FAC's top eigenvalues within a factor 2 of the GGN's (median relative error < 0.5) and "
        "the KS distance between the two spectra above the floor < 0.2",
    )(_page_verdict)


if __name__ == "__main__":
    main(sys.argv[1])
