"""Fig. 10: gradient variance vs curvature in the Kronecker-factored eigenbasis.

``python -m analyses.fig10 a`` (ResNet8) or ``b`` (the shallow Transformer with its tied embedding).

The comparison is made at the first saved step after initialisation. Full-batch K-FAC fits the
1,438 digits of the small scale perfectly within ~50 steps; once ``p_n ≈ e_{y_n}`` for every training
example, per-example gradients vanish like ``1 − p_y`` while the Fisher's curvature vanishes only like
``√(1 − p_y)`` of it, so late checkpoints of a memorised training set say nothing about ``H ≈ C``.
"""

from __future__ import annotations

import sys

from analyses.config import DEVICE, FIGURES, SETTINGS, capture_json, write_json
from analyses.train import run_dir

RUNS = {"a": "resnet8", "b": "transformer"}


def comparison_step(name: str) -> int:
    """The first saved step after step 0."""
    steps = sorted(int(s) for s in SETTINGS[name]["save_steps"].split(","))
    return next(s for s in steps if s > 0)


def main(panel: str) -> None:
    name = RUNS[panel]
    s = SETTINGS[name]
    summary = capture_json(
        "gradcov", str(run_dir(name) / "ckpt.h5"), "--step", str(comparison_step(name)),
        "--examples", str(s["gradcov_examples"]), "--batch-size", "64",
        "--directions", str(s["gradcov_directions"]), "--device", DEVICE,
        "-o", str(FIGURES / "data" / f"{name}.gradcov.h5"), "--plot", str(FIGURES / f"fig10{panel}.png"),
    )
    write_json(FIGURES / f"fig10{panel}.json", summary)


if __name__ == "__main__":
    main(sys.argv[1])
