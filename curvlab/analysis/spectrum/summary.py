"""The ``curvlab spectrum`` summary: the ``--json`` object and the human text.

Per step, statistics of the whole-network Kronecker spectrum (:class:`~.kronecker.KroneckerSpectrum`):
``num_eigenvalues`` counts every product ``λ_S[i] λ_A[j]``; ``min`` is the smallest *positive* one
(exact zeros counted in ``num_zeros``); ``trace``; ``condition_number = max / min``; exact
inverted-CDF ``quantiles`` at :data:`QUANTILES` over all products, zeros included; the ``top``
largest; the factor eigenvalues set to 0 (clipped, unresolved) and the retried factors; and the
same figures per layer.

numpy only at import (the step and result types are :mod:`.files`' dataclasses).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from curvlab.analysis.spectrum.kronecker import KroneckerSpectrum

if TYPE_CHECKING:
    from curvlab.analysis.spectrum.files import LayerSpectrum, SpectrumResult, StepSpectrum


# --------------------------------------------------------------------------------------------------
# Summaries


QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)


def _stats(spectrum: KroneckerSpectrum) -> dict[str, Any]:
    positive = spectrum.num_positive > 0
    return {
        "num_eigenvalues": spectrum.count,
        "num_zeros": spectrum.num_zeros,
        "max": spectrum.max(),
        "min": spectrum.min_positive() if positive else None,
        "trace": spectrum.trace,
        "condition_number": spectrum.condition_number() if positive else None,
    }


def step_summary(step: StepSpectrum, *, top: int = 10) -> dict[str, Any]:
    """The ``--json`` entry of one step: statistics of the whole-network Kronecker spectrum.

    ``num_eigenvalues`` counts every product ``λ_S[i] λ_A[j]``; ``min`` is the smallest *positive*
    one (exact zeros excluded and counted in ``num_zeros``; ``None`` if all are 0); ``quantiles``
    are exact inverted-CDF quantiles over all products, zeros included; ``top`` the largest ones.
    """
    spectrum = step.kronecker()
    out: dict[str, Any] = {
        "step": step.step,
        "fisher_type": step.fisher_type,
        "num_examples": step.num_examples,
    }
    out.update(_stats(spectrum))
    values = spectrum.quantiles(np.array(QUANTILES))
    out["quantiles"] = {str(q): float(v) for q, v in zip(QUANTILES, values, strict=True)}
    out["top"] = [float(v) for v in spectrum.top(top)]
    out["num_clipped"] = sum(sum(layer.num_clipped.values()) for layer in step.layers)
    out["num_unresolved"] = sum(sum(layer.num_unresolved.values()) for layer in step.layers)
    out["retries"] = [
        {"layer": layer.name, "factor": which, "report": list(report)}
        for layer in step.layers
        for which, report in layer.retries.items()
        if report
    ]
    out["layers"] = [_layer_summary(layer) for layer in step.layers]
    return out


def _layer_summary(layer: LayerSpectrum) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": layer.name,
        "module_type": layer.module_type,
        "S_size": int(layer.S.size),
        "A_size": int(layer.A.size),
    }
    entry.update(_stats(KroneckerSpectrum([(layer.S, layer.A)])))
    entry["num_clipped"] = {k: int(v) for k, v in layer.num_clipped.items()}
    entry["num_unresolved"] = {k: int(v) for k, v in layer.num_unresolved.items()}
    return entry


def spectrum_summary(result: SpectrumResult) -> dict[str, Any]:
    """The whole ``curvlab spectrum --json`` object."""
    return {
        "source": result.source,
        "output": result.output,
        "device": result.device,
        "dtype": result.dtype,
        "eigenvectors": result.vectors,
        "steps": [step_summary(s) for s in result.steps],
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """The human summary ``curvlab spectrum`` prints."""
    lines = []
    if summary.get("output"):
        lines.append(f"wrote {summary['output']} (eigh in {summary['dtype']} on {summary['device']})")
    for s in summary["steps"]:
        lo = "n/a" if s["min"] is None else f"{s['min']:.4g}"
        q = s["quantiles"]
        lines.append(
            f"step {s['step']}: {s['num_eigenvalues']:,} K-FAC eigenvalues over {len(s['layers'])} layers; "
            f"max {s['max']:.4g}, min {lo} (excluding {s['num_zeros']:,} exact zeros), trace {s['trace']:.4g}"
        )
        lines.append(
            "  quantiles: " + ", ".join(f"{k}: {v:.3g}" for k, v in q.items())
            + f"; factor eigenvalues set to 0: {s['num_clipped']} round-off negatives, "
            f"{s['num_unresolved']} below the solver's resolution; {len(s['retries'])} retried factors"
        )
        for layer in s["layers"]:
            lmin = "n/a" if layer["min"] is None else f"{layer['min']:.3g}"
            lines.append(
                f"  {layer['name']:<28} {layer['module_type']:<13} S {layer['S_size']:>6} x A "
                f"{layer['A_size']:>6}  max {layer['max']:.3g}  min {lmin}"
            )
    return "\n".join(lines)
