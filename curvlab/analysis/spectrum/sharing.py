"""Sharing a step's eigendecompositions across the processes of torchrun (docs/distributed.md).

**Under torchrun** (:mod:`curvlab.distributed`, docs/distributed.md) each step's work is shared out
by size: the units are the ``eigh`` calls one process would make (:func:`plan_batches`: a diagonal
factor, or a batch of equal-size dense ones; big factors are always alone), largest first, each to
the process with the least work so far (:func:`assign_batches`, LPT), the work of a factor being
``n^3`` for a dense ``n x n`` one and ``n`` for a diagonal one. Every process reads only the layers
that hold its factors, makes its calls with the engine (:mod:`.engine`: same options, retries and
clipping) and sends the results to process 0 point-to-point (eigenvalues and eigenvectors bit for
bit, in the dtype they were computed in); process 0 writes the same spectrum file, summary and plot
as one process (:mod:`.files`). The results are identical to one process's because each factor's
decomposition is the same computation wherever it runs: the same symmetrised input, at the same
place of the same batched ``eigh`` call, in the same dtype, on the same kind of device. (Keeping the
batches matters: MKL rounds a matrix differently at a batch offset that is not 16-byte aligned.)

LPT (Graham): batches in decreasing cost, each to the least-loaded process; the largest total is at
most ``4/3 - 1/(3W)`` times the best possible one, and at most the mean plus the largest batch.

torch and :mod:`curvlab.distributed` are imported only inside the functions that use them.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from curvlab.analysis.spectrum.engine import (
    FactorEig,
    _batch_budget,
    _Batcher,
    _decompose_group,
    _diagonal_eig,
    _factor_items,
    decompose_checkpoint,
    decompose_factors,
)
from curvlab.errors import CheckpointError, where
from curvlab.io.checkpoint import expected_factor_sizes

if TYPE_CHECKING:
    import torch

    from curvlab.distributed import Context
    from curvlab.io.checkpoint import CheckpointReader

K = TypeVar("K", bound=Hashable)


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
    """The shared factors: all but blocks factors, which process 0 decomposes itself (:func:`_own_blocks`:
    ``C`` tiny blocks, less work than sending them)."""
    from curvlab import distributed

    factors = [f for f in _factor_sizes(reader, step, names) if f[2] != "blocks"]
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
    from curvlab.progress import progress_bar

    bar = progress_bar(total=len(share.factors), desc=f"spectrum step {step}", unit="factor",
                       enabled=bool(options["progress"]))
    try:
        yield from _own_blocks(reader, step, names)
        for layer, which, eig in _decompose_batches(reader, step, names, share.batches_of(0), options):
            yield layer, which, eig
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
                bar.update(1)
    finally:
        bar.close()


def _own_blocks(
    reader: CheckpointReader, step: int, names: Sequence[str]
) -> Iterator[tuple[str, str, FactorEig]]:
    """Process 0: the blocks factors of ``step`` (never shared, see :func:`_share`)."""
    wanted = {key for key, _, kind in _factor_sizes(reader, step, names) if kind == "blocks"}
    if not wanted:
        return
    items = _factor_items(reader, step, names, False, only=wanted)
    for (layer, which), eig in decompose_factors(items, path=reader.path, step=step):
        yield layer, which, eig


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
