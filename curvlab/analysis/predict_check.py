"""A prediction of ``curvlab predict`` against the measured curves of ``curvlab sweep`` (docs/predict.md).

Per optimizer that both hold, with the sweep's fitted ``B_crit`` (``results.json``'s ``fit``, the same
:func:`curvlab.analysis.scaling.fit_scaling` the predicted curves were fitted with):

* per predictor (every NQM variant's fitted ``B_crit``, ``B_simple``, ``B_noise``) the error
  ``|log2(B_pred / B_crit)|`` — 1 is a factor of 2 — or ``None`` where either is missing or the measured
  ``B_crit`` is not identified (at the end of its search range: no floor or no perfect scaling seen);
* per NQM variant the error of the predicted steps over the batch sizes where both the prediction and
  the sweep's seed median are finite: ``rms_log2`` (the root mean square of ``log2(S_pred / S_meas)``,
  absolute) and ``shape_rms_log2`` (the same after dividing out the best constant factor, the
  geometric mean ratio, which is ``log2_offset``): how well the NQM predicts the number of steps, and
  how well it predicts the curve up to its unit of time.

:func:`load_prediction` reads a prediction file (size-bounded, strict JSON, its format checked).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from curvlab.errors import CurvlabError

#: Largest prediction file :func:`load_prediction` reads.
MAX_PREDICTION_BYTES = 64 << 20
SCALE_PREDICTORS = ("b_simple", "b_noise")


def load_prediction(path: str | os.PathLike) -> dict[str, Any]:
    """A prediction file written by ``curvlab predict`` (size-bounded; one-line errors)."""
    from curvlab.analysis.predict_run import FORMAT, FORMAT_VERSION
    from curvlab.io.jsonfile import read_json_file

    path = os.fspath(path)
    data = read_json_file(path, max_bytes=MAX_PREDICTION_BYTES, what="a prediction")
    if not isinstance(data, dict) or (data.get("format"), data.get("format_version")) != (
        FORMAT,
        FORMAT_VERSION,
    ):
        raise CurvlabError(f"{path}: not a curvlab prediction file (format {FORMAT} {FORMAT_VERSION})")
    return data


def _log2_error(predicted: float | None, measured: float | None) -> float | None:
    if predicted is None or measured is None or not (predicted > 0 and measured > 0):
        return None
    return abs(math.log2(predicted / measured))


def _measured_medians(results: Mapping[str, Any], optimizer: str) -> dict[int, float]:
    cells = results["optimizers"][optimizer]["cells"]
    return {int(c["batch_size"]): float(c["steps"]) for c in cells if c.get("steps")}


def steps_errors(
    batch_sizes: list[int], steps: list[int | None], measured: Mapping[int, float]
) -> dict[str, Any]:
    """``rms_log2``, ``shape_rms_log2`` and ``log2_offset`` of predicted against measured steps."""
    pairs = [(b, s, measured[b]) for b, s in zip(batch_sizes, steps, strict=True) if s and b in measured]
    out: dict[str, Any] = {"batch_sizes": [b for b, _, _ in pairs], "points": len(pairs)}
    if not pairs:
        return {**out, "rms_log2": None, "shape_rms_log2": None, "log2_offset": None}
    logs = [math.log2(s / m) for _, s, m in pairs]
    offset = sum(logs) / len(logs)
    out["log2_ratio"] = logs
    out["rms_log2"] = math.sqrt(sum(x * x for x in logs) / len(logs))
    out["log2_offset"] = offset
    out["shape_rms_log2"] = (
        math.sqrt(sum((x - offset) ** 2 for x in logs) / len(logs)) if len(pairs) > 1 else None
    )
    return out


def compare(prediction: Mapping[str, Any], results: Mapping[str, Any]) -> dict[str, Any]:
    """Errors of every predictor against the sweep ``results`` (module docstring), per optimizer."""
    predictors = prediction["predictors"]
    optimizers = [
        o for o in results.get("optimizers", {}) if any(o in p["optimizers"] for p in predictors.values())
    ]
    out: dict[str, Any] = {"optimizers": {}}
    for opt in optimizers:
        fit = results["optimizers"][opt].get("fit", {})
        b_meas = fit.get("b_crit")
        identified = bool(fit.get("identified")) and b_meas is not None
        entry: dict[str, Any] = {
            "measured": {
                "b_crit": b_meas,
                "identified": identified,
                "b_crit_interval": fit.get("b_crit_interval"),
                "s_min": fit.get("s_min"),
                "steps": _measured_medians(results, opt),
            },
            "predictors": {},
        }
        for variant, pred in predictors.items():
            curve = pred["optimizers"].get(opt)
            if curve is None:
                continue
            b_pred = curve["fit"].get("b_crit")
            err = _log2_error(b_pred, b_meas) if identified else None
            entry["predictors"][variant] = {
                "b_crit": b_pred,
                "identified": curve["fit"].get("identified"),
                "log2_error": err,
                "within_factor_2": None if err is None else err <= 1.0,
                "steps": steps_errors(curve["batch_sizes"], curve["steps"], entry["measured"]["steps"]),
            }
        for name in SCALE_PREDICTORS:
            b_pred = prediction["noise_scales"].get(name)
            err = _log2_error(b_pred, b_meas) if identified else None
            entry["predictors"][name] = {
                "b_crit": b_pred,
                "log2_error": err,
                "within_factor_2": None if err is None else err <= 1.0,
            }
        entry["measured"]["steps"] = {str(b): s for b, s in entry["measured"]["steps"].items()}
        out["optimizers"][opt] = entry
    return out
