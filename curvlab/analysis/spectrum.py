"""Eigendecompositions of K-FAC factors and the whole-network Kronecker eigenspectrum (seed E.1, E.4).

Math (design.md, "Math conventions"). A layer's Fisher block is ``F ~= S (x) A`` (seed eq. 13). With
``A = Q_A diag(λ_A) Q_A^T`` and ``S = Q_S diag(λ_S) Q_S^T`` (the Kronecker-factored eigenbasis, KFE),
``S (x) A = (Q_S (x) Q_A) diag(λ_S (x) λ_A) (Q_S (x) Q_A)^T``: its eigenvalues are the products
``λ_S[i] λ_A[j]`` and direction ``(i, j)`` is the weight perturbation ``Q_S[:, i] Q_A[:, j]^T``.
The whole-network K-FAC eigenspectrum (Fig. 9; the sorted spectrum of Fig. 12 / seed E.4) is the
multiset of these products over all layers.

Two parts:

* **The engine** (:func:`decompose_factors`, :func:`decompose_checkpoint`): every dense factor is
  symmetrised, ``(X + X^T) / 2``, and decomposed with ``torch.linalg.eigh`` (ascending eigenvalues,
  ``X = Q diag(λ) Q^T``), equal-size factors stacked into one batched call, on the CPU or a GPU.
  A diagonal factor needs no decomposition: its eigenvalues are its sorted entries and its
  eigenvectors a permuted identity, stored as the permutation ``order`` (``λ[k] = d[order[k]]``,
  ``Q[:, k] = e_{order[k]}``). A failed decomposition (non-convergence, a cuSOLVER error, out of
  memory, non-finite output) is retried in float64, then on the CPU, and the retries are reported.
  Round-off makes the smallest eigenvalues of a rank-deficient factor slightly negative: those within
  the tolerance of :func:`negative_tolerance` are clipped to 0 and counted; a clearly negative one
  is a :class:`~curvlab.errors.CheckpointError` naming file, step, layer and factor.
* **The Kronecker spectrum** (:class:`KroneckerSpectrum`): counts, histograms, quantiles, top-k and
  exact order statistics of the products, from the sorted factor eigenvalues, without materialising
  the products (see the class docstring for the algorithm).

The command ``curvlab spectrum`` writes the eigenvalues and eigenvectors to a spectrum file
(``format = "curvlab.spectrum"``, documented in ``docs/format.md``, "Spectrum files"), computed by
:func:`compute_spectrum`; :func:`load_layer_eigenvalues` reads either kind of file back.

**Under torchrun** (:mod:`curvlab.distributed`, docs/distributed.md) each step's work is shared out
by size: the units are the ``eigh`` calls one process would make (:func:`plan_batches`: a diagonal
factor, or a batch of equal-size dense ones; big factors are always alone), largest first, each to
the process with the least work so far (:func:`assign_batches`, LPT), the work of a factor being
``n^3`` for a dense ``n x n`` one and ``n`` for a diagonal one. Every process reads only the layers
that hold its factors, makes its calls with the engine above (same options, retries and clipping)
and sends the results to process 0 point-to-point (eigenvalues and eigenvectors bit for bit, in the
dtype they were computed in); process 0 writes the same spectrum file, summary and plot as one
process. The results are identical to one process's because each factor's decomposition is the
same computation wherever it runs: the same symmetrised input, at the same place of the same
batched ``eigh`` call, in the same dtype, on the same kind of device. (Keeping the batches matters:
MKL rounds a matrix differently at a batch offset that is not 16-byte aligned.)

torch is imported only by the engine: ``KroneckerSpectrum`` and the spectrum-file reader need numpy
and h5py only.
"""

from __future__ import annotations

import fnmatch
import heapq
import json
import math
import os
import warnings
from collections.abc import Collection, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import h5py
import numpy as np

from curvlab.errors import CheckpointError, CurvlabError, OptionError, where
from curvlab.io.atomic import atomic_output, derived_path, same_file
from curvlab.io.checkpoint import (
    CheckpointReader,
    IncompleteStepWarning,
    _open_read_only,
    expected_factor_sizes,
)

if TYPE_CHECKING:
    import torch

    from curvlab.distributed import Context

K = TypeVar("K", bound=Hashable)

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
    "spectrum_summary",
    "step_summary",
]

SPECTRUM_FORMAT = "curvlab.spectrum"
SPECTRUM_FORMAT_VERSION = 1
DTYPES = ("float64", "float32")

#: Dense factors waiting to be decomposed in one batched call are held up to this many bytes (in the
#: compute dtype); a factor at least this large is decomposed on its own. Peak memory is about this
#: plus the largest layer plus the batch's eigenvectors and eigh's workspace (LAPACK's syevd needs
#: ~2n^2 more), about 4x the batch. On a GPU a batch of many small matrices is one kernel launch, so
#: batches are large; on the CPU torch runs LAPACK one matrix at a time anyway, so batching only
#: saves per-call overhead for small factors and a small budget keeps memory near one factor's.
DEFAULT_BATCH_BYTES = {"cuda": 256 << 20, "cpu": 16 << 20}

_EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7


# --------------------------------------------------------------------------------------------------
# Tolerance of clipping


def negative_tolerance(kind: str, n: int, dtype: str = "float64") -> float:
    """Relative tolerance ``tol``: eigenvalues in ``[-tol * λ_max, 0)`` are round-off, clipped to 0.

    ``tol = n * eps32`` for a dense ``n x n`` factor decomposed in float64 (``2 n eps32`` in
    float32, whose own solver error is of that size too) and ``eps32`` for a diagonal one, with
    ``eps32 = 2^-23 ~= 1.19e-7`` the float32 machine epsilon, whatever the dtype of the file or of
    the decomposition. Why float32's epsilon: a float64 factor is usually a float64 sum of float32
    products (curvlab's own capture does this, ``docs/factors.md``), so its entries carry float32
    rounding, a symmetric perturbation ``E`` with ``||E||_2 <~ n * eps32 * λ_max``; a float32
    decomposition has a backward error of the same order (Weyl: eigenvalues move by at most
    ``||E||_2``). Measured on curvlab's checkpoints (mlp and resnet8 on digits, float64 files): the
    most negative eigenvalue was ``-1.6e-8 λ_max``, about 1000x inside ``n * eps32`` for n = 129.
    A diagonal factor has no solver error and a sum of squares cannot round below 0, so only a
    few ulps are tolerated. A genuinely indefinite factor (a sign error, a wrong update) has
    negative eigenvalues of order ``λ_max`` and fails.
    """
    if kind != "dense":
        return _EPS32
    return _EPS32 * max(int(n), 1) * (2 if dtype == "float32" else 1)


def solver_resolution(n: int, dtype: str) -> float:
    """Relative resolution of a dense ``n x n`` eigendecomposition in ``dtype``: ``n * eps(dtype)``.

    A backward-stable symmetric eigensolver returns eigenvalues with absolute errors up to about
    ``p(n) * eps * ||X||_2 = p(n) * eps * λ_max`` (Weyl), so a computed eigenvalue in
    ``(0, n * eps * λ_max]`` cannot be told from 0: it is set to 0 and counted as *unresolved*
    (``numpy.linalg.matrix_rank`` uses the same threshold for the numerical rank). Without this,
    the null space of a rank-deficient factor shows up in the spectrum as clusters of meaningless
    values ~1e-20 λ_max (float64) whose products reach 1e-40. float64: ``n * 2.2e-16``; float32:
    ``n * 1.2e-7``. Diagonal factors are exact and are not thresholded.
    """
    return max(int(n), 1) * float(np.finfo(np.dtype(dtype)).eps)


# --------------------------------------------------------------------------------------------------
# Results of the engine


@dataclass
class FactorEig:
    """The eigendecomposition ``X = Q diag(λ) Q^T`` of one factor, ``λ`` ascending.

    ``eigenvalues`` are float64, ascending, ``>= 0``: ``num_clipped`` of them were tiny negatives
    (within ``tolerance * λ_max``, :func:`negative_tolerance`) and ``num_unresolved`` tiny positives
    (below ``resolution * λ_max``, :func:`solver_resolution`), both set to 0. A dense factor has
    ``eigenvectors`` ``Q`` (columns, in the dtype the decomposition ran in; ``None`` when vectors
    were not asked for). A diagonal factor ``d`` has ``order``, the permutation with
    ``λ[k] = d[order[k]]`` (``Q[:, k] = e_{order[k]}``).
    ``dtype`` and ``device`` say where the decomposition finally ran, ``retries`` what failed first.
    """

    kind: str
    eigenvalues: np.ndarray
    eigenvectors: np.ndarray | None = None
    order: np.ndarray | None = None
    num_clipped: int = 0
    tolerance: float = 0.0
    num_unresolved: int = 0
    resolution: float = 0.0
    dtype: str = "float64"
    device: str = "cpu"
    retries: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return int(self.eigenvalues.shape[0])

    def eigenvector_matrix(self) -> np.ndarray:
        """``Q`` as a dense matrix (a permuted identity for a diagonal factor)."""
        if self.kind == "diagonal":
            q = np.zeros((self.size, self.size))
            q[self.order, np.arange(self.size)] = 1.0
            return q
        if self.eigenvectors is None:
            raise ValueError("the eigenvectors were not computed (vectors=False)")
        return self.eigenvectors

    def reconstruct(self) -> np.ndarray:
        """``Q diag(λ) Q^T`` in float64 (the factor, up to rounding and clipping)."""
        q = self.eigenvector_matrix().astype(np.float64)
        return (q * self.eigenvalues) @ q.T


class _EighFailure(Exception):
    """One attempt of torch's eigh failed; the message says how."""


def _resolve_device(device: str | torch.device) -> torch.device:
    import torch

    from curvlab.device import resolve_device

    return device if isinstance(device, torch.device) else resolve_device(str(device))


def _check_dtype_name(dtype: str) -> str:
    if dtype not in DTYPES:
        raise OptionError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    return dtype


def _attempts(dtype: str, device: torch.device) -> list[tuple[str, torch.device]]:
    """The escalation: as asked, then float64 on the same device, then float64 on the CPU."""
    import torch

    plan = [(dtype, device)]
    if dtype != "float64":
        plan.append(("float64", device))
    if device.type != "cpu":
        plan.append(("float64", torch.device("cpu")))
    return plan


def _stack(arrays: Sequence[np.ndarray], dtype: str) -> np.ndarray:
    """The symmetrised factors ``(X + X^T) / 2`` stacked ``(B, n, n)`` in the compute dtype."""
    n = arrays[0].shape[0]
    out = np.empty((len(arrays), n, n), dtype=dtype)
    for k, x in enumerate(arrays):
        np.add(x, x.T, out=out[k], dtype=dtype)  # the sum in the compute dtype, not the file's
        out[k] *= 0.5
    return out


def _eigh_once(
    arrays: Sequence[np.ndarray], dtype: str, device: torch.device, vectors: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """One batched ``torch.linalg.eigh`` (``eigvalsh`` without vectors); raises :class:`_EighFailure`."""
    import torch

    try:
        x = torch.from_numpy(_stack(arrays, dtype)).to(device)
        if vectors:
            vals, vecs = torch.linalg.eigh(x)
        else:
            vals, vecs = torch.linalg.eigvalsh(x), None
        del x
        # Eigenvectors are orthonormal (|entries| <= 1), so NaN/inf show in their sum: one pass, no
        # boolean copy of an n x n matrix.
        finite = bool(torch.isfinite(vals).all()) and (vecs is None or bool(torch.isfinite(vecs.sum())))
        if not finite:
            raise _EighFailure("non-finite eigenvalues or eigenvectors")
        return vals.double().cpu().numpy(), None if vecs is None else vecs.cpu().numpy()
    except (RuntimeError, MemoryError) as exc:  # LinAlgError, cuSOLVER errors, OutOfMemoryError
        if device.type == "cuda" and isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        text = " ".join(str(exc).split())[:200]
        raise _EighFailure(f"{type(exc).__name__.lstrip('_')}: {text}") from None


def _eigh_escalating(
    arrays: Sequence[np.ndarray], dtype: str, device: torch.device, vectors: bool, *, batched: bool
) -> list[tuple[np.ndarray, np.ndarray | None, str, str, tuple[str, ...]]]:
    """Decompose ``arrays`` (equal size), retrying as :func:`_attempts` says.

    A failed batch of several factors is split: each factor then goes through the whole escalation
    on its own, so a report names the factor that failed. Returns, per factor, ``(eigenvalues,
    eigenvectors, dtype, device, retries)``; a factor that fails every attempt raises
    :class:`_EighFailure` carrying its index.
    """
    plan = _attempts(dtype, device)
    if batched and len(arrays) > 1:
        try:
            vals, vecs = _eigh_once(arrays, dtype, device, vectors)
        except _EighFailure as exc:
            first = f"batched eigh of {len(arrays)} factors in {dtype} on {device.type} failed ({exc})"
            return [_eigh_single(x, plan, vectors, (first,), index=k) for k, x in enumerate(arrays)]
        return [
            (vals[k], None if vecs is None else vecs[k], dtype, device.type, ())
            for k in range(len(arrays))
        ]
    return [_eigh_single(x, plan, vectors, (), index=k) for k, x in enumerate(arrays)]


def _eigh_single(
    x: np.ndarray, plan: list, vectors: bool, retries: tuple[str, ...], *, index: int
) -> tuple[np.ndarray, np.ndarray | None, str, str, tuple[str, ...]]:
    failures = list(retries)
    for k, (dtype, device) in enumerate(plan):
        try:
            vals, vecs = _eigh_once([x], dtype, device, vectors)
        except _EighFailure as exc:
            nxt = plan[k + 1] if k + 1 < len(plan) else None
            then = f"; retried in {nxt[0]} on {nxt[1].type}" if nxt else ""
            failures.append(f"eigh in {dtype} on {device.type} failed ({exc}){then}")
            continue
        return vals[0], None if vecs is None else vecs[0], dtype, device.type, tuple(failures)
    err = _EighFailure("; ".join(failures))
    err.index = index  # type: ignore[attr-defined]
    raise err


@dataclass
class _Cleaned:
    vals: np.ndarray
    num_clipped: int
    tolerance: float
    num_unresolved: int
    resolution: float


def _clip(
    vals: np.ndarray, kind: str, dtype: str | None, *, path: object, step: object, layer: object, which: str
) -> _Cleaned:
    """Eigenvalues in ``[-tol * λ_max, 0)`` (clipped) and, for a dense factor decomposed in ``dtype``,
    in ``(0, resolution * λ_max]`` (unresolved) set to 0; one below ``-tol * λ_max`` is a
    CheckpointError naming the factor."""
    n = vals.shape[0]
    tol = negative_tolerance(kind, n, dtype or "float64")
    res = solver_resolution(n, dtype) if kind == "dense" and dtype else 0.0
    if vals.size == 0:
        return _Cleaned(vals, 0, tol, 0, res)
    top = float(vals.max())
    low = float(vals.min())
    if low < 0 and low < -tol * max(top, 0.0):
        i = int(np.argmin(vals))
        raise CheckpointError(
            f"{where(path, step, layer)}: factor {which} is not positive semi-definite: eigenvalue "
            f"{low:.6g} (#{i} of {vals.shape[0]}) is below -{tol:.3g} * λ_max ({top:.6g})"
        )
    negative = vals < 0
    unresolved = (vals > 0) & (vals <= res * top)
    if negative.any() or unresolved.any():
        vals = np.where(negative | unresolved, 0.0, vals)
    return _Cleaned(vals, int(negative.sum()), tol, int(unresolved.sum()), res)


def decompose_factor(
    x: np.ndarray,
    *,
    device: str | torch.device = "cpu",
    dtype: str = "float64",
    vectors: bool = True,
    name: str = "X",
) -> FactorEig:
    """The eigendecomposition of one factor (dense ``(n, n)`` or diagonal ``(n,)``).

    See :func:`decompose_factors`, which does the same for many factors with batching.
    """
    ((_, eig),) = list(decompose_factors([(name, x)], device=device, dtype=dtype, vectors=vectors))
    return eig


def _diagonal_eig(d: np.ndarray, *, path: object, step: object, layer: object, which: str) -> FactorEig:
    """A diagonal factor: ``λ = sort(d)``, ``order = argsort(d)`` (stable), no decomposition."""
    order = np.argsort(d, kind="stable")
    vals = np.asarray(d, dtype=np.float64)[order]
    c = _clip(vals, "diagonal", None, path=path, step=step, layer=layer, which=which)
    return FactorEig(
        kind="diagonal",
        eigenvalues=c.vals,
        order=order.astype(np.int64),
        num_clipped=c.num_clipped,
        tolerance=c.tolerance,
        dtype=str(d.dtype),
        device="cpu",
    )


def _split_key(key: Hashable) -> tuple[object, str]:
    """``(layer, which)`` of a key ``(layer, "A"|"S")``; other keys name the factor itself."""
    if isinstance(key, tuple) and len(key) == 2:
        return key[0], str(key[1])
    return None, str(key)


def decompose_factors(
    items: Iterable[tuple[Hashable, np.ndarray]],
    *,
    device: str | torch.device = "cpu",
    dtype: str = "float64",
    vectors: bool = True,
    batch_bytes: int | None = None,
    path: object = None,
    step: object = None,
) -> Iterator[tuple[Hashable, FactorEig]]:
    """Eigendecompose factors lazily, batching dense factors of equal size; yields ``(key, eig)``.

    ``items`` yields ``(key, X)`` with ``X`` dense ``(n, n)`` or diagonal ``(n,)``; a key
    ``(layer, "A")`` names the layer and factor in error messages (with ``path`` and ``step``).
    Diagonal factors come out at once; dense ones wait, grouped by size, until their group holds
    ``batch_bytes`` (default :data:`DEFAULT_BATCH_BYTES` of the device) or all waiting groups
    together exceed it (the largest group goes), then go through one ``torch.linalg.eigh`` call
    (``eigvalsh`` when ``vectors`` is false) on ``device`` in ``dtype`` (``"float64"`` or
    ``"float32"``). Results therefore come out of order. ``items`` is consumed lazily, so peak
    memory is about ``batch_bytes`` plus what one item holds, plus eigh's output and workspace.

    Each factor is symmetrised first, ``(X + X^T) / 2`` in the compute dtype. Failures are retried
    (float64, then the CPU; see :class:`FactorEig`.retries); eigenvalues are clipped as
    :func:`negative_tolerance` says.
    """
    dev = _resolve_device(device)
    dtype = _check_dtype_name(dtype)
    batcher = _Batcher(_batch_budget(batch_bytes, dev), dtype)
    for key, x in items:
        x = np.asarray(x)
        if x.ndim == 1:
            layer, which = _split_key(key)
            yield key, _diagonal_eig(x, path=path, step=step, layer=layer, which=which)
            continue
        if x.ndim != 2 or x.shape[0] != x.shape[1]:
            layer, which = _split_key(key)
            raise CheckpointError(f"{where(path, step, layer)}: factor {which} has shape {x.shape}")
        for group in batcher.add((key, x), x.shape[0]):
            yield from _decompose_group(group, dev, dtype, vectors, path, step)
    for group in batcher.finish():
        yield from _decompose_group(group, dev, dtype, vectors, path, step)


def _batch_budget(batch_bytes: int | None, device: torch.device) -> int:
    """``batch_bytes``, or the device's default (:data:`DEFAULT_BATCH_BYTES`)."""
    if batch_bytes is None:
        return DEFAULT_BATCH_BYTES.get(device.type, DEFAULT_BATCH_BYTES["cpu"])
    return batch_bytes


class _Batcher:
    """Which dense factors go through one ``eigh`` call together (:func:`decompose_factors`), from
    their sizes alone: factors wait in groups of equal size ``n``; a group that reaches
    ``batch_bytes`` (``n^2`` entries of ``dtype`` each) goes at once, and while all the waiting
    groups together exceed it the largest goes. :meth:`finish` gives the rest, by size."""

    def __init__(self, batch_bytes: int, dtype: str) -> None:
        self.budget = batch_bytes
        self.itemsize = np.dtype(dtype).itemsize
        self.pending: dict[int, list] = {}
        self.bytes: dict[int, int] = {}

    def add(self, item: object, n: int) -> list[list]:
        """Queue one ``n x n`` factor; returns the groups that go now, in order."""
        self.pending.setdefault(n, []).append(item)
        self.bytes[n] = self.bytes.get(n, 0) + n * n * self.itemsize
        ready = []
        if self.bytes[n] >= self.budget:  # a full group goes at once
            self.bytes.pop(n)
            ready.append(self.pending.pop(n))
        while self.pending and sum(self.bytes.values()) > self.budget:  # all groups together over budget
            biggest = max(self.bytes, key=self.bytes.__getitem__)
            self.bytes.pop(biggest)
            ready.append(self.pending.pop(biggest))
        return ready

    def finish(self) -> list[list]:
        """The groups still waiting, smallest factors first."""
        groups = [self.pending[n] for n in sorted(self.pending)]
        self.pending, self.bytes = {}, {}
        return groups


def _decompose_group(
    group: list[tuple[Hashable, np.ndarray]],
    device: torch.device,
    dtype: str,
    vectors: bool,
    path: object,
    step: object,
) -> Iterator[tuple[Hashable, FactorEig]]:
    arrays = [x for _, x in group]
    try:
        results = _eigh_escalating(arrays, dtype, device, vectors, batched=True)
    except _EighFailure as exc:
        layer, which = _split_key(group[getattr(exc, "index", 0)][0])
        raise CheckpointError(
            f"{where(path, step, layer)}: factor {which}: the eigendecomposition failed in every "
            f"attempt ({exc})"
        ) from None
    del arrays
    for (key, _), (vals, vecs, used_dtype, used_device, retries) in zip(group, results, strict=True):
        layer, which = _split_key(key)
        c = _clip(vals, "dense", used_dtype, path=path, step=step, layer=layer, which=which)
        yield key, FactorEig(
            kind="dense",
            eigenvalues=np.ascontiguousarray(c.vals, dtype=np.float64),
            eigenvectors=vecs,
            num_clipped=c.num_clipped,
            tolerance=c.tolerance,
            num_unresolved=c.num_unresolved,
            resolution=c.resolution,
            dtype=used_dtype,
            device=used_device,
            retries=retries,
        )


# --------------------------------------------------------------------------------------------------
# Reading a checkpoint step by step, layer by layer


def _select_steps(reader_steps: list[int], steps: object, path: str) -> list[int]:
    """``"latest"``, ``"all"``, an int or a list of ints, as sorted complete step numbers."""
    if not reader_steps:
        raise CheckpointError(f"{path}: holds no complete step")
    if steps is None or steps == "all":
        return list(reader_steps)
    if steps == "latest":
        return [reader_steps[-1]]
    if isinstance(steps, str):
        try:
            steps = int(steps)
        except ValueError:
            raise OptionError(f"--step {steps}: expected a step number, 'latest' or 'all'") from None
    wanted = [steps] if isinstance(steps, (int, np.integer)) else list(steps)  # type: ignore[arg-type]
    for s in wanted:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
            raise OptionError(f"--step {s!r}: expected a step number, 'latest' or 'all'")
        if int(s) not in reader_steps:
            listed = ", ".join(map(str, reader_steps))
            raise CheckpointError(f"{path}: step {s}: no such complete step (complete steps: {listed})")
    return sorted({int(s) for s in wanted})


def _select_layers(names: list[str], patterns: Sequence[str] | None, used: set[str]) -> list[str]:
    if patterns is None:
        return list(names)
    chosen = []
    for name in names:
        hits = [p for p in patterns if fnmatch.fnmatchcase(name, p)]
        used.update(hits)
        if hits:
            chosen.append(name)
    return chosen


def _check_patterns(path: str, patterns: Sequence[str] | None, used: set[str]) -> None:
    unused = [p for p in patterns or [] if p not in used]
    if unused:
        raise OptionError(f"{path}: --layers {unused[0]!r} matches no layer")


def _factor_items(
    reader: CheckpointReader,
    step: int,
    names: Sequence[str],
    progress: bool,
    only: Collection[tuple[str, str]] | None = None,
) -> Iterator[tuple[tuple[str, str], np.ndarray]]:
    """``((layer, "S"), S)``, ``((layer, "A"), A)`` for each layer, read one layer at a time.

    With ``only``, just those factors: a layer holding none of them is not read.
    """
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(names), desc=f"spectrum step {step}", unit="layer", leave=False)
    try:
        for name in names:
            wanted = [w for w in ("S", "A") if only is None or (name, w) in only]
            if not wanted:
                continue
            layer = reader.read_factors(step, name)  # both factors: the reader reads a layer at a time
            for which in wanted:
                yield (name, which), getattr(layer, which)
            del layer
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def decompose_checkpoint(
    reader: CheckpointReader,
    step: int,
    names: Sequence[str],
    *,
    device: str | torch.device = "cpu",
    dtype: str = "float64",
    vectors: bool = True,
    batch_bytes: int | None = None,
    progress: bool = False,
) -> Iterator[tuple[str, str, FactorEig]]:
    """Decompose the factors of ``names`` at ``step``, reading one layer at a time.

    Yields ``(layer, "A"|"S", FactorEig)`` in completion order (see :func:`decompose_factors`).
    Errors name ``reader.path``, the step, the layer and the factor.
    """
    items = _factor_items(reader, step, names, progress)
    for (layer, which), eig in decompose_factors(
        items, device=device, dtype=dtype, vectors=vectors, batch_bytes=batch_bytes,
        path=reader.path, step=step,
    ):
        yield layer, which, eig


# --------------------------------------------------------------------------------------------------
# Sharing a step's decompositions across the processes of torchrun

#: A factor as the sharing sees it: ``((layer, "S"|"A"), n, kind)``.
FactorSize = tuple[tuple[str, str], int, str]


def factor_cost(n: int, kind: str) -> int:
    """The work of decomposing one factor: ``n^3`` for a dense ``n x n`` factor (``eigh`` is
    ``O(n^3)``), ``n`` for a diagonal one (a sort, no decomposition)."""
    if kind == "dense":
        return int(n) ** 3
    if kind == "diagonal":
        return int(n)
    raise ValueError(f"factor kind {kind!r}: expected 'dense' or 'diagonal'")


def assign_batches(batches: Sequence[Sequence[tuple[Hashable, int, str]]], world_size: int) -> list[int]:
    """The process of each batch of factors, largest first (Graham's LPT rule).

    A batch is a list of factors ``(key, n, kind)`` decomposed together; it costs the sum of their
    :func:`factor_cost`. Batches are taken in decreasing cost (equal costs in the order given) and
    each goes to the process whose batches so far cost least (ties to the lowest rank). The largest
    total cost of a process is then at most ``4/3 - 1/(3W)`` times the best possible one, and at
    most the mean total plus the largest single batch. The result depends on the sizes and
    ``world_size`` only, so every process computes the same assignment. Returns ``ranks`` with
    ``ranks[i]`` the process of ``batches[i]``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    keys = [key for batch in batches for key, _, _ in batch]
    if len(set(keys)) != len(keys):
        raise ValueError("a factor is listed twice")
    costs = [sum(factor_cost(n, kind) for _, n, kind in batch) for batch in batches]
    loads = [(0, rank) for rank in range(world_size)]  # (total cost, rank): a heap, least loaded first
    ranks = [0] * len(batches)
    for i in sorted(range(len(batches)), key=lambda i: -costs[i]):  # stable: equal costs keep their order
        load, rank = heapq.heappop(loads)
        ranks[i] = rank
        heapq.heappush(loads, (load + costs[i], rank))
    return ranks


def assign_factors(sizes: Sequence[tuple[K, int, str]], world_size: int) -> dict[K, int]:
    """Which process decomposes which factor, ``{key: rank}``: :func:`assign_batches` with one
    factor per batch (largest :func:`factor_cost` first, each to the least-loaded process, ties to
    the lowest rank). ``sizes`` lists every factor once as ``(key, n, kind)``, ``kind`` ``"dense"``
    or ``"diagonal"``. One process gets every factor; with more processes than factors some get none.
    """
    ranks = assign_batches([[factor] for factor in sizes], world_size)
    return {key: rank for (key, _, _), rank in zip(sizes, ranks, strict=True)}


def plan_batches(
    sizes: Sequence[tuple[K, int, str]], dtype: str, batch_bytes: int
) -> list[list[tuple[K, int, str]]]:
    """The ``eigh`` calls one process makes for these factors, in the order it makes them.

    :func:`decompose_factors`' batching (:class:`_Batcher`) applied to the sizes alone: each
    diagonal factor on its own, dense ones in groups of equal size. Sharing out these batches
    (:func:`assign_batches`) rather than single factors keeps every factor in the very call that
    decomposes it in one process: torch's CPU ``eigh`` (MKL) rounds a matrix differently when it
    sits at an offset of the batch that is not 16-byte aligned, and a GPU's batched solver differs
    from its single-matrix one, so the same factor decomposed in another batch can differ by an ulp.
    """
    batcher = _Batcher(batch_bytes, dtype)
    calls: list[list[tuple[K, int, str]]] = []
    for factor in sizes:
        if factor[2] == "diagonal":
            calls.append([factor])
        else:
            calls.extend(batcher.add(factor, factor[1]))
    calls.extend(batcher.finish())
    return calls


def _factor_sizes(reader: CheckpointReader, step: int, names: Sequence[str]) -> list[FactorSize]:
    """``((layer, "S"|"A"), n, kind)`` of every factor of ``names``, in the order one process reads
    them (each layer's S, then its A), from the layers' metadata."""
    out = []
    for name in names:
        module_type, weight_shape, has_bias = reader.layer_meta(step, name)
        try:
            size_a, size_s = expected_factor_sizes(module_type, weight_shape, has_bias)
        except CheckpointError as exc:
            raise CheckpointError(f"{where(reader.path, step, name)}: {exc}") from None
        for which, n in (("S", size_s), ("A", size_a)):
            out.append(((name, which), n, reader.factor_kind(step, name, which)))
    return out


@dataclass
class _Share:
    """How one step is shared out: every factor in reading order, the ``eigh`` calls of one process
    (:func:`plan_batches`) and the process of each call (:func:`assign_batches`)."""

    factors: list[FactorSize]
    batches: list[list[FactorSize]]
    ranks: list[int]

    def owner(self) -> dict[tuple[str, str], int]:
        pairs = zip(self.batches, self.ranks, strict=True)
        return {key: rank for batch, rank in pairs for key, _, _ in batch}

    def batches_of(self, rank: int) -> list[list[FactorSize]]:
        return [batch for batch, r in zip(self.batches, self.ranks, strict=True) if r == rank]


def _share(reader: CheckpointReader, step: int, names: Sequence[str], options: dict[str, Any]) -> _Share:
    from curvlab import distributed

    factors = _factor_sizes(reader, step, names)
    budget = _batch_budget(options["batch_bytes"], options["device"])
    batches = plan_batches(factors, options["dtype"], budget)
    ranks = assign_batches(batches, distributed.context().world_size)
    return _Share(factors, batches, _lightest_share_first(ranks, batches, distributed.context().world_size))


def _lightest_share_first(ranks: list[int], batches: list[list[FactorSize]], world_size: int) -> list[int]:
    """Renumber the shares so that process 0 gets the lightest: it finishes first and then receives,
    so the others send as soon as they are done instead of waiting (a send that waits longer than the
    timeout fails) — the assignment itself, and so the balance, stay those of :func:`assign_batches`."""
    loads = [0] * world_size
    for batch, rank in zip(batches, ranks, strict=True):
        loads[rank] += sum(factor_cost(n, kind) for _, n, kind in batch)
    new_rank = {old: new for new, old in enumerate(sorted(range(world_size), key=lambda r: (loads[r], r)))}
    return [new_rank[r] for r in ranks]


def _decompose_batches(
    reader: CheckpointReader, step: int, names: Sequence[str], batches: list[list[FactorSize]],
    options: dict[str, Any],
) -> Iterator[tuple[str, str, FactorEig]]:
    """Decompose exactly these ``eigh`` calls of :func:`plan_batches`, each as one process makes it.

    The layers holding their factors are read in order, one at a time; a call runs as soon as its
    last factor has been read, so at most what one process would hold waits. Yields ``(layer,
    "A"|"S", FactorEig)`` in completion order; errors name the file, step, layer and factor.
    """
    call_of = {key: i for i, batch in enumerate(batches) for key, _, _ in batch}
    waiting: dict[int, dict[tuple[str, str], np.ndarray]] = {}
    for key, x in _factor_items(reader, step, names, False, only=call_of):
        i = call_of[key]
        waiting.setdefault(i, {})[key] = x
        if len(waiting[i]) < len(batches[i]):
            continue
        arrays = waiting.pop(i)
        group = [(k, arrays.pop(k)) for k, _, _ in batches[i]]  # the order of the one-process call
        if group[0][1].ndim == 1:
            layer, which = group[0][0]
            results = [(group[0][0], _diagonal_eig(group[0][1], path=reader.path, step=step, layer=layer,
                                                   which=which))]
        else:
            results = _decompose_group(group, options["device"], options["dtype"], options["vectors"],
                                       reader.path, step)
        for (layer, which), eig in results:
            yield layer, which, eig


# What travels with a factor's eigenvalues: a header of int64 [num_clipped, num_unresolved, code of the
# eigenvectors' dtype (0: none), length of the text], the float64 [tolerance, resolution, *eigenvalues],
# the text (JSON of dtype, device and retries, as uint8), then the int64 ``order`` of a diagonal factor
# or the eigenvectors of a dense one. The receiver knows n and the kind: it lists the factors too.
_VECTOR_DTYPES = {1: "float32", 2: "float64"}
_VECTOR_CODES = {name: code for code, name in _VECTOR_DTYPES.items()}


def _send_eig(eig: FactorEig, device: torch.device) -> None:
    """Send one factor's :class:`FactorEig` to process 0 (call under ``distributed.collective``)."""
    import torch
    import torch.distributed as dist

    text = json.dumps({"dtype": eig.dtype, "device": eig.device, "retries": list(eig.retries)}).encode()
    vectors = eig.eigenvectors if eig.kind == "dense" else None
    code = 0 if vectors is None else _VECTOR_CODES[str(vectors.dtype)]
    parts = [
        torch.tensor([eig.num_clipped, eig.num_unresolved, code, len(text)], dtype=torch.int64),
        torch.from_numpy(np.concatenate([[eig.tolerance, eig.resolution], eig.eigenvalues])),
        torch.frombuffer(bytearray(text), dtype=torch.uint8),
    ]
    if eig.kind == "diagonal":
        parts.append(torch.from_numpy(np.ascontiguousarray(eig.order, dtype=np.int64)))
    elif vectors is not None:
        parts.append(torch.from_numpy(np.ascontiguousarray(vectors)))
    for t in parts:
        dist.send(t.to(device), dst=0)


def _receive_eig(src: int, n: int, kind: str, device: torch.device) -> FactorEig:
    """The :class:`FactorEig` of an ``n``-sized factor, from process ``src`` (see :func:`_send_eig`)."""
    import torch
    import torch.distributed as dist

    def receive(shape: tuple[int, ...], dtype: torch.dtype) -> np.ndarray:
        buffer = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(buffer, src=src)
        return buffer.cpu().numpy()

    num_clipped, num_unresolved, code, length = (int(v) for v in receive((4,), torch.int64))
    values = receive((n + 2,), torch.float64)
    meta = json.loads(receive((length,), torch.uint8).tobytes())
    order = vectors = None
    if kind == "diagonal":
        order = receive((n,), torch.int64)
    elif code:
        vectors = receive((n, n), getattr(torch, _VECTOR_DTYPES[code]))
    return FactorEig(
        kind=kind,
        eigenvalues=values[2:].copy(),
        eigenvectors=vectors,
        order=order,
        num_clipped=num_clipped,
        tolerance=float(values[0]),
        num_unresolved=num_unresolved,
        resolution=float(values[1]),
        dtype=meta["dtype"],
        device=meta["device"],
        retries=tuple(meta["retries"]),
    )


def _send_share(reader: CheckpointReader, step: int, names: Sequence[str], options: dict[str, Any]) -> None:
    """A process other than 0: decompose its share of ``step``, then send it to process 0.

    The results are held until all are done (this process's share of the step's eigenvectors),
    then sent in reading order (:func:`_factor_sizes`), the order in which process 0 receives them.
    """
    from curvlab import distributed

    rank = distributed.context().rank
    share = _share(reader, step, names, options)
    done = {(layer, which): eig for layer, which, eig in
            _decompose_batches(reader, step, names, share.batches_of(rank), options)}
    device = distributed._collective_device()
    with distributed.collective(f"sending the eigendecompositions of step {step} to process 0"):
        for key, _, _ in share.factors:
            if key in done:
                _send_eig(done.pop(key), device)


def _gather_share(
    reader: CheckpointReader, step: int, names: Sequence[str], options: dict[str, Any]
) -> Iterator[tuple[str, str, FactorEig]]:
    """Process 0: its own share of ``step`` as it is decomposed, then the shares of processes 1, 2,
    ... as they arrive; yields ``(layer, "A"|"S", FactorEig)`` like :func:`decompose_checkpoint`."""
    from curvlab import distributed

    world_size = distributed.context().world_size
    share = _share(reader, step, names, options)
    owner = share.owner()
    bar = None
    if options["progress"]:
        from tqdm import tqdm

        bar = tqdm(total=len(share.factors), desc=f"spectrum step {step}", unit="factor", leave=False)
    try:
        for layer, which, eig in _decompose_batches(reader, step, names, share.batches_of(0), options):
            yield layer, which, eig
            if bar is not None:
                bar.update(1)
        device = distributed._collective_device()
        for rank in range(1, world_size):
            for (layer, which), n, kind in share.factors:
                if owner[(layer, which)] != rank:
                    continue
                with distributed.collective(f"receiving the eigendecompositions of step {step} "
                                            f"from process {rank}"):
                    eig = _receive_eig(rank, n, kind, device)
                yield layer, which, eig
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def _step_factors(
    reader: CheckpointReader, step: int, names: Sequence[str], options: dict[str, Any]
) -> Iterator[tuple[str, str, FactorEig]]:
    """Every factor's decomposition for the spectrum file: this process's own work, or under torchrun
    process 0's share followed by everyone else's."""
    if _process_group().active:
        return _gather_share(reader, step, names, options)
    return decompose_checkpoint(reader, step, names, **options)


def _process_group() -> Context:
    from curvlab import distributed

    return distributed.context()


def _check_same_batches(options: dict[str, Any]) -> None:
    """Every process must plan the same ``eigh`` calls (:func:`plan_batches`): their batch budget,
    which depends on the kind of device, must agree."""
    from curvlab import distributed

    budget = _batch_budget(options["batch_bytes"], options["device"])
    distributed.check_same(
        [budget], "the eigh batch budget in bytes",
        hint=f"--device resolved to {options['device'].type} here and to another kind of device elsewhere",
    )


# --------------------------------------------------------------------------------------------------
# The Kronecker spectrum


@dataclass
class _Pair:
    """One layer's factor spectra, as the counting needs them: ``rows`` the shorter (positive
    entries, descending), ``zero_rows`` how many zeros it had, ``cols`` the longer (ascending)."""

    rows: np.ndarray
    zero_rows: int
    cols: np.ndarray


def _as_spectrum(x: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{what}: expected a non-empty 1-D array of eigenvalues, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what}: eigenvalues must be finite")
    if (arr < 0).any():
        raise ValueError(f"{what}: eigenvalues must be >= 0 (clip round-off first), min {arr.min():.3g}")
    return np.sort(arr + 0.0)  # + 0.0 turns -0.0 into 0.0


class KroneckerSpectrum:
    """The multiset ``{λ_S[i] λ_A[j]}`` over one or more layers, never materialised.

    ``pairs``: per layer ``(eigenvalues of S, eigenvalues of A)``, 1-D, ``>= 0``, any order. Every
    product is the float64 product ``fl(λ_S[i] * λ_A[j])`` of the float64 eigenvalues, exactly what
    ``np.outer(λ_S, λ_A)`` holds, and every answer is exact for that multiset: counts are exact,
    order statistics are actual products.

    **Counting** (design.md, "Whole-network K-FAC eigenspectrum"). For one layer let ``r`` be the
    shorter factor's spectrum and ``c`` the longer one's, both sorted. Since ``fl(r_i * c_j)`` is
    non-decreasing in ``c_j``, the products of row ``i`` above ``t`` are a suffix of ``c``: with
    ``b_i(t) = #{j : fl(r_i c_j) <= t}``, ``#{products > t} = Σ_i (len(c) - b_i(t))``, summed over
    layers. ``b_i`` comes from ``np.searchsorted(c, t / r_i)``, checked against the actual products
    of its two neighbours (monotonicity makes that enough) and, where rounding in ``t / r_i``, ties
    or underflow make it wrong, found by bisection on the products: a count cannot be wrong. Cost
    ``O(len(r) log len(c))`` per threshold, memory ``O(len(r) + len(c))``.

    **Order statistics**: the r-th largest product is the smallest float ``t`` with
    ``count_above(t) < r``. It is found by bisection on the bit patterns of non-negative floats
    (monotone in the value, so this is bisection in log space) until the bracket ``(lo, hi]`` holds
    at most ``max(2^16, 2 * rows)`` products, which are then enumerated and sorted — a small set of
    actual products. Ranks are solved together, a bisection step at a time.

    Exact zeros (products of a zero eigenvalue, or products that underflow) are counted in
    ``num_zeros``; :meth:`min_positive`, :meth:`bottom` and :meth:`condition_number` exclude them.

    A spectrum of at most ``dense_limit`` products (default 2^21: 16 MiB) is instead materialised and
    sorted once, on first use, which answers many queries faster; ``dense_limit=0`` never does.
    """

    def __init__(
        self, pairs: Sequence[tuple[np.ndarray, np.ndarray]], *, dense_limit: int = 1 << 21
    ) -> None:
        pairs = list(pairs)
        if not pairs:
            raise ValueError("KroneckerSpectrum needs at least one (S eigenvalues, A eigenvalues) pair")
        self._pairs: list[_Pair] = []
        self._raw: list[tuple[np.ndarray, np.ndarray]] = []
        count = 0
        trace = 0.0
        for k, (s, a) in enumerate(pairs):
            s = _as_spectrum(s, f"layer {k}: S")
            a = _as_spectrum(a, f"layer {k}: A")
            self._raw.append((s, a))
            rows, cols = (s, a) if s.size <= a.size else (a, s)
            zeros = int(np.searchsorted(rows, 0.0, side="right"))
            # Rows descending: the queries t / rows[i] of one threshold then increase, which numpy's
            # searchsorted follows ~1.7x faster than decreasing ones.
            self._pairs.append(_Pair(rows=rows[zeros:][::-1].copy(), zero_rows=zeros, cols=cols))
            count += s.size * a.size
            trace += math.fsum(s) * math.fsum(a)
        #: Number of products (Σ over layers of len(S) * len(A)).
        self.count: int = int(count)
        #: Σ_i Σ_j λ_S[i] λ_A[j] = Σ over layers of (Σ λ_S)(Σ λ_A): the trace of the K-FAC Fisher.
        self.trace: float = float(trace)
        self.dense_limit = int(dense_limit)
        self._sorted: np.ndarray | None = None  # ascending, only when count <= dense_limit
        self._total_rows = sum(p.rows.size for p in self._pairs)
        if not math.isfinite(self.max()):
            raise ValueError("the largest product overflows float64 (eigenvalues must stay below ~1e154)")
        #: Number of products equal to 0.0 (zero eigenvalues, or underflow).
        self.num_zeros: int = self.count - self.count_above(0.0)

    # --- basic figures ----------------------------------------------------------------------------

    @property
    def num_positive(self) -> int:
        """Number of products > 0."""
        return self.count - self.num_zeros

    @property
    def num_layers(self) -> int:
        return len(self._pairs)

    def max(self) -> float:
        """The largest product, ``max_layers fl(max λ_S * max λ_A)``."""
        return max(float(s[-1]) * float(a[-1]) for s, a in self._raw)  # IEEE products, as numpy's

    def min_positive(self) -> float:
        """The smallest product > 0 (exact zeros excluded). ValueError if every product is 0."""
        if self.num_positive == 0:
            raise ValueError("every product is 0: there is no smallest positive eigenvalue")
        best, underflow = self._smallest_products()
        if underflow:  # some layer's smallest product rounds to 0: take the exact order statistic
            return float(self.values_at_ranks([self.num_positive])[0])
        return best

    def _smallest_products(self) -> tuple[float, bool]:
        """``min over layers of fl(min positive λ_S * min positive λ_A)``, and whether any of those
        products underflowed to 0 (then smaller positive products may exist elsewhere)."""
        best, underflow = math.inf, False
        for s, a in self._raw:
            sp, ap = s[s > 0], a[a > 0]
            if sp.size and ap.size:
                v = float(sp[0] * ap[0])
                underflow |= v == 0.0
                if v > 0:
                    best = min(best, v)
        return best, underflow

    def condition_number(self) -> float:
        """``max / min_positive`` (over the positive products; ``inf`` if there are none)."""
        return self.max() / self.min_positive() if self.num_positive else math.inf

    # --- counting ---------------------------------------------------------------------------------

    def _dense(self) -> np.ndarray | None:
        if self._sorted is None and self.count <= self.dense_limit:
            products = np.concatenate([np.multiply.outer(s, a).ravel() for s, a in self._raw])
            products.sort()
            self._sorted = products
        return self._sorted

    def count_above(self, t: float | np.ndarray) -> int | np.ndarray:
        """Number of products ``> t`` (an int; an int64 array for an array of thresholds)."""
        ts = np.asarray(t, dtype=np.float64)
        if np.isnan(ts).any():
            raise ValueError("count_above: threshold is NaN")
        flat = ts.ravel()
        dense = self._dense()
        if dense is not None:
            out = dense.size - np.searchsorted(dense, flat, side="right")
        else:
            out = np.zeros(flat.size, dtype=np.int64)
            for pair in self._pairs:
                out += self._pair_count_above(pair, flat)
        out = out.astype(np.int64).reshape(ts.shape)
        return int(out) if out.ndim == 0 else out

    def _pair_count_above(self, pair: _Pair, ts: np.ndarray) -> np.ndarray:
        m = pair.cols.size
        out = np.where(ts < 0, pair.zero_rows * m, 0).astype(np.int64)
        if pair.rows.size == 0:
            return out
        chunk = max(1, (1 << 18) // pair.rows.size)  # at most ~2 MiB per (rows x thresholds) array
        for start in range(0, ts.size, chunk):
            part = ts[start : start + chunk]
            b = _first_above(pair.rows, pair.cols, part)
            out[start : start + chunk] += (m - b).sum(axis=1)
        return out

    def count_at_least(self, t: float | np.ndarray) -> int | np.ndarray:
        """Number of products ``>= t`` (products are floats: ``>= t`` is ``> prevfloat(t)``)."""
        ts = np.asarray(t, dtype=np.float64)
        return self.count_above(np.nextafter(ts, -np.inf))

    def histogram(self, edges: np.ndarray) -> np.ndarray:
        """Exact counts of products in each bin ``[edges[k], edges[k+1])``.

        Every bin is half-open, the last one too (unlike ``np.histogram``): to include the largest
        product, end the edges above :meth:`max`, e.g. at ``np.nextafter(max, inf)``. ``edges``
        must be strictly increasing. Products outside ``[edges[0], edges[-1])`` are not counted.
        """
        e = np.asarray(edges, dtype=np.float64)
        if e.ndim != 1 or e.size < 2 or not np.isfinite(e).all() or (np.diff(e) <= 0).any():
            raise ValueError("histogram: edges must be a finite, strictly increasing 1-D array of >= 2")
        at_least = self.count_at_least(e)
        return (at_least[:-1] - at_least[1:]).astype(np.int64)

    # --- order statistics -------------------------------------------------------------------------

    def values_at_ranks(self, ranks: Sequence[int] | np.ndarray) -> np.ndarray:
        """The exact value of the r-th largest product for each rank ``r`` (1-based, vectorised).

        Rank 1 is :meth:`max`, rank ``count`` the smallest product (0 if there are zeros). Ties
        count with multiplicity: the values at ranks ``r`` and ``r + 1`` are equal when the product
        occurs twice.
        """
        r = np.asarray(ranks)
        if r.size and (r.dtype.kind not in "iu" or r.min() < 1 or r.max() > self.count):
            raise ValueError(f"values_at_ranks: ranks must be integers in [1, {self.count}]")
        r = r.astype(np.int64)
        dense = self._dense()
        if dense is not None:
            return dense[dense.size - r]
        out = np.zeros(r.shape, dtype=np.float64)
        positive = r <= self.num_positive
        if positive.any():
            unique, inverse = np.unique(r[positive], return_inverse=True)
            out[positive] = self._solve_ranks(unique)[inverse]
        return out

    def _solve_ranks(self, ranks: np.ndarray) -> np.ndarray:
        """Values at sorted, unique ranks ``1 <= r <= num_positive``: bracket, then enumerate.

        All ranks share one pool of thresholds whose exact counts are known; each rank's bracket
        ``(lo, hi]`` is the tightest pair of pool thresholds around it. Rounds add thresholds until
        every bracket holds at most ``limit`` products (or one float): interpolation in the pool
        (count against the bit pattern of ``t``, i.e. log t) aims at the rank first, then at
        ``rank ± limit/4``, so a smooth spectrum needs ~3 counts per rank; every third round bisects
        instead (bits), which bounds the worst case. Exactness comes only from the counts and the
        final enumeration, never from the interpolation.
        """
        limit = max(1 << 16, 2 * self._total_rows)
        best, underflow = self._smallest_products()
        start = 0.0 if underflow else float(np.nextafter(best, 0.0))  # every positive product is above
        pool = _ThresholdPool(np.array([start, self.max()]), np.array([self.num_positive, 0]))
        pool.add(self, _bit_grid(start, self.max(), 32))
        for round_ in range(256):
            lo, hi, c_lo, c_hi = pool.brackets(ranks)
            active = (c_lo - c_hi > limit) & (hi.view(np.int64) - lo.view(np.int64) > 1)
            if not active.any():
                break
            r, lo_a, hi_a = ranks[active], lo[active], hi[active]
            if round_ % 3 == 2:
                proposals = _bit_midpoint(lo_a, hi_a)
            else:
                spread = 0 if round_ == 0 else limit // 4
                targets = np.concatenate([r - spread, r + spread]) if spread else r
                guess = pool.interpolate(targets)
                reps = targets.size // r.size
                proposals = _clamp_inside(guess, np.tile(lo_a, reps), np.tile(hi_a, reps))
            pool.add(self, proposals)
        return self._enumerate_brackets(ranks, *pool.brackets(ranks))

    def _enumerate_brackets(
        self, ranks: np.ndarray, lo: np.ndarray, hi: np.ndarray, c_lo: np.ndarray, c_hi: np.ndarray
    ) -> np.ndarray:
        """The answer of each rank from the products in its bracket ``(lo, hi]``.

        Brackets are intervals between consecutive pool thresholds, so they never overlap and
        neighbours share endpoints: the column boundaries are computed once per endpoint, in
        ascending order, and each bracket's products are enumerated once for all its ranks.
        """
        out = np.empty(ranks.size)
        single = hi.view(np.int64) - lo.view(np.int64) <= 1
        out[single] = hi[single]  # the bracket (lo, hi] holds one float
        todo = np.nonzero(~single)[0]
        if todo.size == 0:
            return out
        ends = np.unique(np.concatenate([lo[todo], hi[todo]]))
        where_lo = np.searchsorted(ends, lo[todo])
        boundaries = _EndpointBoundaries(self._pairs, ends)
        order = np.argsort(where_lo, kind="stable")
        i = 0
        while i < order.size:
            k = where_lo[order[i]]
            group = [todo[order[i]]]
            while i + 1 < order.size and where_lo[order[i + 1]] == k:
                i += 1
                group.append(todo[order[i]])
            i += 1
            products = self._products_between(boundaries.get(k), boundaries.get(k + 1))
            positions = np.array([ranks[g] - c_hi[g] - 1 for g in group])  # 0-based from the top
            chosen = np.partition(-products, positions)[positions]
            out[group] = -chosen
        return out

    def _products_between(self, start: list[np.ndarray], stop: list[np.ndarray]) -> np.ndarray:
        """Products of columns ``[start_i, stop_i)`` of every row, for every layer."""
        parts = []
        for pair, b0, b1 in zip(self._pairs, start, stop, strict=True):
            if pair.rows.size:
                parts.append(_gather_products(pair, b0, b1))
        return np.concatenate(parts) if parts else np.empty(0)

    def _products_in(self, lo: float, hi: float) -> np.ndarray:
        """Every product ``p`` with ``lo < p <= hi`` (``lo >= 0``), unsorted."""
        parts = []
        for pair in self._pairs:
            if pair.rows.size:
                start, stop = _first_above(pair.rows, pair.cols, np.array([lo, hi]))
                parts.append(_gather_products(pair, start, stop))
        return np.concatenate(parts) if parts else np.empty(0)

    def quantiles(self, qs: float | Sequence[float] | np.ndarray) -> np.ndarray:
        """Exact quantiles of the products (zeros included), the inverted-CDF definition.

        For ``N`` products sorted ascending ``p_(0) <= ... <= p_(N-1)``, quantile ``q`` in
        ``[0, 1]`` is ``p_(k)`` with ``k = ceil(N q) - 1`` clipped to ``[0, N-1]`` (Hyndman & Fan's
        type 1, numpy's ``method="inverted_cdf"``, computed with numpy's floating-point steps): the
        smallest product ``x`` with ``#{p <= x} >= N q``, always an actual product.
        """
        q = np.asarray(qs, dtype=np.float64)
        if np.isnan(q).any() or (q < 0).any() or (q > 1).any():
            raise ValueError("quantiles: every q must be in [0, 1]")
        virtual = self.count * q - 1  # numpy's inverted_cdf: floor, then +1 if a fraction is left
        k = np.floor(virtual)
        k = k + (virtual - k > 0)
        k = np.clip(k, 0, self.count - 1).astype(np.int64)
        return self.values_at_ranks(self.count - k).reshape(q.shape)

    def top(self, k: int) -> np.ndarray:
        """The ``k`` largest products, descending (all of them if ``k >= count``)."""
        k = min(int(k), self.count)
        if k <= 0:
            return np.empty(0)
        dense = self._dense()
        if dense is not None:
            return dense[::-1][:k].copy()
        v = float(self.values_at_ranks([k])[0])
        above = -np.sort(-self._products_in(v, self.max())) if v < self.max() else np.empty(0)
        return np.concatenate([above, np.full(k - above.size, v)])

    def bottom(self, k: int) -> np.ndarray:
        """The ``k`` smallest *positive* products, ascending (exact zeros excluded: see
        :attr:`num_zeros`); all positive ones if ``k >= num_positive``."""
        k = min(int(k), self.num_positive)
        if k <= 0:
            return np.empty(0)
        dense = self._dense()
        if dense is not None:
            return dense[self.num_zeros : self.num_zeros + k].copy()
        v = float(self.values_at_ranks([self.num_positive - k + 1])[0])  # the k-th smallest positive
        below = np.sort(self._products_in(0.0, np.nextafter(v, 0.0)))
        return np.concatenate([below, np.full(k - below.size, v)])

    def sorted_values(self, max_count: int = 50_000_000) -> np.ndarray:
        """All products, descending (materialised: ``8 * count`` bytes). OptionError if
        ``count > max_count``."""
        if self.count > max_count:
            raise OptionError(
                f"the spectrum has {self.count} products, more than max_count={max_count} to materialise"
            )
        dense = self._dense()
        if dense is not None:
            return dense[::-1].copy()
        products = np.concatenate([np.multiply.outer(s, a).ravel() for s, a in self._raw])
        products.sort()
        return products[::-1].copy()


class _ThresholdPool:
    """Thresholds ``t`` (ascending) with their exact ``count_above(t)`` (non-increasing)."""

    def __init__(self, t: np.ndarray, counts: np.ndarray) -> None:
        self.t = np.asarray(t, dtype=np.float64)
        self.c = np.asarray(counts, dtype=np.int64)

    def add(self, spectrum: KroneckerSpectrum, t: np.ndarray) -> None:
        new = np.setdiff1d(np.asarray(t, dtype=np.float64), self.t)
        if new.size == 0:
            return
        t_all = np.concatenate([self.t, new])
        c_all = np.concatenate([self.c, np.asarray(spectrum.count_above(new), dtype=np.int64)])
        order = np.argsort(t_all, kind="stable")
        self.t, self.c = t_all[order], c_all[order]

    def brackets(self, ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per rank ``r``: the tightest ``(lo, hi, count(lo), count(hi))`` with ``count(lo) >= r >
        count(hi)``, i.e. the r-th largest product lies in ``(lo, hi]``."""
        j = np.searchsorted(-self.c, -ranks, side="right") - 1  # last threshold with count >= r
        return self.t[j], self.t[j + 1], self.c[j], self.c[j + 1]

    def interpolate(self, targets: np.ndarray) -> np.ndarray:
        """Thresholds where ``count_above`` is expected to equal ``targets``: piecewise linear in
        (log(count + 1), bits of t), the bits being a monotone stand-in for log t that also covers 0."""
        y = np.log1p(self.c[::-1].astype(np.float64))  # ascending
        x = self.t[::-1].view(np.int64).astype(np.float64)
        bits = np.interp(np.log1p(np.maximum(targets, 0).astype(np.float64)), y, x)
        return np.round(bits).astype(np.int64).view(np.float64)


def _gather_products(pair: _Pair, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """``rows[i] * cols[j]`` for ``start[i] <= j < stop[i]``, every row ``i``."""
    lengths = stop - start
    total = int(lengths.sum())
    if total <= 0:
        return np.empty(0)
    row = np.repeat(np.arange(pair.rows.size), lengths)
    offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
    col = np.arange(total) - offsets + start[row]
    return pair.rows[row] * pair.cols[col]


class _EndpointBoundaries:
    """Column boundaries ``b(t)`` of every layer for ascending thresholds ``ends``, computed in
    chunks on demand and kept only while needed (memory: one chunk of ``rows x 32`` per layer)."""

    def __init__(self, pairs: list[_Pair], ends: np.ndarray, chunk: int = 32) -> None:
        self.pairs, self.ends, self.chunk = pairs, ends, chunk
        self.first = -1
        self.blocks: list[np.ndarray] = []

    def get(self, k: int) -> list[np.ndarray]:
        if not self.first <= k < self.first + self.chunk or self.first < 0:
            self.first = k
            part = self.ends[k : k + self.chunk]
            self.blocks = [
                _first_above(p.rows, p.cols, part) if p.rows.size else np.zeros((part.size, 0), np.int64)
                for p in self.pairs
            ]
        return [block[k - self.first] for block in self.blocks]


def _bit_grid(low: float, high: float, n: int) -> np.ndarray:
    """``n`` thresholds evenly spaced in bit pattern strictly between ``low`` and ``high`` (>= 0)."""
    a, b = np.array([low, high]).view(np.int64)
    return np.unique(np.linspace(a, b, n + 2)[1:-1].astype(np.int64)).view(np.float64)


def _bit_midpoint(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    a, b = lo.view(np.int64), hi.view(np.int64)
    return (a + (b - a) // 2).view(np.float64)  # no int64 overflow


def _clamp_inside(t: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``t`` moved strictly inside ``(lo, hi)`` (by bit pattern; brackets here are > 1 float wide)."""
    bits = np.clip(t.view(np.int64), lo.view(np.int64) + 1, hi.view(np.int64) - 1)
    return bits.view(np.float64)


def _first_above(rows: np.ndarray, cols: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """``b[k, i] = #{j : fl(rows[i] * cols[j]) <= ts[k]}`` for positive ``rows``, sorted ``cols``.

    That is the index of the first column whose product exceeds ``ts[k]``. The candidate
    ``searchsorted(cols, ts[k] / rows[i])`` is checked against the actual products on both sides
    (by monotonicity of ``fl(r * c)`` in ``c`` the two neighbours suffice); where rounding in the
    division, ties or underflow make it wrong, the boundary is found by bisection on the products.
    Threshold-major layout: for one threshold the queries ``t / rows[i]`` are monotone, which keeps
    ``searchsorted`` cache-friendly.
    """
    m = cols.size
    r = rows[None, :]
    t = ts[:, None]
    with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
        b = np.searchsorted(cols, t / r, side="right")
    low_side = cols[np.maximum(b - 1, 0)] * r > t  # a column below b already exceeds t
    low_side &= b > 0
    high_side = cols[np.minimum(b, m - 1)] * r <= t  # column b does not exceed t
    high_side &= b < m
    wrong = np.nonzero((low_side | high_side).ravel())[0]
    if wrong.size:
        flat = b.reshape(-1)  # a view: the fixes land in b
        below = low_side.reshape(-1)[wrong]
        lo = np.where(below, 0, flat[wrong] + 1)  # the boundary lies in [lo, hi]
        hi = np.where(below, flat[wrong] - 1, m)
        row_of = np.broadcast_to(r, b.shape).reshape(-1)[wrong]
        t_of = np.broadcast_to(t, b.shape).reshape(-1)[wrong]
        open_ = np.nonzero(lo < hi)[0]
        while open_.size:
            a, z = lo[open_], hi[open_]
            mid = (a + z) // 2
            above = row_of[open_] * cols[mid] > t_of[open_]
            hi[open_] = np.where(above, mid, z)
            lo[open_] = np.where(above, a, mid + 1)
            open_ = open_[lo[open_] < hi[open_]]
        flat[wrong] = lo
    return b


# --------------------------------------------------------------------------------------------------
# The spectrum file: writing


@dataclass
class LayerSpectrum:
    """One layer's decomposition as ``curvlab spectrum`` reports it (eigenvalues only)."""

    name: str
    module_type: str
    weight_shape: tuple[int, ...]
    has_bias: bool
    S: np.ndarray
    A: np.ndarray
    num_clipped: dict[str, int] = field(default_factory=dict)
    num_unresolved: dict[str, int] = field(default_factory=dict)
    retries: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass
class StepSpectrum:
    """The decomposed layers of one step, in the checkpoint's layer order."""

    step: int
    fisher_type: str
    num_examples: int
    layers: list[LayerSpectrum]

    def kronecker(self, **kwargs: Any) -> KroneckerSpectrum:
        """The whole-network Kronecker spectrum of this step."""
        return KroneckerSpectrum([(layer.S, layer.A) for layer in self.layers], **kwargs)


@dataclass
class SpectrumResult:
    """What :func:`compute_spectrum` did: where it wrote, how, and every step's eigenvalues."""

    source: str
    output: str | None
    device: str
    dtype: str
    vectors: bool
    steps: list[StepSpectrum]


def default_output_path(checkpoint: str | os.PathLike) -> str:
    """``x.h5`` -> ``x.spectrum.h5`` next to the input (``.hdf5``/``.hdf`` too; else appended)."""
    return derived_path(checkpoint, ".spectrum.h5")


def _write_layer_attrs(
    g: h5py.Group, module_type: str, weight_shape: tuple[int, ...], has_bias: bool
) -> None:
    g.attrs["module_type"] = module_type
    g.attrs["weight_shape"] = np.asarray(weight_shape, dtype=np.int64)
    g.attrs["has_bias"] = np.bool_(has_bias)


def _write_factor(g: h5py.Group, which: str, eig: FactorEig) -> None:
    """Datasets ``<which>_eigenvalues`` and ``_eigenvectors``/``_order``, and the factor's attrs."""
    g.create_dataset(f"{which}_eigenvalues", data=eig.eigenvalues)
    if eig.kind == "diagonal":
        g.create_dataset(f"{which}_order", data=eig.order)
    elif eig.eigenvectors is not None:
        g.create_dataset(f"{which}_eigenvectors", data=eig.eigenvectors)
    g.attrs[f"{which}_kind"] = eig.kind
    g.attrs[f"{which}_num_clipped"] = np.int64(eig.num_clipped)
    g.attrs[f"{which}_tolerance"] = float(eig.tolerance)
    g.attrs[f"{which}_num_unresolved"] = np.int64(eig.num_unresolved)
    g.attrs[f"{which}_resolution"] = float(eig.resolution)
    g.attrs[f"{which}_dtype"] = eig.dtype
    g.attrs[f"{which}_device"] = eig.device
    g.attrs[f"{which}_retries"] = json.dumps(list(eig.retries))


def _spectrum_step(
    reader: CheckpointReader,
    steps_group: h5py.Group,
    step: int,
    names: list[str],
    options: dict[str, Any],
) -> StepSpectrum:
    """Decompose one step into ``/steps/<step>`` of the output (``complete`` written last)."""
    attrs = reader.step_attrs(step)
    g = steps_group.create_group(str(step), track_order=True)
    g.attrs["step"] = np.int64(step)
    g.attrs["fisher_type"] = attrs["fisher_type"]
    g.attrs["num_examples"] = np.int64(attrs["num_examples"])
    lg = g.create_group("layers", track_order=True)
    layers: dict[str, LayerSpectrum] = {}
    for name in names:  # groups in the checkpoint's order; datasets arrive as batches finish
        module_type, weight_shape, has_bias = reader.layer_meta(step, name)
        _write_layer_attrs(lg.create_group(name), module_type, weight_shape, has_bias)
        layers[name] = LayerSpectrum(name, module_type, weight_shape, has_bias, np.empty(0), np.empty(0))
    for name, which, eig in _step_factors(reader, step, names, options):
        _write_factor(lg[name], which, eig)
        setattr(layers[name], which, eig.eigenvalues)
        layers[name].num_clipped[which] = eig.num_clipped
        layers[name].num_unresolved[which] = eig.num_unresolved
        layers[name].retries[which] = eig.retries
    result = StepSpectrum(step, attrs["fisher_type"], attrs["num_examples"], list(layers.values()))
    spectrum = result.kronecker(dense_limit=0)
    g.attrs["num_eigenvalues"] = np.int64(spectrum.count)
    g.attrs["num_zeros"] = np.int64(spectrum.num_zeros)
    g.attrs["trace"] = spectrum.trace
    g.attrs["max"] = spectrum.max()
    g.attrs["min_positive"] = spectrum.min_positive() if spectrum.num_positive else math.nan
    g.file.flush()
    g.attrs["complete"] = np.bool_(True)
    return result


def compute_spectrum(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    steps: int | str | Sequence[int] = "latest",
    layers: Sequence[str] | None = None,
    device: str = "auto",
    dtype: str = "float64",
    vectors: bool = True,
    batch_bytes: int | None = None,
    progress: bool = False,
) -> SpectrumResult:
    """Decompose a factor checkpoint's factors and write the spectrum file (atomically).

    ``steps``: ``"latest"`` (default), ``"all"``, a step number or a list of them. ``layers``:
    fnmatch globs on layer names (each must match some layer). ``output``: default
    :func:`default_output_path`; ``output=""`` writes nothing. It may not be the checkpoint itself.
    The checkpoint is opened read-only and read one layer at a time. Returns every step's
    eigenvalues for the statistics (:func:`step_summary`).

    Under torchrun (an active :mod:`curvlab.distributed` group) with an output file, every process
    must call this with the same arguments: the factors are shared out (module docstring), process
    0 writes the file and returns every step, and each other process returns after sending its
    results, with ``output=None`` and no steps. With ``output=""`` every process decomposes
    everything itself and returns it.
    """
    source = os.fspath(checkpoint)
    _check_dtype_name(dtype)
    dev = _resolve_device(device)
    out = default_output_path(source) if output is None else os.fspath(output)
    if out and same_file(source, out):
        raise OptionError(
            f"{out}: refusing to write the spectrum into the input checkpoint; choose another -o"
        )
    options = dict(device=dev, dtype=dtype, vectors=vectors, batch_bytes=batch_bytes, progress=progress)
    ctx = _process_group()
    if ctx.active and out:
        _check_same_batches(options)
    helper = ctx.active and not ctx.is_main and bool(out)  # sends its share to process 0, writes nothing
    with CheckpointReader(source) as reader:
        if helper:  # the reader scans the steps once: here without the warnings process 0 gives
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", IncompleteStepWarning)
                reader.step_numbers()
        numbers = _select_steps(reader.step_numbers(), steps, source)
        if ctx.active and out:
            from curvlab import distributed

            distributed.check_same(numbers, f"{source}: the steps to decompose")
        patterns = list(layers) if layers is not None else None
        used: set[str] = set()
        plan = {n: _select_layers(reader.layer_names(n), patterns, used) for n in numbers}
        _check_patterns(source, patterns, used)
        for n, names in plan.items():
            if not names:
                raise OptionError(f"{source}: step {n}: no layer matches --layers {' '.join(patterns or [])}")
        if helper:
            for n, names in plan.items():
                _send_share(reader, n, names, options)
            return SpectrumResult(source, None, dev.type, dtype, vectors, [])
        results = _write_spectrum_file(reader, out, plan, options, dtype, vectors) if out else [
            _eigenvalues_only(reader, n, names, options) for n, names in plan.items()
        ]
    return SpectrumResult(source, out or None, dev.type, dtype, vectors, results)


def _write_spectrum_file(
    reader: CheckpointReader, out: str, plan: dict[int, list[str]], options: dict, dtype: str, vectors: bool
) -> list[StepSpectrum]:
    results = []
    try:
        with atomic_output(out) as tmp, h5py.File(tmp, "w-") as f:
            f.attrs["format"] = SPECTRUM_FORMAT
            f.attrs["format_version"] = np.int64(SPECTRUM_FORMAT_VERSION)
            f.attrs["source"] = os.path.abspath(reader.path)
            f.attrs["source_format"] = "curvlab.kfac"
            f.attrs["dtype"] = dtype
            f.attrs["device"] = options["device"].type
            f.attrs["has_eigenvectors"] = np.bool_(vectors)
            if reader.model_name is not None or reader.model_config is not None:
                mg = f.create_group("model")
                if reader.model_name is not None:
                    mg.attrs["name"] = reader.model_name
                if reader.model_config is not None:
                    mg.attrs["config"] = json.dumps(reader.model_config)
            steps_group = f.create_group("steps", track_order=True)
            for n, names in plan.items():
                results.append(_spectrum_step(reader, steps_group, n, names, options))
    except OSError as exc:
        raise CurvlabError(f"{out}: cannot write: {' '.join(str(exc).split())}") from None
    return results


def _eigenvalues_only(reader: CheckpointReader, step: int, names: list[str], options: dict) -> StepSpectrum:
    attrs = reader.step_attrs(step)
    layers = {}
    for name in names:
        module_type, weight_shape, has_bias = reader.layer_meta(step, name)
        layers[name] = LayerSpectrum(name, module_type, weight_shape, has_bias, np.empty(0), np.empty(0))
    opts = dict(options, vectors=False)
    for name, which, eig in decompose_checkpoint(reader, step, names, **opts):
        setattr(layers[name], which, eig.eigenvalues)
        layers[name].num_clipped[which] = eig.num_clipped
        layers[name].num_unresolved[which] = eig.num_unresolved
        layers[name].retries[which] = eig.retries
    return StepSpectrum(step, attrs["fisher_type"], attrs["num_examples"], list(layers.values()))


# --------------------------------------------------------------------------------------------------
# Reading eigenvalues back (from a spectrum file, or by decomposing a checkpoint)


def _attr(attrs: h5py.AttributeManager, key: str) -> Any:
    if key not in attrs:
        raise CheckpointError(f"missing attribute {key}")
    value = attrs[key]
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value


def _file_format(f: h5py.File, path: str) -> str:
    fmt = _attr(f.attrs, "format") if "format" in f.attrs else None
    if fmt not in ("curvlab.kfac", SPECTRUM_FORMAT):
        raise CheckpointError(
            f"{path}: not a curvlab checkpoint or spectrum file (root attribute format is {fmt!r})"
        )
    return str(fmt)


def _spectrum_steps(f: h5py.File, path: str) -> list[int]:
    version = _attr(f.attrs, "format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path}: bad format_version {version!r}")
    if version > SPECTRUM_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {version} was written by a newer curvlab (this one reads version "
            f"{SPECTRUM_FORMAT_VERSION}): upgrade curvlab"
        )
    sg = f.get("steps")
    if not isinstance(sg, h5py.Group):
        raise CheckpointError(f"{path}: missing /steps group")
    complete = []
    for name in sg:
        g = sg[name]
        if not (isinstance(g, h5py.Group) and name.isdigit() and str(int(name)) == name):
            raise CheckpointError(f"{path}: step group {name!r} is not a step number")
        if "complete" in g.attrs and bool(_attr(g.attrs, "complete")):
            complete.append(int(name))
        else:
            warnings.warn(
                f"{where(path, name)}: incomplete step, skipped", IncompleteStepWarning, stacklevel=4
            )
    return sorted(complete)


def _read_eigenvalues(lg: h5py.Group, which: str, size: int) -> np.ndarray:
    ds = lg.get(f"{which}_eigenvalues")
    if not isinstance(ds, h5py.Dataset):
        raise CheckpointError(f"missing dataset {which}_eigenvalues")
    if ds.dtype.kind != "f" or ds.ndim != 1 or ds.shape[0] != size:
        raise CheckpointError(
            f"{which}_eigenvalues must be a 1-D float array of length {size}, got {ds.dtype} {ds.shape}"
        )
    vals = np.asarray(ds[()], dtype=np.float64)
    if not np.isfinite(vals).all() or (vals < 0).any():
        raise CheckpointError(f"{which}_eigenvalues must be finite and >= 0")
    if (np.diff(vals) < 0).any():
        raise CheckpointError(f"{which}_eigenvalues are not in ascending order")
    return vals


def _read_spectrum_layers(
    f: h5py.File, path: str, step: int, patterns: Sequence[str] | None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    lgroup = f["steps"][str(step)].get("layers")
    if not isinstance(lgroup, h5py.Group):
        raise CheckpointError(f"{where(path, step)}: missing layers group")
    used: set[str] = set()
    names = _select_layers(list(lgroup), patterns, used)
    _check_patterns(path, patterns, used)
    out = {}
    for name in names:
        lg = lgroup[name]
        try:
            if not isinstance(lg, h5py.Group):
                raise CheckpointError("is not a group")
            module_type, has_bias = _attr(lg.attrs, "module_type"), bool(_attr(lg.attrs, "has_bias"))
            size_a, size_s = expected_factor_sizes(module_type, lg.attrs.get("weight_shape"), has_bias)
            out[name] = (_read_eigenvalues(lg, "S", size_s), _read_eigenvalues(lg, "A", size_a))
        except CheckpointError as exc:
            raise CheckpointError(f"{where(path, step, name)}: {exc}") from None
    return out


def load_layer_eigenvalues(
    path: str | os.PathLike,
    *,
    step: int | str = "latest",
    layers: Sequence[str] | None = None,
    device: str = "auto",
    dtype: str = "float64",
    progress: bool = False,
) -> tuple[int, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """``(step, {layer: (eigenvalues of S, eigenvalues of A)})``, eigenvalues ascending, float64.

    ``path`` is a factor checkpoint (its factors are decomposed, eigenvalues only, on ``device`` in
    ``dtype``) or a spectrum file written by ``curvlab spectrum`` (read). ``step`` is a step number
    or ``"latest"``; ``layers`` fnmatch globs (each must match). A bad or truncated file, a missing
    step or a clearly indefinite factor raise :class:`CheckpointError` (one line).
    """
    path_s = os.fspath(path)
    if isinstance(layers, str):
        layers = [layers]
    if isinstance(step, str) and step not in ("latest", "all"):
        try:
            step = int(step)
        except ValueError:
            raise OptionError(f"step {step!r}: expected a step number or 'latest'") from None
    with _open_read_only(path_s) as f:
        try:
            fmt = _file_format(f, path_s)
            if fmt == SPECTRUM_FORMAT:
                numbers = _select_steps(_spectrum_steps(f, path_s), step, path_s)
                if len(numbers) != 1:
                    raise OptionError(f"{path_s}: load_layer_eigenvalues reads one step, not {step!r}")
                return numbers[0], _read_spectrum_layers(f, path_s, numbers[0], layers)
        except (OSError, KeyError, RuntimeError, ValueError) as exc:
            if isinstance(exc, CurvlabError):
                raise
            raise CheckpointError(f"{path_s}: cannot read HDF5 data ({' '.join(str(exc).split())})") from None
    result = compute_spectrum(
        path_s, "", steps=step if step == "latest" else [step], layers=layers, device=device, dtype=dtype,
        vectors=False, progress=progress,
    )
    (only,) = result.steps
    return only.step, {layer.name: (layer.S, layer.A) for layer in only.layers}


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
