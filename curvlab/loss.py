"""Softmax cross-entropy at the logits: gradients for each Fisher type and the Hessian's square root.

For one location with logits ``z`` (length C), ``p = softmax(z)`` and label ``y``, the loss
``-log p_y`` has gradient ``p - e_y`` and Hessian ``H = diag(p) - p p^T``, which does not depend on
``y``. The true Fisher of the predictive distribution equals the generalised Gauss-Newton matrix
``J^T H J`` (Martens 2014), and every Fisher type used in curvlab is an average of outer products of
backpropagated logit-gradient vectors ``u``:

* ``empirical``: ``u = p - e_y`` with the true label ``y``;
* ``mc``: ``u = p - e_ŷ`` with ``ŷ ~ Categorical(p)``, k samples weighted ``1/k``; the expectation
  over ``ŷ`` of ``u u^T`` is ``H``;
* ``exact``: the C columns of a square root ``H = B B^T``. ``B = diag(√p) - p √p^T`` works, since
  ``B B^T = diag(p) - 2 p p^T + p (√p^T √p) p^T = diag(p) - p p^T`` because ``Σ p = 1``; its column
  ``c`` is ``√p_c (e_c - p)``.

Logits may carry location dimensions, ``(B, ..., C)`` with labels ``(B, ...)`` (e.g. tokens of a
sequence); the per-example loss is the sum over its locations.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

FISHER_TYPES = ("empirical", "mc", "exact")


def _one_hot_like(labels: Tensor, probs: Tensor) -> Tensor:
    return torch.nn.functional.one_hot(labels, probs.shape[-1]).to(probs.dtype)


def logit_gradient_samples(
    logits: Tensor,
    labels: Tensor | None,
    fisher_type: str,
    *,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[Tensor, float]]:
    """Yield ``(u, weight)``: logit-gradient vectors whose weighted outer products give the Fisher.

    ``sum_k weight_k * u_k u_k^T`` is, per location, ``(p - e_y)(p - e_y)^T`` (empirical), a k-sample
    Monte-Carlo estimate of ``H`` (mc), or exactly ``H = diag(p) - p p^T`` (exact, C vectors).
    """
    probs = torch.softmax(logits.detach(), dim=-1)
    if fisher_type == "empirical":
        if labels is None:
            raise ValueError("the empirical Fisher needs labels")
        yield probs - _one_hot_like(labels, probs), 1.0
    elif fisher_type == "mc":
        flat = probs.reshape(-1, probs.shape[-1])
        for _ in range(mc_samples):
            sampled = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
            yield probs - _one_hot_like(sampled, probs), 1.0 / mc_samples
    elif fisher_type == "exact":
        sqrt_probs = probs.sqrt()
        for c in range(probs.shape[-1]):
            column = -sqrt_probs[..., c : c + 1] * probs
            column[..., c] += sqrt_probs[..., c]
            yield column, 1.0
    else:
        raise ValueError(f"unknown Fisher type {fisher_type!r}; choose one of {FISHER_TYPES}")


def loss_hessian(logits: Tensor) -> Tensor:
    """``diag(p) - p p^T`` per location, shape ``(..., C, C)`` (for tests and small models)."""
    probs = torch.softmax(logits, dim=-1)
    return torch.diag_embed(probs) - probs.unsqueeze(-1) * probs.unsqueeze(-2)
