"""Monte-Carlo draws for a whole batch, so that a slice of it gets the draws the whole batch would.

The ``mc`` Fisher (:mod:`curvlab.capture.loss`) samples labels from the model: categorical and Bernoulli
labels by inverse CDF from uniforms, Gaussian ones from standard normals. Under ``torchrun`` a process
holds rows ``offset … offset + n`` of a batch of ``total`` examples; it draws the ``(samples, total,
...)`` array of the whole batch from the generator every process seeds alike and keeps its rows
(``rows=(offset, total)``), so the labels of an example, and the generator's state after, do not depend
on how the batch is split.
"""

from __future__ import annotations

import torch
from torch import Tensor


def batch_uniforms(
    shape: torch.Size | tuple[int, ...],
    samples: int,
    rows: tuple[int, int] | None,
    generator: torch.Generator | None,
    device: torch.device,
) -> Tensor:
    """``U[0, 1)`` draws (float64) of shape ``(samples, *shape)`` for the examples ``rows`` of a batch.

    ``shape = (n, *rest)``; ``rows = (offset, total)`` draws ``(samples, total, *rest)`` and keeps
    ``[:, offset : offset + n]``: the uniforms of example ``i`` of the batch are the same whoever
    draws them.
    """
    offset, total = _rows(shape[0], rows)
    full = torch.rand((samples, total, *shape[1:]), generator=generator, dtype=torch.float64, device=device)
    return full[:, offset : offset + shape[0]]


def batch_normals(
    shape: torch.Size | tuple[int, ...],
    samples: int,
    rows: tuple[int, int] | None,
    generator: torch.Generator | None,
    device: torch.device,
) -> Tensor:
    """Standard normal draws (float64), ``(samples, *shape)``, for the rows of a batch as in
    :func:`batch_uniforms`."""
    offset, total = _rows(shape[0], rows)
    full = torch.randn((samples, total, *shape[1:]), generator=generator, dtype=torch.float64, device=device)
    return full[:, offset : offset + shape[0]]


def _rows(n: int, rows: tuple[int, int] | None) -> tuple[int, int]:
    offset, total = (0, n) if rows is None else rows
    if offset < 0 or offset + n > total:
        raise ValueError(f"rows {offset}..{offset + n} do not fit a batch of {total} examples")
    return offset, total


def sample_categorical(probs: Tensor, uniforms: Tensor) -> Tensor:
    """Labels ``ŷ ~ Categorical(p)`` by inverse CDF: ``ŷ = #{c : P_c <= u P}``, clamped to ``C - 1``.

    ``probs`` ``(..., C)``, uniforms ``u ~ U[0, 1)`` of shape ``(...)``. With the cumulative sums
    ``P_c = p_0 + … + p_c`` (float64, ``P_{-1} = 0``) and their total ``P = P_{C-1}``, ``ŷ = c`` exactly
    when ``P_{c-1} <= u P < P_c``, which has probability ``p_c / P``: the categorical distribution of
    the given probabilities, renormalised by their rounded total (so a class of probability 0 is not
    drawn). The clamp catches ``u P`` rounding up to ``P`` (``u`` within ``2^-53`` of 1).
    """
    cdf = probs.to(torch.float64).cumsum(-1)
    threshold = (uniforms * cdf[..., -1]).unsqueeze(-1)
    return (cdf <= threshold).sum(-1).clamp_max(probs.shape[-1] - 1)
