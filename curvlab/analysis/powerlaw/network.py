"""The rank law of a whole network's K-FAC eigenspectrum, as ``curvlab fit`` reports it (seed E.4, Fig. 12).

The whole-network spectrum is the multiset of products ``λ_S[i] λ_A[j]`` over all layers
(:class:`~curvlab.analysis.spectrum.KroneckerSpectrum`); :func:`fit_network` fits it to
``λ_(i) ≈ c·i^(-s)`` with :func:`~.fit.fit_spectrum` (floor: :func:`~.fit.kronecker_floor` of the
layers' eigenvalues) and, with ``per_factor``, fits each factor's own eigenvalues with
:func:`~.fit.fit_rank_law` (a factor too small or too flat to fit gets an ``error`` entry instead).
:class:`NetworkFit` holds the result; its :meth:`~NetworkFit.to_json` is the ``curvlab fit --json``
object (without ``plot``). numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from curvlab.analysis.powerlaw.fit import default_floor, fit_rank_law, fit_spectrum, kronecker_floor
from curvlab.analysis.powerlaw.result import RankLawFit
from curvlab.errors import CheckpointError, CurvlabError, where

__all__ = ["NetworkFit", "fit_network"]


@dataclass
class NetworkFit:
    """The whole-network fit of one step: the source file (``None`` in memory), the step, the fit."""

    source: str | None
    step: int
    num_layers: int
    fit: RankLawFit
    factors: list[dict[str, Any]] | None = field(default=None)

    def to_json(self) -> dict[str, Any]:
        """``{"file", "step", "num_layers", ...the fit's fields..., "factors" (with per_factor)}``."""
        out: dict[str, Any] = {"file": self.source, "step": self.step, "num_layers": self.num_layers}
        out.update(self.fit.to_json())
        if self.factors is not None:
            out["factors"] = self.factors
        return out


def fit_network(
    layers: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    source: str | None = None,
    step: int = 0,
    k_lo: int | None = None,
    k_hi: int | None = None,
    bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    per_factor: bool = False,
    progress: bool = False,
) -> NetworkFit:
    """Fit the whole-network spectrum of ``layers`` (``{name: (eigenvalues of S, eigenvalues of A)}``).

    A failure of the whole-network fit is one :class:`~curvlab.errors.CurvlabError` line naming the
    source, step and "whole network".
    """
    from curvlab.analysis.spectrum import KroneckerSpectrum

    at = where(source, step)
    if not layers:
        raise CheckpointError(f"{at}: no layers to fit")
    pairs = list(layers.values())
    try:
        spectrum = KroneckerSpectrum(pairs)
        fit = fit_spectrum(spectrum, k_lo=k_lo, k_hi=k_hi, bootstrap=bootstrap, seed=seed,
                           confidence=confidence, floor=kronecker_floor(pairs))
    except CurvlabError as exc:
        raise type(exc)(f"{at}: whole network: {' '.join(str(exc).split())}") from None
    except ValueError as exc:  # KroneckerSpectrum's checks of the eigenvalues
        raise CheckpointError(f"{at}: whole network: {' '.join(str(exc).split())}") from None
    factors = _fit_factors(layers, bootstrap, confidence, seed, progress) if per_factor else None
    return NetworkFit(source, step, len(layers), fit, factors)


def _fit_factors(layers: Mapping[str, tuple[np.ndarray, np.ndarray]], bootstrap: int, confidence: float,
                 seed: int, progress: bool) -> list[dict[str, Any]]:
    """Fit each factor's own eigenvalues; a factor too small or flat to fit gets an ``error`` entry."""
    from curvlab.progress import progress_bar

    out = []
    items = [(name, which, ev) for name, (S, A) in layers.items() for which, ev in (("A", A), ("S", S))]
    for name, which, ev in progress_bar(items, desc="per-factor fits", enabled=progress):
        entry: dict[str, Any] = {"layer": name, "factor": which, "size": int(len(ev))}
        top = float(np.max(ev)) if len(ev) else 0.0
        try:
            fit = fit_rank_law(ev, bootstrap=bootstrap, seed=seed, confidence=confidence,
                               floor=default_floor(top, len(ev)))
            entry.update(fit.to_json())
        except CurvlabError as exc:
            entry["error"] = " ".join(str(exc).split())
        out.append(entry)
    return out
