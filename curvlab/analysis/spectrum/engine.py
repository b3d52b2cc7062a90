"""The eigendecomposition engine: every K-FAC factor ``X = Q diag(λ) Q^T`` (seed E.1).

A layer's Fisher block is ``F ~= S (x) A`` (seed eq. 13); the eigendecompositions of ``S`` and ``A``
give the Kronecker-factored eigenbasis and the factor eigenvalues whose products ``λ_S[i] λ_A[j]``
are the layer's K-FAC eigenvalues (:mod:`curvlab.analysis.spectrum`, :mod:`.kronecker`).

**The engine** (:func:`decompose_factors`, :func:`decompose_checkpoint`): every dense factor is
symmetrised, ``(X + X^T) / 2``, and decomposed with ``torch.linalg.eigh`` (ascending eigenvalues,
``X = Q diag(λ) Q^T``), equal-size factors stacked into one batched call (:class:`_Batcher`), on the
CPU or a GPU. A diagonal factor needs no decomposition: its eigenvalues are its sorted entries and
its eigenvectors a permuted identity, stored as the permutation ``order`` (``λ[k] = d[order[k]]``,
``Q[:, k] = e_{order[k]}``). A blocks factor ``(C, k, k)`` (the exact per-channel Fisher blocks of a
``NormAffine`` entry, whose ``S`` is ``[1]``) is decomposed block by block in float64 on the CPU
(numpy's batched ``eigh``; the blocks are ``1 × 1`` or ``2 × 2``): its eigenvalues are those of all
blocks, sorted, with ``order`` the flat index ``c·k + j`` of each (eigenvalue ``j`` of block ``c``) and
the eigenvectors the ``(C, k, k)`` blocks' own. A failed decomposition (non-convergence, a cuSOLVER
error, out of memory, non-finite output) is retried in float64, then on the CPU, and the retries are
reported.
Round-off makes the smallest eigenvalues of a rank-deficient factor slightly negative: those within
the tolerance of :func:`negative_tolerance` are clipped to 0 and counted; a clearly negative one
is a :class:`~curvlab.errors.CheckpointError` naming file, step, layer and factor. Eigenvalues of a
dense factor below the solver's resolution (:func:`solver_resolution`) are set to 0 and counted too.

:func:`decompose_checkpoint` feeds the engine one step of a factor checkpoint, read one layer at a
time. Under torchrun :mod:`.sharing` makes the same ``eigh`` calls, spread over the processes.

torch is imported only inside this module's functions, so importing the module imports no torch.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from curvlab.errors import CheckpointError, OptionError, where

if TYPE_CHECKING:
    import torch

    from curvlab.io.checkpoint import CheckpointReader

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
    ``λ[k] = d[order[k]]`` (``Q[:, k] = e_{order[k]}``). A blocks factor ``(C, b, b)`` has
    ``eigenvectors`` ``(C, b, b)`` (block ``c``'s in its columns, ascending) and ``order``, the flat
    index ``c·b + j`` of each sorted eigenvalue (eigenvalue ``j`` of block ``c``).
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
        """``Q`` as a dense matrix (a permuted identity for a diagonal factor, a column-permuted
        block-diagonal matrix for a blocks factor)."""
        if self.kind == "diagonal":
            q = np.zeros((self.size, self.size))
            q[self.order, np.arange(self.size)] = 1.0
            return q
        if self.kind == "blocks":
            blocks = self.eigenvectors
            b = blocks.shape[1]
            q = np.zeros((self.size, self.size))
            for column, flat in enumerate(self.order):
                c, j = divmod(int(flat), b)
                q[c * b : (c + 1) * b, column] = blocks[c, :, j]
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
    vals: np.ndarray, kind: str, dtype: str | None, *, path: object, step: object, layer: object, which: str,
    n: int | None = None,
) -> _Cleaned:
    """Eigenvalues in ``[-tol * λ_max, 0)`` (clipped) and, for a dense factor decomposed in ``dtype``,
    in ``(0, resolution * λ_max]`` (unresolved) set to 0; one below ``-tol * λ_max`` is a
    CheckpointError naming the factor. ``n``: the size of the matrices decomposed (default: the
    number of eigenvalues; the block size for a blocks factor)."""
    n = vals.shape[0] if n is None else n
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


def _blocks_eig(x: np.ndarray, *, path: object, step: object, layer: object, which: str) -> FactorEig:
    """A blocks factor ``(C, b, b)``: every block decomposed (numpy, float64), eigenvalues sorted."""
    blocks = np.asarray(x, dtype=np.float64)
    values, vectors = np.linalg.eigh((blocks + blocks.transpose(0, 2, 1)) / 2)
    flat = values.reshape(-1)
    order = np.argsort(flat, kind="stable")
    vals = flat[order]
    n = blocks.shape[1]
    c = _clip(vals, "dense", "float64", path=path, step=step, layer=layer, which=which, n=n)
    return FactorEig(
        kind="blocks",
        eigenvalues=np.ascontiguousarray(c.vals),
        eigenvectors=vectors,
        order=order.astype(np.int64),
        num_clipped=c.num_clipped,
        tolerance=c.tolerance,
        num_unresolved=c.num_unresolved,
        resolution=c.resolution,
        dtype="float64",
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

    ``items`` yields ``(key, X)`` with ``X`` dense ``(n, n)``, diagonal ``(n,)`` or blocks
    ``(C, b, b)`` (decomposed at once, block by block, in float64 on the CPU); a key
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
        if x.ndim == 3 and x.shape[1] == x.shape[2]:
            layer, which = _split_key(key)
            yield key, _blocks_eig(x, path=path, step=step, layer=layer, which=which)
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
    from curvlab.progress import progress_bar

    bar = progress_bar(total=len(names), desc=f"spectrum step {step}", unit="layer", enabled=progress)
    try:
        for name in names:
            wanted = [w for w in ("S", "A") if only is None or (name, w) in only]
            if not wanted:
                continue
            layer = reader.read_factors(step, name)  # both factors: the reader reads a layer at a time
            for which in wanted:
                yield (name, which), getattr(layer, which)
            del layer
            bar.update(1)
    finally:
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
