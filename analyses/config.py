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

# The paper's settings (seed E.1, F.1, F.4) in miniature. ResNet8 (Figs. 9, 10a, 12): the paper trains on
# CIFAR-10 with batch 3000, i.e. 6% of its 50,000 training images, with random crops and horizontal flips;
# here 6% of the 1,438 digits is a batch of 86, random crops with 1-pixel padding (an eighth of the side,
# as CIFAR-10's 4 of 32) and no flips (a mirrored digit is another digit). Fig. 9 needs spectra at 0, 50,
# 100, 200 and at least twice 200 iterations: 400 steps. K-FAC (F.4): momentum 0.9; the paper tuned
# damping, KL clipping and the factor average for ResNet8, which this build does not (defaults).
SMALL = {
    "resnet8": {
        "data": "digits",
        "batch_size": 86,
        "steps": 400,
        "save_steps": "0,10,25,50,100,150,200,300,400",
        "lr": 0.1,
        "augment": "crop",
        "kfac_args": ["--momentum", "0.9"],
        "model_args": [],
        "gradcov_examples": 512,
        "gradcov_batch": 64,
        "gradcov_directions": 4,
        # K-FAC vs the exact GGN (analyses/kfac_vs_ggn.py): SLQ with W1 <= 0.2 λ_max (61 Lanczos steps);
        # ~100 GGN-vector products of ~0.5 s each on 2 idle cores
        "compare": {"examples": 128, "batch_size": 128, "top_k": 10, "accuracy": 0.2, "probes": 1,
                    "trace_probes": 8},
        "gradcov_mc_samples": 16,  # unused: 10 classes take the exact route
        "check_directions": 32,
    },
    # Fig. 10b: the shallow Transformer with the tied embedding, small enough for a CPU. K-FAC (F.4, for
    # the Transformer): momentum 0.9 and a factor moving average of 0.99.
    "transformer": {
        "data": "pystdlib",
        "batch_size": 64,
        "steps": 60,
        "save_steps": "0,20,40,60",
        "lr": 0.05,
        "augment": "",
        "kfac_args": ["--momentum", "0.9", "--factor-decay", "0.99"],
        "model_args": ["d_model=64", "d_ff=256", "heads=4", "layers=2", "seq_len=32", "vocab=2048"],
        "gradcov_examples": 128,
        "gradcov_batch": 32,  # 4 batches × (8 − 1) = 28 degrees of freedom for the standard errors
        "gradcov_directions": 2,  # the jvp cross-check through attention dominates the cost
        "compare": {"examples": 32, "batch_size": 32, "top_k": 10, "accuracy": 0.2, "probes": 1,
                    "trace_probes": 8},
        "gradcov_mc_samples": 8,
        "check_directions": 32,  # of the tied weight, in a second run of that layer alone
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
        "save_steps": "0,50,100,200,400,700,1000",
        "lr": 0.1,
        "augment": "crop,flip" if (os.environ.get("CURVLAB_DATA") or "").startswith("cifar10") else "crop",
        "kfac_args": ["--momentum", "0.9"],
        "model_args": [],
        "gradcov_examples": 4096,
        "gradcov_directions": 4,
        "compare": {"examples": 1024, "batch_size": 256, "top_k": 20, "accuracy": 0.05, "probes": 4,
                    "trace_probes": 64},
        "gradcov_mc_samples": 16,
        "check_directions": 32,
    },
    "transformer": {
        "data": "pystdlib",
        "batch_size": 128,
        "steps": 1000,
        "save_steps": "0,250,500,1000",
        "lr": 0.05,
        "augment": "",
        "kfac_args": ["--momentum", "0.9", "--factor-decay", "0.99"],
        "model_args": ["d_model=512", "d_ff=2048", "heads=8", "layers=2", "seq_len=64", "vocab=32768"],
        "gradcov_examples": 2048,
        "gradcov_directions": 2,
        "compare": {"examples": 256, "batch_size": 32, "top_k": 20, "accuracy": 0.05, "probes": 4,
                    "trace_probes": 64},
        "gradcov_mc_samples": 16,
        "check_directions": 32,
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
        "augment": "crop",
        "kfac_args": ["--momentum", "0.9"],
        "model_args": ["widths=4,4,8"],
        "gradcov_examples": 64,
        "gradcov_directions": 2,
        "compare": {"examples": 16, "batch_size": 16, "top_k": 3, "accuracy": 0.5, "probes": 1,
                    "trace_probes": 2},
        "gradcov_mc_samples": 4,
        "check_directions": 4,
    },
    "transformer": {
        "data": "pystdlib",
        "batch_size": 16,
        "steps": 2,
        "save_steps": "0,2",
        "lr": 0.05,
        "augment": "",
        "kfac_args": ["--momentum", "0.9", "--factor-decay", "0.99"],
        "model_args": ["d_model=16", "d_ff=32", "heads=2", "layers=2", "seq_len=8", "vocab=256"],
        "gradcov_examples": 16,
        "gradcov_directions": 1,
        "compare": {"examples": 8, "batch_size": 8, "top_k": 3, "accuracy": 0.5, "probes": 1,
                    "trace_probes": 2},
        "gradcov_mc_samples": 4,
        "check_directions": 4,
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


def _reduced(settings: dict[str, Any]) -> dict[str, Any]:
    """``CURVLAB_STEPS`` / ``CURVLAB_EXAMPLES`` / ``CURVLAB_NQM_ARGS``: a run of the same path with fewer
    steps, examples (training set, batch, gradcov; then also 1 jvp direction per layer, 2 for the tied
    check and 2 Monte-Carlo samples) and NQM dimensions, so that CI can run the paper scale end to end
    (``make figures SCALE=paper DATA=cifar10:DIR STEPS=1 EXAMPLES=8 NQM_ARGS='--d 1000 --bins 20'``)."""
    steps, examples = os.environ.get("CURVLAB_STEPS"), os.environ.get("CURVLAB_EXAMPLES")
    nqm = os.environ.get("CURVLAB_NQM_ARGS")
    if not (steps or examples or nqm):
        return settings
    out = {key: dict(value) if isinstance(value, dict) else value for key, value in settings.items()}
    for run in ("resnet8", "transformer"):
        s = out[run]
        if steps:
            s["steps"] = int(steps)
            kept = [int(t) for t in s["save_steps"].split(",") if int(t) < int(steps)]
            s["save_steps"] = ",".join(str(t) for t in [*kept, int(steps)])
        if examples:
            s["examples"] = int(examples)
            s["batch_size"] = min(s["batch_size"], int(examples))
            s["gradcov_examples"] = min(s["gradcov_examples"], int(examples))
            s["gradcov_directions"], s["check_directions"], s["gradcov_mc_samples"] = 1, 2, 2
    if nqm:
        out["nqm_mode"] = "binned"
        out["nqm_args"] = nqm.split()
    return out


SETTINGS = _reduced(SETTINGS)


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


class timed:  # noqa: N801 (used as ``with timed("fig09"):``)
    """Record the wall time of an analysis in ``FIGURES/timings.json`` (the page's introduction)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> timed:
        import time

        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        import time

        if exc[0] is not None:
            return
        path = FIGURES / "timings.json"
        timings = json.loads(path.read_text()) if path.exists() else {}
        timings[self.name] = round(time.perf_counter() - self.start, 1)
        write_json(path, timings)
