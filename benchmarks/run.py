"""``make bench``: run every benchmark and print its summary line."""

from __future__ import annotations

import sys

from benchmarks import distributed, factor_capture, gradcov, nqm_sweep, operators, spectrum, sweep, train_step

BENCHMARKS = [factor_capture, spectrum, gradcov, nqm_sweep, train_step, distributed, sweep, operators]


def main() -> int:
    for bench in BENCHMARKS:
        summary = bench.run()
        print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
