"""Fisher logit-gradient vectors (curvlab/capture/loss.py): their weighted outer products are the
loss Hessian.

For logits ``(B, L, C)`` (L label locations per example, e.g. tokens) the Hessian of an example's summed
loss is block diagonal, ``blockdiag_l(diag(p_l) − p_l p_l^T)``. The exact columns must give it to rounding
(float64: 1e-14); Monte-Carlo labels give it in expectation (checked within 5 standard errors).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from curvlab.capture.loss import EXACT_PASS_LIMIT, exact_passes, logit_gradient_samples, loss_hessian
from curvlab.errors import OptionError


def _block_hessian(logits: torch.Tensor) -> torch.Tensor:
    """``(B, L·C, L·C)``: the per-location Hessians on the diagonal, zero between locations."""
    b, locations, c = logits.shape
    blocks = loss_hessian(logits)  # (B, L, C, C)
    dense = torch.zeros(b, locations * c, locations * c, dtype=logits.dtype)
    for loc in range(locations):
        dense[:, loc * c : (loc + 1) * c, loc * c : (loc + 1) * c] = blocks[:, loc]
    return dense


def _outer_sum(samples, shape) -> torch.Tensor:
    total = torch.zeros(shape[0], shape[1] * shape[2], shape[1] * shape[2], dtype=torch.float64)
    for u, weight in samples:
        flat = u.reshape(shape[0], -1)
        total += weight * flat[:, :, None] * flat[:, None, :]
    return total


@pytest.mark.parametrize("shape", [(4, 1, 5), (3, 4, 5), (2, 7, 3)])
def test_exact_columns_give_the_block_diagonal_hessian(shape):
    logits = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    samples = list(logit_gradient_samples(logits, None, "exact"))
    assert len(samples) == exact_passes(shape) == shape[1] * shape[2]
    np.testing.assert_allclose(_outer_sum(samples, shape), _block_hessian(logits), atol=1e-14)


def test_exact_columns_of_plain_classifier_logits():
    logits = torch.randn(6, 4, dtype=torch.float64)
    samples = list(logit_gradient_samples(logits, None, "exact"))
    assert len(samples) == 4
    total = sum(w * u[:, :, None] * u[:, None, :] for u, w in samples)
    np.testing.assert_allclose(total, loss_hessian(logits), atol=1e-14)


def test_too_many_exact_passes_is_a_clear_error():
    logits = torch.zeros(1, 100, EXACT_PASS_LIMIT // 100 + 1)
    with pytest.raises(OptionError, match=r"takes \d+ backward passes per batch .*use the mc Fisher"):
        next(logit_gradient_samples(logits, None, "exact"))


def test_mc_labels_give_the_block_diagonal_hessian_in_expectation():
    """Independent labels per location: the cross-location products average out."""
    shape = (2, 3, 4)
    logits = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    draws = 20_000
    gen = torch.Generator().manual_seed(2)
    samples = list(logit_gradient_samples(logits, None, "mc", mc_samples=draws, generator=gen))
    flat = torch.stack([u.reshape(shape[0], -1) for u, _ in samples])  # (draws, B, L·C)
    outer = flat[..., :, None] * flat[..., None, :]
    mean, se = outer.mean(0), outer.std(0) / draws**0.5
    expected = _block_hessian(logits)
    assert torch.all((mean - expected).abs() <= 5 * se + 1e-12)
