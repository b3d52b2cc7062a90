"""Softmax cross-entropy at the logits: gradients for each Fisher type and the Hessian's square root.

For one location with logits ``z`` (length C), ``p = softmax(z)`` and label ``y``, the loss
``-log p_y`` has gradient ``p - e_y`` and Hessian ``H = diag(p) - p p^T``, which does not depend on
``y``. The true Fisher of the predictive distribution equals the generalised Gauss-Newton matrix
``J^T H J`` (Martens 2014), and every Fisher type used in curvlab is an average of outer products of
backpropagated logit-gradient vectors ``u``:

* ``empirical``: ``u = p - e_y`` with the true label ``y``;
* ``mc``: ``u = p - e_ŷ`` with ``ŷ ~ Categorical(p)``, k samples weighted ``1/k``; the expectation
  over ``ŷ`` of ``u u^T`` is ``H``. ``ŷ`` is drawn by inverse CDF from one uniform ``u`` per location
  and sample (:func:`sample_categorical`); the uniforms of a whole batch are drawn at once, so a process
  holding rows ``offset … offset + n`` of a larger batch can draw the uniforms of the whole batch and
  keep its rows, getting the labels a single process would (``rows=(offset, total)``);
* ``exact``: the C columns of a square root ``H = B B^T``. ``B = diag(√p) - p √p^T`` works, since
  ``B B^T = diag(p) - 2 p p^T + p (√p^T √p) p^T = diag(p) - p p^T`` because ``Σ p = 1``; its column
  ``c`` is ``√p_c (e_c - p)``. With ``L`` locations per example the Hessian of the example's loss is
  block diagonal and there are ``C × L`` columns, one per class and location (:func:`_exact_columns`).

Logits may carry location dimensions, ``(B, ..., C)`` with labels ``(B, ...)`` (e.g. tokens of a
sequence); the per-example loss is the sum over its locations.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from curvlab.choices import FISHER_TYPES  # defined without torch, for the command line's parsers
from curvlab.errors import OptionError


def _one_hot_like(labels: Tensor, probs: Tensor) -> Tensor:
    return torch.nn.functional.one_hot(labels, probs.shape[-1]).to(probs.dtype)


def logit_gradient_samples(
    logits: Tensor,
    labels: Tensor | None,
    fisher_type: str,
    *,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    rows: tuple[int, int] | None = None,
) -> Iterator[tuple[Tensor, float]]:
    """Yield ``(u, weight)``: logit-gradient vectors whose weighted outer products give the Fisher.

    ``sum_k weight_k * u_k u_k^T`` is, per location, ``(p - e_y)(p - e_y)^T`` (empirical), a k-sample
    Monte-Carlo estimate of ``H`` (mc), or exactly ``H = diag(p) - p p^T`` (exact, C vectors).

    ``rows=(offset, total)`` (mc only): the ``n`` examples of ``logits`` are examples
    ``offset … offset + n - 1`` of a batch of ``total``; the uniforms of all ``total`` examples are drawn
    from ``generator`` and this slice's are used, so the labels, and the generator's state after, do
    not depend on how the batch is split across processes. Default ``(0, n)``.
    """
    probs = torch.softmax(logits.detach(), dim=-1)
    if fisher_type == "empirical":
        if labels is None:
            raise ValueError("the empirical Fisher needs labels")
        yield probs - _one_hot_like(labels, probs), 1.0
    elif fisher_type == "mc":
        uniforms = batch_uniforms(probs.shape[:-1], mc_samples, rows, generator, probs.device)
        for k in range(mc_samples):
            sampled = sample_categorical(probs, uniforms[k])
            yield probs - _one_hot_like(sampled, probs), 1.0 / mc_samples
    elif fisher_type == "exact":
        yield from _exact_columns(probs)
    else:
        raise ValueError(f"unknown Fisher type {fisher_type!r}; choose one of {FISHER_TYPES}")


# The most backward passes per batch the exact Fisher may ask for (classes × locations per example).
EXACT_PASS_LIMIT = 4096


def exact_passes(logits_shape: torch.Size | tuple[int, ...]) -> int:
    """Backward passes of the exact Fisher for logits ``(B, *locations, C)``: ``C × locations``."""
    return math.prod(logits_shape[1:])


def _exact_columns(probs: Tensor) -> Iterator[tuple[Tensor, float]]:
    """The columns of a square root of the per-example Hessian ``blockdiag_l(diag(p_l) − p_l p_l^T)``.

    The loss of an example is the sum over its locations ``l`` (tokens), so its Hessian at the logits is
    block diagonal, one ``C × C`` block per location, and a square root has ``C × L`` columns: column
    ``(l, c)`` is ``√p_lc (e_c − p_l)`` at location ``l`` and zero elsewhere. With one location these are
    the ``C`` columns of the module docstring, one backward pass each, for all examples at once.
    Backpropagating class ``c``'s column from all locations at once instead would add the cross-location
    products ``Σ_c b_lc b_l'c^T`` (``l ≠ l'``), which are not zero: that is not the Fisher.
    """
    passes = exact_passes(probs.shape)
    if passes > EXACT_PASS_LIMIT:
        raise OptionError(
            f"the exact Fisher of logits with {passes // probs.shape[-1]} locations and {probs.shape[-1]} "
            f"classes per example takes {passes} backward passes per batch (one per class and location; "
            f"at most {EXACT_PASS_LIMIT}); use the mc Fisher"
        )
    sqrt_probs = probs.sqrt()
    flat_p = probs.reshape(probs.shape[0], -1, probs.shape[-1])
    flat_sqrt = sqrt_probs.reshape(flat_p.shape)
    locations = flat_p.shape[1]
    for loc in range(locations):
        for c in range(probs.shape[-1]):
            column = torch.zeros_like(flat_p) if locations > 1 else torch.empty_like(flat_p)
            column[:, loc] = -flat_sqrt[:, loc, c : c + 1] * flat_p[:, loc]
            column[:, loc, c] += flat_sqrt[:, loc, c]
            yield column.reshape(probs.shape), 1.0


def batch_uniforms(
    shape: torch.Size | tuple[int, ...],
    samples: int,
    rows: tuple[int, int] | None,
    generator: torch.Generator | None,
    device: torch.device,
) -> Tensor:
    """``U[0, 1)`` draws (float64) of shape ``(samples, *shape)`` for the examples ``rows`` of a batch.

    ``shape = (n, *locations)``; ``rows = (offset, total)`` draws ``(samples, total, *locations)`` and
    keeps ``[:, offset : offset + n]``: the uniforms of example ``i`` of the batch are the same whoever
    draws them.
    """
    n = shape[0]
    offset, total = (0, n) if rows is None else rows
    if offset < 0 or offset + n > total:
        raise ValueError(f"rows {offset}..{offset + n} do not fit a batch of {total} examples")
    full = torch.rand((samples, total, *shape[1:]), generator=generator, dtype=torch.float64, device=device)
    return full[:, offset : offset + n]


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


def hessian_vector_product(logits: Tensor, u: Tensor) -> Tensor:
    """``H u`` at every location, ``H = diag(p) − p p^T``: ``p ∘ u − p (p^T u)``, shape of ``logits``.

    The Hessian of the per-example loss (summed over its locations) is block diagonal over the
    locations, so this is the whole ``H`` of an example applied to ``u``; the GGN-vector product
    ``J^T H J v`` (:mod:`curvlab.analysis.ggn`) needs nothing else of the loss.
    """
    p = torch.softmax(logits, dim=-1)
    return p * u - p * (p * u).sum(-1, keepdim=True)


def loss_hessian(logits: Tensor) -> Tensor:
    """``diag(p) - p p^T`` per location, shape ``(..., C, C)`` (for tests and small models)."""
    probs = torch.softmax(logits, dim=-1)
    return torch.diag_embed(probs) - probs.unsqueeze(-1) * probs.unsqueeze(-2)
