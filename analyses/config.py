"""Settings of ``make figures``: the small default (2 CPU cores, embedded data) and the paper's scale.

``make figures`` passes ``SCALE``, ``DATA`` and ``DEVICE`` through the environment
(``CURVLAB_SCALE``, ``CURVLAB_DATA``, ``CURVLAB_DEVICE``); every analysis script reads them here, so
one place says what each figure is computed from.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

SCALE = os.environ.get("CURVLAB_SCALE", "small")
DEVICE = os.environ.get("CURVLAB_DEVICE", "auto")
FIGURES = Path(os.environ.get("CURVLAB_FIGURES", "figures"))
DATA_DIR = FIGURES / "data"

SMALL = {
    # Fig. 9/10a/12: ResNet8 trained with K-FAC. The paper uses batch 3000 on CIFAR-10; the largest batch
    # the embedded digits data allows is its whole training split, 1,438 images (full-batch K-FAC).
    "resnet8": {
        "data": "digits",
        "batch_size": 1438,
        "steps": 100,
        "save_steps": "0,10,25,50,100",
        "lr": 0.1,
        "model_args": [],
        "gradcov_examples": 512,
        "gradcov_directions": 4,
        # K-FAC vs the exact GGN (analyses/kfac_vs_ggn.py): SLQ with W1 <= 0.2 λ_max (61 Lanczos steps);
        # ~100 GGN-vector products of ~0.5 s each on 2 idle cores
        "compare": {"examples": 128, "batch_size": 128, "top_k": 10, "accuracy": 0.2, "probes": 1,
                    "trace_probes": 8},
    },
    # Fig. 10b: the shallow Transformer with the tied embedding, small enough for a CPU.
    "transformer": {
        "data": "pystdlib",
        "batch_size": 64,
        "steps": 60,
        "save_steps": "0,60",
        "lr": 0.05,
        "model_args": ["d_model=64", "d_ff=256", "heads=4", "layers=2", "seq_len=32", "vocab=2048"],
        "gradcov_examples": 128,
        "gradcov_directions": 2,  # the jvp cross-check through attention dominates the cost
        "compare": {"examples": 32, "batch_size": 32, "top_k": 10, "accuracy": 0.2, "probes": 1,
                    "trace_probes": 8},
    },
    "nqm_mode": "binned",
    # The batch-size claims (analyses/sweep.py): mlp on digits, every optimizer, 4 batch sizes; a
    # quasi-random search of 8 trials per (optimizer, batch size) and 2 fresh seeds for the best.
    "sweeps": {
        "mlp": {"model": "mlp", "data": "digits", "optimizers": "sgd,momentum,adam,kfac",
                "batch_sizes": "8,32,128,512", "target": "loss=0.1", "trials": 8, "max_steps": 400,
                "seeds": 2, "workers": 2},
    },
}

# `make sweeps`: the longer sweeps of both models (hours on 2 cores; reused by `make figures SCALE=full`
# through the same study databases).
FULL_SWEEPS = {
    name: {"model": model, "data": "digits", "optimizers": "sgd,momentum,adam,kfac",
           "batch_sizes": "4,8,16,32,64,128,256,512,1024", "target": "loss=0.1", "trials": 16,
           "max_steps": 3000, "seeds": 3, "workers": 2}
    for name, model in (("mlp", "mlp"), ("simple_cnn", "simple_cnn"))
}

PAPER = {
    "resnet8": {
        "data": os.environ.get("CURVLAB_DATA") or "digits",
        "batch_size": 3000,
        "steps": 1000,
        "save_steps": "0,100,200,500,1000",
        "lr": 0.1,
        "model_args": [],
        "gradcov_examples": 4096,
        "gradcov_directions": 4,
        "compare": {"examples": 1024, "batch_size": 256, "top_k": 20, "accuracy": 0.05, "probes": 4,
                    "trace_probes": 64},
    },
    "transformer": {
        "data": "pystdlib",
        "batch_size": 128,
        "steps": 1000,
        "save_steps": "0,1000",
        "lr": 0.05,
        "model_args": ["d_model=512", "d_ff=2048", "heads=8", "layers=2", "seq_len=64", "vocab=32768"],
        "gradcov_examples": 2048,
        "gradcov_directions": 2,
        "compare": {"examples": 256, "batch_size": 32, "top_k": 20, "accuracy": 0.05, "probes": 4,
                    "trace_probes": 64},
    },
    "nqm_mode": "exact",
    "sweeps": FULL_SWEEPS,
}

# A miniature of the whole pipeline for the test suite: every step runs, on tiny sizes.
TINY = {
    "resnet8": {
        "data": "digits",
        "batch_size": 64,
        "steps": 3,
        "save_steps": "0,3",
        "lr": 0.05,
        "model_args": ["widths=4,4,8"],
        "gradcov_examples": 64,
        "gradcov_directions": 2,
        "compare": {"examples": 16, "batch_size": 16, "top_k": 3, "accuracy": 0.5, "probes": 1,
                    "trace_probes": 2},
    },
    "transformer": {
        "data": "pystdlib",
        "batch_size": 16,
        "steps": 2,
        "save_steps": "0,2",
        "lr": 0.05,
        "model_args": ["d_model=16", "d_ff=32", "heads=2", "layers=2", "seq_len=8", "vocab=256"],
        "gradcov_examples": 16,
        "gradcov_directions": 1,
        "compare": {"examples": 8, "batch_size": 8, "top_k": 3, "accuracy": 0.5, "probes": 1,
                    "trace_probes": 2},
    },
    "nqm_mode": "binned",
    "nqm_args": ["--d", "1000", "--bins", "20"],
    "sweeps": {
        "mlp": {"model": "mlp", "data": "digits", "optimizers": "sgd,momentum,adam,kfac",
                "batch_sizes": "16,64", "target": "loss=1.5", "trials": 2, "max_steps": 20, "seeds": 1,
                "workers": 1, "model_args": ["widths=8"]},
    },
}

SETTINGS: dict[str, Any] = {"paper": PAPER, "tiny": TINY}.get(SCALE, SMALL)
if SCALE == "full":  # `make sweeps`: the small scale's figures with the full sweeps
    SETTINGS = {**SMALL, "sweeps": FULL_SWEEPS}


def run_curvlab(*argv: str) -> None:
    """Run one curvlab command in this process; stop the whole build on its failure."""
    from curvlab.commands import main

    print(f"$ curvlab {' '.join(argv)}", file=sys.stderr, flush=True)
    status = main(list(argv))
    if status:
        raise SystemExit(status)


def capture_json(*argv: str) -> dict[str, Any]:
    """Run a curvlab command with ``--json`` and return what it printed."""
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        run_curvlab(*argv, "--json")
    return json.loads(buffer.getvalue().strip().splitlines()[-1])


def write_json(path: Path, payload: Any) -> None:
    from curvlab.io.atomic import atomic_output

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
