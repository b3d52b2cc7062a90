"""``make figures SCALE=paper`` end to end, at a reduced step count, on CIFAR-10 files in the real layout.

The paper's path: ResNet8 on ``cifar10:DIR`` (the python-pickle layout, ``cifar-10-batches-py/``, written
here with synthetic pixels) with crops and flips, the paper-sized shallow Transformer (d_model 512,
vocabulary 32768, sequences of 64) with its tied embedding, the NQM; only the steps (1), the examples (8),
the checked directions and the NQM's size are reduced (``STEPS``, ``EXAMPLES``, ``NQM_ARGS``), so the path
cannot rot unnoticed.

The whole page at that scale (the K-FAC-vs-GGN comparison of the paper-sized Transformer alone takes
about 6 minutes and 10 GB on 2 CPU cores, even with 8 examples) is ``slow`` (``make test-all``); the
default run builds the paper scale's own parts: the CIFAR-10 ResNet8 run with crops and flips and its
Fig. 9/10a, and the paper-sized Transformer's run.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def write_cifar(folder: Path, per_batch: int = 20) -> None:
    """``data_batch_1..5`` and ``test_batch``: pickled dicts of ``data`` (uint8, N × 3072) and ``labels``."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        data = np.clip(rng.normal(120, 40, (per_batch, 3072)) + 8 * np.array(labels)[:, None], 0, 255)
        batch = {b"batch_label": f"batch {k}".encode(), b"labels": labels, b"data": data.astype(np.uint8),
                 b"filenames": [f"{k}_{i}.png".encode() for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def _make(tmp_path: Path, *targets: str) -> Path:
    write_cifar(tmp_path / "cifar" / "cifar-10-batches-py")
    out = tmp_path / "figs"
    run = subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), *[t.format(FIG=out) for t in targets],
         "SCALE=paper", f"FIG={out}", f"DATA=cifar10:{tmp_path / 'cifar'}", "STEPS=1", "EXAMPLES=8",
         "NQM_ARGS=--d 1000 --bins 20", "DEVICE=cpu"],
        capture_output=True, text=True, timeout=1500, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out


def test_paper_scale_runs_and_resnet8_figures(tmp_path):
    out = _make(tmp_path, "{FIG}/fig09.png", "{FIG}/fig10a.png", "{FIG}/data/runs/transformer/.done")
    assert (out / "fig09.png").stat().st_size > 0 and (out / "fig10a.png").stat().st_size > 0
    with h5py.File(out / "data" / "runs" / "resnet8" / "ckpt.h5", "r") as f:
        config = json.loads(f["model"].attrs["config"])
    assert config["data"].startswith("cifar10:") and config["name"] == "resnet8"
    with h5py.File(out / "data" / "runs" / "transformer" / "ckpt.h5", "r") as f:
        config = json.loads(f["model"].attrs["config"])
    assert config["args"]["vocab"] == 32768 and config["args"]["d_model"] == 512


@pytest.mark.slow
def test_paper_scale_figures_end_to_end(tmp_path):
    out = _make(tmp_path, "figures")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scale"] == "paper"
    resnet8 = summary["introduction"]["runs"]["resnet8"]
    assert resnet8["data"].startswith("cifar10:") and resnet8["augment"] == ["crop", "flip"]
    assert summary["introduction"]["runs"]["transformer"]["model_args"]["vocab"] == 32768
    assert all(entry["produced"] for entry in summary["figures"].values())
