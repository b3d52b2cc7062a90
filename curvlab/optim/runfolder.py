"""The run folder of ``curvlab train``: its files, read and written crash-safely.

A run lives in one folder ``RUN/`` (docs/training.md):

* ``config.json``: the resolved :class:`~curvlab.optim.config.TrainConfig` and the model config
  (written once, atomically);
* ``ckpt.h5``: a factor checkpoint (docs/format.md) with the factors and the model weights at every
  saved step, step 0 (the initial weights) included; each step is appended crash-safely
  (:func:`curvlab.io.checkpoint.append_step`: copy, write, ``complete`` last, rename);
* ``metrics.jsonl``: one JSON line per step ``{"step", "loss", "lr", "time"}`` (plus ``"nu"``, the KL
  clipping factor, for K-FAC), appended and flushed;
* ``state-<t>.pt``: everything needed to continue from the last saved step ``t`` — weights, optimizer
  state, RNG states — as tensors and plain numbers (``torch.save``; read back with
  ``torch.load(weights_only=True)``, never unpickling arbitrary objects). Written atomically *before*
  step ``t`` is appended to ``ckpt.h5``; older ones are deleted after.

Here: the file names, reading the stored config, the state files present, the complete steps of the
checkpoint, cutting the metrics back to a step and removing the temporary files a killed writer left
behind. What goes into a state file, and when, is the run's (:mod:`curvlab.optim.train`).
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Any

from curvlab.errors import CheckpointError
from curvlab.io.atomic import atomic_output, remove_quietly
from curvlab.io.checkpoint import CheckpointReader
from curvlab.limits import MAX_ATTRIBUTE_BYTES, check_regular_file
from curvlab.optim.config import TrainConfig

CONFIG_FILE, CHECKPOINT_FILE, METRICS_FILE = "config.json", "ckpt.h5", "metrics.jsonl"
STATE_FORMAT = "curvlab.train-state"
_STATE_NAME = re.compile(r"^state-(0|[1-9][0-9]*)\.pt$")


def read_config(run_dir: str) -> TrainConfig | None:
    """The run's stored :class:`TrainConfig` (``None`` if the folder has no config.json)."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.lexists(path):
        return None
    size = check_regular_file(path, CheckpointError, "run config")
    if size > MAX_ATTRIBUTE_BYTES:
        raise CheckpointError(f"{path}: {size} bytes, too large for a run's config (at most "
                              f"{MAX_ATTRIBUTE_BYTES})")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle, parse_constant=_refuse_constant)
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: cannot read the run's config ({_first_line(exc)})") from None
    if not isinstance(data, dict) or not isinstance(data.get("train"), dict):
        raise CheckpointError(f"{path}: not a curvlab training config (no 'train' object)")
    return TrainConfig.from_json(data["train"], path)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a finite number")


def _write_json(path: str, data: Any) -> None:
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")


def _state_files(run_dir: str) -> dict[int, str]:
    out = {}
    for name in os.listdir(run_dir):
        match = _STATE_NAME.match(name)
        if match:
            out[int(match.group(1))] = os.path.join(run_dir, name)
    return out


def _remove_stale_temps(run_dir: str) -> None:
    """Temp files a killed writer left behind (``.<name>.tmp-<pid>-<hex>``, see curvlab.io.atomic)."""
    for pattern in (f".{CHECKPOINT_FILE}.tmp-*", f".{CONFIG_FILE}.tmp-*", f".{METRICS_FILE}.tmp-*",
                    ".state-*.pt.tmp-*"):
        for path in glob.glob(os.path.join(glob.escape(run_dir), pattern)):
            remove_quietly(path)


def _complete_steps(path: str) -> list[int]:
    if not os.path.exists(path):
        return []
    with CheckpointReader(path) as reader:
        return reader.step_numbers()


def _truncate_metrics(path: str, last_step: int) -> None:
    """Keep the metric lines of steps ``<= last_step`` (drops a line cut short by a kill)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            step = record.get("step") if isinstance(record, dict) else None
            if isinstance(step, int) and step <= last_step:
                kept.append(json.dumps(record))
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.writelines(line + "\n" for line in kept)


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
