"""``make bench``: run every benchmark and print its summary line."""

from __future__ import annotations

import sys

from benchmarks import (
    distributed,
    factor_capture,
    gradcov,
    nqm_sweep,
    operators,
    predict,
    spectrum,
    sweep,
    train_step,
)

BENCHMARKS = [
    factor_capture.run, factor_capture.run_attention, spectrum.run, gradcov.run, nqm_sweep.run,
    train_step.run, distributed.run, sweep.run, operators.run, predict.run,
]


def main() -> int:
    for bench in BENCHMARKS:
        summary = bench()
        print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
