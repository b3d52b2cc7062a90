"""``make figures``: run every appendix analysis that exists so far, on the embedded default data.

Today curvlab captures K-FAC factors but computes none of the appendix figures yet (Figs. 9–15 come
with the spectrum, gradcov, NQM and figure issues), so this script runs the part of the pipeline that
exists — factor capture for ResNet8 on the bundled digits images, then ``curvlab info`` on the
result — writes its outputs under ``figures/``, and says plainly which figures it did not compute.
It never writes a figure it did not compute.
"""

from __future__ import annotations

import sys
from pathlib import Path

from curvlab.cli import main as curvlab

OUT = Path("figures")
NOT_YET = {
    "Fig. 9": "K-FAC eigenspectra (curvlab spectrum)",
    "Fig. 10": "gradient variance vs curvature (curvlab gradcov)",
    "Figs. 11, 13-15": "noisy quadratic model (curvlab nqm)",
    "Fig. 12": "1/i fit of the spectrum (curvlab fit)",
}


def run() -> int:
    (OUT / "data").mkdir(parents=True, exist_ok=True)
    checkpoint = OUT / "data" / "resnet8_digits_factors.h5"
    print(f"[1/2] K-FAC factors of ResNet8 on digits -> {checkpoint}", file=sys.stderr)
    status = curvlab(
        ["factors", "--model", "resnet8", "--data", "digits", "--fisher", "exact", "-o", str(checkpoint)]
    )
    if status:
        return status
    print("[2/2] checkpoint summary", file=sys.stderr)
    status = curvlab(["info", str(checkpoint)])
    if status:
        return status
    print("\nNo appendix figure is computed yet; not produced:", file=sys.stderr)
    for figure, what in NOT_YET.items():
        print(f"  {figure}: {what}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run())
