"""Fig. 10: gradient variance vs curvature in the Kronecker-factored eigenbasis.

``python -m analyses.fig10 a`` (ResNet8) or ``b`` (the shallow Transformer with its tied embedding).
"""

from __future__ import annotations

import sys

from analyses.config import DEVICE, FIGURES, SETTINGS, capture_json, write_json
from analyses.train import run_dir

RUNS = {"a": "resnet8", "b": "transformer"}


def main(panel: str) -> None:
    name = RUNS[panel]
    s = SETTINGS[name]
    summary = capture_json(
        "gradcov", str(run_dir(name) / "ckpt.h5"),
        "--examples", str(s["gradcov_examples"]), "--batch-size", "64",
        "--directions", str(s["gradcov_directions"]), "--device", DEVICE,
        "-o", str(FIGURES / "data" / f"{name}.gradcov.h5"), "--plot", str(FIGURES / f"fig10{panel}.png"),
    )
    write_json(FIGURES / f"fig10{panel}.json", summary)


if __name__ == "__main__":
    main(sys.argv[1])
