"""Fig. 9: K-FAC eigenspectra of ResNet8 trained with K-FAC, at several training iterations."""

from __future__ import annotations

from analyses.config import DEVICE, FIGURES, capture_json, write_json
from analyses.train import run_dir


def main() -> None:
    ckpt = run_dir("resnet8") / "ckpt.h5"
    summary = capture_json(
        "spectrum", str(ckpt), "--step", "all", "--device", DEVICE,
        "-o", str(FIGURES / "data" / "resnet8.spectrum.h5"), "--plot", str(FIGURES / "fig09.png"),
    )
    write_json(FIGURES / "fig09.json", summary)


if __name__ == "__main__":
    main()
