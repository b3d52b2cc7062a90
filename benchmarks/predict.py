"""``curvlab predict`` against the ``curvlab sweep`` it predicts: the cost of a prediction as a fraction
of the cost of measuring the same curve.

The cell is the validation's mlp (``analyses/predict_cells.py``: mlp with one hidden layer of 32 on
digits, target ``loss=0.3``), run in one process, one torch thread, on the same load:

* ``factors``: ``curvlab factors`` (exact Fisher, all 1,438 training examples) — the checkpoint the
  prediction needs, when none exists yet;
* ``predict``: ``curvlab predict`` with the validation's options (4 optimizers × 4 NQMs × 9 batch sizes,
  tuned on the notebook's grids), split into its measuring and NQM parts;
* ``sweep``: ``curvlab sweep`` of the pilot's size (sgd and momentum, batch sizes 16-1024, 4 trials, one
  seed, 400 steps at most) — the smallest sweep that measures a curve at all; the validation's own
  sweep (16 trials, 2 seeds) costs about 4× more.

Reported: seconds of each and the ratios ``(factors + predict) / sweep`` and ``predict / sweep``.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import write_result

MODEL = ["--model", "mlp", "--model-arg", "widths=32", "--data", "digits"]
TARGET = "loss=0.3"
SWEEP = [
    "--optimizers",
    "sgd,momentum",
    "--batch-sizes",
    "16,64,256,1024",
    "--trials",
    "4",
    "--max-steps",
    "400",
    "--seeds",
    "1",
    "--workers",
    "1",
    "--threads",
    "1",
]
PREDICT = ["--optimizers", "sgd,momentum,kfac,ema", "--batch-sizes", "2^2..2^10"]


def _timed(argv: list[str]) -> tuple[float, str]:
    from curvlab.commands import main

    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return time.perf_counter() - start, out.getvalue()


def run() -> str:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, pred = Path(tmp) / "init.h5", Path(tmp) / "pred.json"
        factors, _ = _timed(
            ["factors", *MODEL, "--fisher", "exact", "--seed", "1", "--quiet", "-o", str(ckpt)]
        )
        predict, _ = _timed(["predict", str(ckpt), *PREDICT, "--target", TARGET, "--quiet", "-o", str(pred)])
        parts = json.loads(pred.read_text())["seconds"]
        sweep, _ = _timed(
            ["sweep", *MODEL, *SWEEP, "--target", TARGET, "--quiet", "-o", str(Path(tmp) / "s")]
        )
    result = {
        "work": "mlp (widths=32) on digits, loss=0.3: predict (4 optimizers x 4 NQMs x 9 batch sizes) vs "
        "sweep (sgd, momentum; batch sizes 16-1024; 4 trials, 1 seed, <= 400 steps)",
        "seconds": {
            "factors": factors,
            "predict": predict,
            "predict_measure": parts["measure"],
            "predict_nqm": parts["nqm"],
            "sweep": sweep,
        },
        "ratios": {
            "predict_over_sweep": predict / sweep,
            "factors_and_predict_over_sweep": (factors + predict) / sweep,
        },
        "notes": "one process, one torch thread, on a 2-core machine shared with other jobs",
    }
    write_result("predict", result)
    r = result["ratios"]
    return (
        f"predict: {predict:.1f} s, sweep {sweep:.1f} s: predict/sweep {r['predict_over_sweep']:.3f}, "
        f"(factors + predict)/sweep {r['factors_and_predict_over_sweep']:.3f}"
    )


if __name__ == "__main__":
    print(run())
