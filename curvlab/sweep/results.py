"""``SWEEP/results.json``: the measured steps-to-target curves of a sweep, read from its study database.

Per optimizer and batch size (a *cell*):

* ``trials``, ``reached``, ``diverged``: complete search trials, and how many of them reached the
  target or diverged;
* ``best``: the search trial with the fewest steps to the target (:func:`curvlab.sweep.study.best_trial`)
  — its number, its steps at the base seed, its searched parameters and the ``TrainConfig`` fields
  they became;
* ``seeds``: that configuration re-run at fresh seeds — per seed its steps (``null``: not reached
  within ``max_steps``), and the ``median``, ``min`` and ``max``; the median counts a seed that did not
  reach the target as infinitely many steps, so it is ``null`` when half the seeds or more failed;
* ``steps``: the cell's steps to the target, the seeds' median.

Per optimizer, ``fit`` is McCandlish et al.'s ``S(B) = S_min (1 + B_crit / B)`` fitted to every seed's
steps at the batch sizes whose median is finite (:func:`curvlab.analysis.scaling.fit_scaling`, 90 %
percentile-bootstrap intervals over seeds), or ``{"error": …}`` with fewer than two such batch sizes.

From Python (``curvlab predict`` compares its predictions with these): :func:`load_results` reads a
results file, :func:`measured_curve` gives one optimizer's batch sizes and per-seed steps.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

from curvlab.errors import CurvlabError
from curvlab.sweep.config import SweepConfig
from curvlab.sweep.study import _redact, best_trial, cell_done, cell_state

RESULTS_FILE = "results.json"
FORMAT = "curvlab.sweep"
FORMAT_VERSION = 1
#: Largest results file :func:`load_results` reads.
MAX_RESULTS_BYTES = 64 << 20


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    mid = n // 2
    return ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def _cell(storage, config: SweepConfig, optimizer: str, batch_size: int) -> dict[str, Any]:
    state = cell_state(storage, optimizer, batch_size)
    best = best_trial(state)
    cell: dict[str, Any] = {
        "batch_size": batch_size,
        "finished": cell_done(state, config),
        "trials": len(state.complete),
        "reached": len(state.reached),
        "diverged": sum(1 for t in state.complete if t.user_attrs.get("outcome") == "diverged"),
        "best": None,
        "seeds": None,
        "steps": None,
    }
    if best is None:
        return cell
    cell["best"] = {
        "trial": best.number,
        "steps": best.user_attrs["steps"],
        "seed": best.user_attrs.get("seed"),
        "params": dict(best.params),
        "train": best.user_attrs.get("train"),
    }
    runs: dict[int, Any] = {}
    for t in sorted(state.seed_trials, key=lambda t: t.number):
        runs.setdefault(int(t.params["seed_index"]), t)  # a duplicate seed run: the first one counts
    indices = sorted(k for k in runs if 1 <= k <= config.seeds)
    steps = [runs[k].user_attrs.get("steps") if runs[k].user_attrs.get("outcome") == "reached" else None
             for k in indices]
    finite = [float(s) for s in steps if s is not None]
    as_inf = [float(s) if s is not None else math.inf for s in steps]
    median = _median(as_inf) if as_inf else math.inf
    cell["seeds"] = {
        "seeds": [config.seed + k for k in indices],
        "steps": steps,
        "reached": len(finite),
        "median": median if math.isfinite(median) else None,
        "min": min(finite) if finite else None,
        "max": max(finite) if finite else None,
    }
    cell["steps"] = cell["seeds"]["median"]
    return cell


def collect(
    storage, config: SweepConfig, *, url: str | None = None, replicates: int = 1000
) -> dict[str, Any]:
    """The results of the sweep as stored now (finished or not; ``complete`` says which)."""
    from curvlab.analysis.scaling import ScalingFitError, fit_scaling

    optimizers: dict[str, Any] = {}
    complete = True
    for opt in config.optimizers:
        cells = [_cell(storage, config, opt, b) for b in config.batch_sizes]
        complete &= all(c["finished"] for c in cells)
        usable = [c for c in cells if c["steps"] is not None]
        try:
            fit = fit_scaling([c["batch_size"] for c in usable],
                              [[s for s in c["seeds"]["steps"] if s is not None] for c in usable],
                              level=0.9, replicates=replicates).to_json()
        except ScalingFitError as exc:
            fit = {"error": str(exc)}
        optimizers[opt] = {"cells": cells, "fit": fit}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "complete": complete,
        "config": config.to_json(),
        "storage": _redact(url) if url else None,
        "optimizers": optimizers,
    }


def measured_curve(results: Mapping[str, Any], optimizer: str) -> tuple[list[int], list[list[float]]]:
    """One optimizer's batch sizes and, per batch size, the seeds' steps that reached the target
    (batch sizes whose median is not finite are left out) — the points its ``fit`` was made from."""
    try:
        cells = results["optimizers"][optimizer]["cells"]
    except (KeyError, TypeError):
        raise CurvlabError(f"the sweep results hold no optimizer {optimizer!r}") from None
    sizes, steps = [], []
    for c in cells:
        if c.get("steps") is None:
            continue
        sizes.append(int(c["batch_size"]))
        steps.append([float(s) for s in c["seeds"]["steps"] if s is not None])
    return sizes, steps


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``results.json`` written by ``curvlab sweep`` (size-bounded; one-line errors)."""
    from curvlab.io.jsonfile import read_json_file

    path = os.fspath(path)
    data = read_json_file(path, max_bytes=MAX_RESULTS_BYTES, what="a sweep's results")
    if not isinstance(data, dict) or (data.get("format"),
                                      data.get("format_version")) != (FORMAT, FORMAT_VERSION):
        raise CurvlabError(f"{path}: not a curvlab sweep results file (format {FORMAT} {FORMAT_VERSION})")
    return data


def write_results(path: str, results: Mapping[str, Any]) -> None:
    from curvlab.io.atomic import atomic_output

    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, allow_nan=False)


def summary(results: Mapping[str, Any]) -> dict[str, Any]:
    """The ``--json`` summary: per optimizer the steps at each batch size and the fit."""
    out: dict[str, Any] = {"complete": results["complete"], "optimizers": {}}
    for opt, r in results["optimizers"].items():
        out["optimizers"][opt] = {
            "batch_sizes": [c["batch_size"] for c in r["cells"]],
            "steps": [c["steps"] for c in r["cells"]],
            "reached": [f"{c['reached']}/{c['trials']}" for c in r["cells"]],
            "s_min": r["fit"].get("s_min"),
            "b_crit": r["fit"].get("b_crit"),
            "b_crit_interval": r["fit"].get("b_crit_interval"),
        }
    return out
