"""Which examples each update trains on: the data order of a run and each process's share of a batch.

The batch of the update from step ``t`` to ``t + 1`` is a slice of a per-epoch permutation of the
training set, seeded by ``(seed, epoch)`` (:class:`BatchOrder`), so it is a function of the step alone
and a resumed run sees the same batches. Each epoch is cut into ``n // batch_size`` full batches.

Several processes (``torchrun``, :mod:`curvlab.distributed`): the batch of every step is the same on
every process, and process ``r`` of ``W`` takes a contiguous slice of it (:func:`shard`, cut like
``numpy.array_split``). Each process's mean loss is scaled by :func:`loss_scale`, ``W n_r / B``, so that
the average of the processes' gradients that ``DistributedDataParallel`` computes is the gradient of
the whole batch's mean loss: ``(1/W) Σ_r ∇(W n_r / B · L_r) = ∇ (1/B) Σ_i ℓ_i``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class BatchOrder:
    """The examples of each step: epoch ``e`` is a permutation seeded by ``(seed, e)``, cut into
    ``n // batch_size`` batches (the remainder of each epoch is left out, so batches are full)."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size
        self._epoch: int | None = None
        self._perm: Tensor | None = None

    def indices(self, t: int) -> Tensor:
        """The example indices of the update from step ``t`` to ``t + 1``."""
        epoch, position = divmod(t, self.per_epoch)
        if epoch != self._epoch:
            seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed))
            self._epoch = epoch
        start = position * self.batch_size
        return self._perm[start : start + self.batch_size]


def shard(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(offset, count)``: process ``rank``'s contiguous slice of a batch of ``total`` examples.

    Cut like ``numpy.array_split``: the first ``total mod W`` processes take ``⌈total / W⌉`` examples,
    the others ``⌊total / W⌋``, so the counts differ by at most one.
    """
    base, extra = divmod(total, world_size)
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)


def loss_scale(count: int, total: int, world_size: int) -> float:
    """``W n_r / B``: the factor on process ``r``'s mean loss (over its ``n_r`` of the ``B`` examples).

    With ``L_r = (1/n_r) Σ_{i ∈ r} ℓ_i``, DDP's average of the processes' gradients is
    ``(1/W) Σ_r ∇(W n_r / B · L_r) = Σ_r (n_r / B) ∇L_r = ∇ (1/B) Σ_i ℓ_i``, the gradient of the whole
    batch's mean loss; the average of the scaled losses is that mean loss. (Per example the loss is
    the mean over its label locations, the same number for every example, so this holds per location.)
    """
    return world_size * count / total
