"""How close K-FAC's spectrum comes to the true one (seed E.1: it "may shed light upon the true
eigenspectrum"): ``curvlab compare`` on the last step of the ResNet8 and Transformer runs.

``python -m analyses.kfac_vs_ggn resnet8|transformer`` writes ``kfac_vs_ggn_<name>.png`` and ``.json``.
"""

from __future__ import annotations

import sys

from analyses.config import DEVICE, FIGURES, SETTINGS, capture_json, write_json
from analyses.train import run_dir


def main(name: str) -> None:
    s = SETTINGS[name]["compare"]
    summary = capture_json(
        "compare",
        str(run_dir(name) / "ckpt.h5"),
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


if __name__ == "__main__":
    main(sys.argv[1])
