"""Fig. 12: the sorted K-FAC eigenspectrum of ResNet8 against the 1/i law of the NQM, with the fit."""

from __future__ import annotations

from analyses.config import DEVICE, FIGURES, capture_json, write_json
from analyses.train import run_dir


def main() -> None:
    summary = capture_json(
        "fit", str(run_dir("resnet8") / "ckpt.h5"), "--step", "latest", "--device", DEVICE,
        "--plot", str(FIGURES / "fig12.png"),
    )
    write_json(FIGURES / "fig12.json", summary)


if __name__ == "__main__":
    main()
