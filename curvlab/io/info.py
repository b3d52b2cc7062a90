"""``curvlab info``: what a factor checkpoint holds, with sanity figures for every factor.

For each factor ``X`` (``A`` or ``S``) the summary gives its kind (``dense`` for an ``(n, n)`` array,
``diagonal`` for an ``(n,)`` array holding ``diag(X)``, ``blocks`` for a ``(C, k, k)`` array holding
the diagonal blocks of a block-diagonal ``X``), shape, dtype, trace ``Σ_i X_ii``, the smallest and
largest diagonal entry, and the relative symmetry error ``max |X - X^T| / max_i |X_ii|`` (0 for a
diagonal factor). A step that records its coverage (docs/format.md) shows how many of the model's
trainable parameters have factors and which were skipped, with why. The file is validated layer by
layer while it is read, so a damaged file gives the same one-line error as every other command.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from curvlab.io.checkpoint import CheckpointReader, LayerFactors


def factor_stats(factor: np.ndarray) -> dict[str, Any]:
    """Kind, shape, dtype, trace, diagonal range and relative symmetry error of one factor."""
    if factor.ndim == 3:
        diagonal = np.diagonal(factor, axis1=1, axis2=2).reshape(-1)
    else:
        diagonal = factor if factor.ndim == 1 else np.diagonal(factor)
    scale = float(np.abs(diagonal).max()) if diagonal.size else 0.0
    if factor.ndim >= 2 and scale > 0:
        symmetry = float(np.abs(factor - np.swapaxes(factor, -1, -2)).max()) / scale
    else:
        symmetry = 0.0
    return {
        "kind": {1: "diagonal", 3: "blocks"}.get(factor.ndim, "dense"),
        "shape": list(factor.shape),
        "dtype": str(factor.dtype),
        "trace": float(diagonal.sum(dtype=np.float64)),
        "diag_min": float(diagonal.min()) if diagonal.size else 0.0,
        "diag_max": float(diagonal.max()) if diagonal.size else 0.0,
        "symmetry_error": symmetry,
    }


def layer_summary(name: str, layer: LayerFactors) -> dict[str, Any]:
    """One layer's entry of ``curvlab info --json``."""
    a, s = factor_stats(layer.A), factor_stats(layer.S)
    return {
        "name": name,
        "module_type": layer.module_type,
        "weight_shape": [int(d) for d in layer.weight_shape],
        "has_bias": bool(layer.has_bias),
        "A_shape": a["shape"],
        "S_shape": s["shape"],
        "A_kind": a["kind"],
        "S_kind": s["kind"],
        "A": a,
        "S": s,
    }


def describe_checkpoint(path: str, steps: list[int] | None = None) -> dict[str, Any]:
    """The JSON summary of a checkpoint: format, model, and every step with its layers.

    Complete steps are read (and validated) one layer at a time; incomplete ones are listed with
    ``complete: false`` and no layers.
    """
    with CheckpointReader(path) as reader:
        complete = reader.step_numbers()
        listed = [(s, True) for s in complete] + [(s, False) for s in reader.incomplete_steps()]
        entries = []
        for step, is_complete in sorted(listed):
            if steps is not None and step not in steps:
                continue
            entry: dict[str, Any] = {"step": step, "complete": is_complete}
            if is_complete:
                attrs = reader.step_attrs(step)
                entry["fisher_type"] = attrs.get("fisher_type")
                entry["num_examples"] = attrs.get("num_examples")
                entry["attrs"] = {
                    k: v for k, v in attrs.items() if k not in ("fisher_type", "num_examples")
                }
                entry["layers"] = [
                    layer_summary(name, reader.read_factors(step, name))
                    for name in reader.layer_names(step)
                ]
                entry["num_parameters_with_factors"] = sum(_parameters(layer) for layer in entry["layers"])
                coverage = reader.read_coverage(step)
                if coverage is not None:
                    entry["coverage"] = coverage
            entries.append(entry)
        return {
            "path": str(path),
            "format": "curvlab.kfac",
            "format_version": reader.format_version,
            "model": {"name": reader.model_name, "config": reader.model_config},
            "steps": entries,
        }


def _parameters(layer: dict[str, Any]) -> int:
    """The layer's weight and bias entries. The bias has one entry per output, the side of ``S`` (also
    for the pre-softmax of a tied weight); a ``NormAffine`` shift one per channel, like its scale. Exact
    Python ints: a hostile ``weight_shape`` cannot overflow the sum."""
    weight = math.prod(int(n) for n in layer["weight_shape"])
    if not layer["has_bias"]:
        return weight
    return 2 * weight if layer["module_type"] == "NormAffine" else weight + int(layer["S_shape"][0])


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable table printed by ``curvlab info``."""
    model = summary["model"]
    lines = [
        f"{summary['path']}: curvlab.kfac v{summary['format_version']}"
        + (f", model {model['name']}" if model["name"] else ""),
    ]
    for step in summary["steps"]:
        if not step["complete"]:
            lines.append(f"step {step['step']}: incomplete (skipped)")
            continue
        lines.append(
            f"step {step['step']}: fisher={step['fisher_type']}, examples={step['num_examples']}, "
            f"{len(step['layers'])} layers"
        )
        coverage = step.get("coverage")
        if coverage is not None:
            lines.extend(_coverage_lines(coverage))
        lines.append(
            f"  {'layer':<28} {'type':<13} {'A':<16} {'S':<16} {'tr A':>10} {'tr S':>10} {'sym err':>8}"
        )
        for layer in step["layers"]:
            a, s = layer["A"], layer["S"]
            symmetry = max(a["symmetry_error"], s["symmetry_error"])
            lines.append(
                f"  {layer['name']:<28} {layer['module_type']:<13} {_shape(a):<16} {_shape(s):<16} "
                f"{a['trace']:>10.4g} {s['trace']:>10.4g} {symmetry:>8.1e}"
            )
    return "\n".join(lines)


def _coverage_lines(coverage: dict[str, Any]) -> list[str]:
    """``coverage 98.7 % of 1,234 trainable parameters``, then one line per skipped parameter."""
    covered, total = coverage["covered_parameters"], coverage["total_parameters"]
    percent = 100.0 * covered / total if total else 100.0
    lines = [f"  coverage {percent:.1f} % of {total:,} trainable parameters"
             + (f", {len(coverage['skipped'])} skipped:" if coverage["skipped"] else "")]
    for item in coverage["skipped"]:
        lines.append(f"    {item['name']} ({item['parameters']:,}): {item['reason']}")
    return lines


def _shape(stats: dict[str, Any]) -> str:
    shape = "x".join(str(d) for d in stats["shape"])
    suffix = {"diagonal": " diag", "blocks": " blocks"}.get(stats["kind"], "")
    return f"{shape}{suffix}"
