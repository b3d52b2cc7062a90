"""Data-parallel runs across processes and machines on ``torch.distributed``.

A command started under ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``) joins one process group: NCCL for CUDA tensors and gloo for CPU
tensors (``backend="cpu:gloo,cuda:nccl"`` where NCCL exists, else gloo alone). Without those variables,
or with ``WORLD_SIZE=1``, nothing here does anything and every function is the single-process identity.

How the work is split (docs/distributed.md):

* **Batches.** The data is cut into the same batches as in one process, and process ``r`` of ``W`` takes
  batches ``r, r + W, r + 2W, ...`` (:func:`my_batches`). Each statistic is a sum over batches — the
  factor sums ``Σ a a^T`` and ``Σ g g^T`` (seed eqs. 13, 15), the KFE coefficient sums ``Σ c``, ``Σ c²``
  and the curvature sums — so the sums of all processes add up to the single-process sum, up to the
  order of floating-point additions. They are all-reduced once, at the end (:func:`all_reduce_sum`:
  one flat buffer per dtype and device, so one collective for all statistics).
* **Randomness.** Monte-Carlo labels of batch ``k`` come from a generator seeded by ``(seed, k)``
  (:func:`batch_seed`), so they do not depend on which process draws them, nor on how many there are.
* **Files.** Every process reads the inputs; only process 0 writes, atomically (``curvlab.io.atomic``).

Failures: every collective runs under :func:`collective`, which turns a lost peer (a process that
died, or stalled beyond the timeout) into one :class:`DistributedError` line naming this process and
the step that failed. The timeout is ``CURVLAB_DIST_TIMEOUT`` seconds (default 600), for the start-up
rendezvous and every collective.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from curvlab.errors import CurvlabError, OptionError
from curvlab.launch import launched  # read without torch, for the command line

T = TypeVar("T")

TIMEOUT_ENV = "CURVLAB_DIST_TIMEOUT"
BACKEND_ENV = "CURVLAB_DIST_BACKEND"
DEFAULT_TIMEOUT_S = 600.0


class DistributedError(CurvlabError):
    """Another process of the group died or stalled: this one stops instead of waiting forever."""

    exit_status = 1


@dataclass(frozen=True)
class Context:
    """This process's place in the group (``rank`` 0 of 1 without a process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        """Whether more than one process shares the work."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Process 0: the one that writes files and prints summaries."""
        return self.rank == 0

    def describe(self) -> str:
        return f"process {self.rank} of {self.world_size}"


def context() -> Context:
    """The current process group's :class:`Context` (single process when none is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Context()
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def timeout_seconds() -> float:
    """``CURVLAB_DIST_TIMEOUT`` (seconds), else 600."""
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise OptionError(f"{TIMEOUT_ENV}={text!r}: expected a positive number of seconds")
    return value


def default_backend() -> str:
    """gloo for CPU tensors, plus NCCL for CUDA tensors where both CUDA and NCCL are present."""
    chosen = os.environ.get(BACKEND_ENV)
    if chosen:
        return chosen
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def start() -> Context:
    """Join the process group described by the environment (no-op for a single process).

    Returns this process's :class:`Context`; a rendezvous that does not complete within the timeout is
    a :class:`DistributedError`.
    """
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return context()
    if not dist.is_available():
        raise OptionError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise OptionError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {missing[0]} is not set: start the "
                          "command with torchrun")
    timeout = timeout_seconds()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and torch.cuda.device_count() > local_rank:
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(
            backend=default_backend(),
            timeout=datetime.timedelta(seconds=timeout),
            rank=rank,
            world_size=world,
        )
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(
            f"process {rank} of {world}: could not join the process group at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {timeout:g} s "
            f"({_first_line(exc)}); are all {world} processes started?"
        ) from None
    return context()


def stop() -> None:
    """Leave the process group (if one was joined)."""
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


@contextlib.contextmanager
def session() -> Iterator[Context]:
    """``start()`` … ``stop()`` around a command.

    A command that ends normally waits for the others (process 0 may still be writing), and objects
    bound to the group (a ``DistributedDataParallel`` wrapper caught in a reference cycle) are
    collected before the group goes: destroyed after it, at interpreter exit, they abort the process.
    """
    ctx = start()
    try:
        yield ctx
        barrier("finishing")
    finally:
        gc.collect()
        stop()


def _first_line(exc: BaseException) -> str:
    """The first sentence of a backend's message, without its ``[source.cc:123]`` location prefix."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", lines[0])
    return re.split(r"\.\s+(?=[A-Z])", text, maxsplit=1)[0].rstrip(".") or lines[0]


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Run collectives, turning a lost peer or a timeout into one :class:`DistributedError` line."""
    try:
        yield
    except DistributedError as exc:  # from a collective inside this one: say where it was, outside in
        prefix = f"{context().describe()}: "
        text = str(exc)
        raise DistributedError(prefix + what + ": " + text.removeprefix(prefix)) from None
    except RuntimeError as exc:  # torch.distributed's errors (DistError, DistBackendError) are these
        if not _lost_peer(exc):
            raise  # a failure of this process's own work (out of memory, eigh, shapes) stays what it is
        ctx = context()
        raise DistributedError(
            f"{ctx.describe()}: {what}: lost the other processes ({_first_line(exc)}); one of them "
            f"died, failed or stalled beyond the {timeout_seconds():g} s timeout ({TIMEOUT_ENV})"
        ) from None


# What gloo's and NCCL's errors about a peer or the network say (they are plain RuntimeErrors in gloo).
_TRANSPORT_WORDS = re.compile(
    r"connection|timed out|timeout|peer|socket|broken pipe|reset by|gloo|nccl|rendezvous|store", re.IGNORECASE
)


def _lost_peer(exc: RuntimeError) -> bool:
    """Whether ``exc`` comes from the transport (a peer died or stalled), not from this process's work."""
    own_failures = (torch.linalg.LinAlgError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))
    if isinstance(exc, own_failures):
        return False
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return bool(_TRANSPORT_WORDS.search(str(exc)))


def check_same(values: Sequence[int], what: str,
               hint: str = "is the input being written while it is read?") -> None:
    """Raise :class:`~curvlab.errors.OptionError` unless every process holds the same integers.

    For choices each process makes from its inputs — e.g. the "latest" step of a checkpoint that another
    job is appending to — which must agree before the work is shared out.
    """
    ctx = context()
    if not ctx.active:
        return
    (length,) = all_reduce_max_int([len(values)], what)
    padded = [*values, *[-1] * (length - len(values)), len(values)]
    high = all_reduce_max_int(padded, what)
    low = [-v for v in all_reduce_max_int([-v for v in padded], what)]
    if high != low:
        raise OptionError(f"{what}: the processes disagree ({ctx.describe()} has {list(values)}); {hint}")


def my_batches(batches: Iterable[T], ctx: Context | None = None) -> Iterator[tuple[int, T]]:
    """``(k, batch)`` for this process's batches: ``k ≡ rank (mod world_size)``; all of them alone."""
    ctx = ctx or context()
    for k, batch in enumerate(batches):
        if k % ctx.world_size == ctx.rank:
            yield k, batch


def batch_seed(seed: int, index: int) -> int:
    """The seed of batch ``index``'s random draws: a function of ``(seed, index)`` only."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(index)]).generate_state(1)[0])


def all_reduce_sum(tensors: Sequence[Tensor], what: str = "adding up the statistics") -> None:
    """Replace every tensor by its sum over all processes, in place (no-op for one process).

    Tensors are packed into one flat buffer per (dtype, device), so all of them cost one collective.
    """
    ctx = context()
    if not ctx.active or not tensors:
        return
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    with collective(what):
        for group in groups.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()


def all_reduce_max_int(values: Sequence[int], what: str) -> list[int]:
    """Element-wise maximum of small integer vectors over all processes."""
    ctx = context()
    if not ctx.active:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.int64, device=_collective_device())
    with collective(what):
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.cpu()]


def barrier(what: str) -> None:
    """Wait for every process (e.g. after every process has checked its options)."""
    if context().active:
        with collective(what):
            dist.barrier()


def _collective_device() -> torch.device:
    """Where small bookkeeping tensors go: the CPU unless the group is NCCL only."""
    backend = dist.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
