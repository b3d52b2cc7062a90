"""Figs. 11, 13, 14a-c and 15: the noisy quadratic model (``python -m analyses.nqm 11|13|14|15``)."""

from __future__ import annotations

import sys

from analyses.config import FIGURES, SETTINGS, run_curvlab, timed


def main(number: str) -> None:
    extra = SETTINGS.get("nqm_args", [])
    with timed(f"nqm {number}"):
        run_curvlab("nqm", "figure", number, "--out", str(FIGURES), "--mode", SETTINGS["nqm_mode"], *extra)


if __name__ == "__main__":
    main(sys.argv[1])
