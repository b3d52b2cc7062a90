"""Eigendecompositions of K-FAC factors and the whole-network Kronecker eigenspectrum (seed E.1, E.4).

Math (design.md, "Math conventions"). A layer's Fisher block is ``F ~= S (x) A`` (seed eq. 13). With
``A = Q_A diag(λ_A) Q_A^T`` and ``S = Q_S diag(λ_S) Q_S^T`` (the Kronecker-factored eigenbasis, KFE),
``S (x) A = (Q_S (x) Q_A) diag(λ_S (x) λ_A) (Q_S (x) Q_A)^T``: its eigenvalues are the products
``λ_S[i] λ_A[j]`` and direction ``(i, j)`` is the weight perturbation ``Q_S[:, i] Q_A[:, j]^T``.
The whole-network K-FAC eigenspectrum (Fig. 9; the sorted spectrum of Fig. 12 / seed E.4) is the
multiset of these products over all layers.

One concept per module; each imports only modules above it in this list:

* :mod:`~curvlab.analysis.spectrum.engine` — **the engine**: ``X = Q diag(λ) Q^T`` of every factor
  with ``torch.linalg.eigh``, batched, with retries and the clipping of round-off negatives
  (:func:`decompose_factors`, :func:`decompose_checkpoint`, :class:`FactorEig`).
* :mod:`~curvlab.analysis.spectrum.sharing` — **under torchrun**, a step's ``eigh`` calls shared
  out among the processes by size (LPT, :func:`assign_batches`) and the results sent to process 0.
* :mod:`~curvlab.analysis.spectrum.kronecker` — **the Kronecker spectrum** (:class:`KroneckerSpectrum`):
  counts, histograms, quantiles and exact order statistics of the products, never materialised.
* :mod:`~curvlab.analysis.spectrum.files` — **the spectrum file**: :func:`compute_spectrum` (what
  ``curvlab spectrum`` does) writes it, :func:`load_layer_eigenvalues` reads it or a checkpoint back.
* :mod:`~curvlab.analysis.spectrum.summary` — the ``curvlab spectrum --json`` object and its human text.

This package re-exports the public names of all five (the names of the former single module
``curvlab/analysis/spectrum.py``); private helpers are imported from the module that defines them.

torch is imported only by the engine: ``KroneckerSpectrum`` and the spectrum-file reader need numpy
and h5py only.
"""

from __future__ import annotations

from curvlab.analysis.spectrum.engine import (
    DEFAULT_BATCH_BYTES,
    DTYPES,
    FactorEig,
    decompose_checkpoint,
    decompose_factor,
    decompose_factors,
    negative_tolerance,
    solver_resolution,
)
from curvlab.analysis.spectrum.files import (
    SPECTRUM_FORMAT,
    SPECTRUM_FORMAT_VERSION,
    LayerSpectrum,
    SpectrumResult,
    StepSpectrum,
    compute_spectrum,
    default_output_path,
    load_layer_eigenvalues,
    spectrum_of_factors,
)
from curvlab.analysis.spectrum.kronecker import KroneckerSpectrum
from curvlab.analysis.spectrum.sharing import assign_batches, assign_factors, factor_cost, plan_batches
from curvlab.analysis.spectrum.summary import format_summary as format_summary  # not in __all__, as before
from curvlab.analysis.spectrum.summary import spectrum_summary, step_summary

__all__ = [
    "DEFAULT_BATCH_BYTES",
    "DTYPES",
    "SPECTRUM_FORMAT",
    "SPECTRUM_FORMAT_VERSION",
    "FactorEig",
    "KroneckerSpectrum",
    "LayerSpectrum",
    "SpectrumResult",
    "StepSpectrum",
    "assign_batches",
    "assign_factors",
    "compute_spectrum",
    "decompose_checkpoint",
    "decompose_factor",
    "decompose_factors",
    "default_output_path",
    "factor_cost",
    "load_layer_eigenvalues",
    "negative_tolerance",
    "plan_batches",
    "solver_resolution",
    "spectrum_of_factors",
    "spectrum_summary",
    "step_summary",
]
