"""Fig. 9: K-FAC eigenspectra of ResNet8 trained with K-FAC, at several training iterations.

Besides the figure and ``curvlab spectrum``'s summary, ``fig09.json`` holds what the verdict needs, per
saved step, computed exactly from the factor eigenvalues
(:class:`~curvlab.analysis.spectrum.KroneckerSpectrum`, no product is materialised): the 1, 10, 25, 50,
75, 90 and 99% quantiles of the whole-network spectrum and the tails against the bulk — the fractions
of eigenvalues beyond Tukey's fences on ``log10 λ`` (``Q1 − 1.5 IQR`` and ``Q3 + 1.5 IQR``, the IQR being
the bulk's width; exact zeros count as small).
"""

from __future__ import annotations

import math

from analyses.config import DEVICE, FIGURES, capture_json, timed, write_json
from analyses.train import run_dir

QUANTILES = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
FENCE = 1.5  # Tukey's: a value more than 1.5 interquartile ranges beyond a quartile is an outlier


def tails(spectrum) -> dict:
    """Quantiles and the fractions of eigenvalues beyond the Tukey fences on log10 λ."""
    q = [float(v) for v in spectrum.quantiles(list(QUANTILES))]
    q1, q3 = q[QUANTILES.index(0.25)], q[QUANTILES.index(0.75)]
    out = {"quantiles": dict(zip((f"{p:g}" for p in QUANTILES), q, strict=True)),
           "count": int(spectrum.count), "zeros": int(spectrum.num_zeros)}
    if q1 > 0 and q3 > 0:
        iqr = math.log10(q3) - math.log10(q1)
        upper, lower = q3 * 10 ** (FENCE * iqr), q1 / 10 ** (FENCE * iqr)
        above = int(spectrum.count_above(upper))
        below = int(spectrum.count) - int(spectrum.count_at_least(lower))
        out.update(iqr_decades=iqr, upper_fence=upper, lower_fence=lower,
                   frac_large=above / spectrum.count, frac_small=below / spectrum.count)
    return out


def main() -> None:
    from curvlab.analysis.spectrum import load_layer_eigenvalues
    from curvlab.analysis.spectrum.kronecker import KroneckerSpectrum

    ckpt = run_dir("resnet8") / "ckpt.h5"
    out = FIGURES / "data" / "resnet8.spectrum.h5"
    with timed("fig09"):
        summary = capture_json(
            "spectrum", str(ckpt), "--step", "all", "--device", DEVICE,
            "-o", str(out), "--plot", str(FIGURES / "fig09.png"),
        )
        per_step = []
        for entry in summary["steps"]:
            _, layers = load_layer_eigenvalues(str(out), step=entry["step"])
            per_step.append({"step": entry["step"], **tails(KroneckerSpectrum(list(layers.values())))})
        summary["tails"] = per_step
        write_json(FIGURES / "fig09.json", summary)


if __name__ == "__main__":
    main()
