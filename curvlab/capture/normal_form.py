"""The normal form every adapter brings its layer to, and the sums written once on it.

A layer in normal form computes ``s_t = W a_t`` at locations ``t = 1..T`` of each example, with inputs
``a`` of shape ``[batch, locations, n]``, output gradients ``g`` of shape ``[batch, locations, m]`` and
``W`` the ``(m, n)`` weight matrix of design.md — plus a bias column when the layer has one: the bias
is the last column of ``W`` and ``a`` is augmented by a trailing 1 (:func:`augment`). Adapters return
``a`` *without* that column; the sums here add it where it is needed.

* :func:`second_moment` — ``Σ_{b,t} a a^T`` over a batch (the input factor's sum, seed eqs. 13, 15);
* :func:`output_moment_sum` — ``Σ_{b,t} g g^T`` (the output factor's sum before its division by the
  number of locations, docs/factors.md);
* :func:`weight_matrix`, :func:`split_matrix` — ``W`` from a layer's weight and bias tensors and back.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def augment(a: Tensor) -> Tensor:
    """``a`` with a trailing 1 appended on its last axis: the input of the bias column of ``W``."""
    return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)


def weight_matrix(module: nn.Module | None, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The ``(m, n[+1])`` matrix ``W`` of design.md from a layer's weight (and bias) tensors."""
    matrix = weight.reshape(weight.shape[0], -1)
    if bias is not None:
        matrix = torch.cat([matrix, bias.reshape(-1, 1)], dim=1)
    return matrix


def split_matrix(
    matrix: Tensor, weight_shape: tuple[int, ...], has_bias: bool
) -> tuple[Tensor, Tensor | None]:
    """``(weight-shaped, bias-shaped or None)`` from ``W = [weight.flatten(1) | bias]``."""
    if has_bias:
        return matrix[:, :-1].reshape(weight_shape), matrix[:, -1]
    return matrix.reshape(weight_shape), None


def second_moment(a: Tensor, has_bias: bool) -> Tensor:
    """``sum_{b,t} a_bt a_bt^T`` over a batch in normal form, with the bias augmentation.

    The augmented sum is assembled from ``X^T X``, ``X^T 1`` and the location count, so the
    ``[B, T, n+1]`` augmented copy of the inputs is never built.
    """
    x = a.reshape(-1, a.shape[-1])
    core = x.T @ x
    if not has_bias:
        return core
    n = core.shape[0]
    out = core.new_empty(n + 1, n + 1)
    out[:n, :n] = core
    column = x.sum(dim=0)
    out[:n, n] = column
    out[n, :n] = column
    out[n, n] = x.shape[0]
    return out


def output_moment_sum(g: Tensor) -> Tensor:
    """``sum_b sum_t g_bt g_bt^T`` over a batch in normal form (not yet divided by the locations).

    When ``g`` is the transposed view of a contiguous ``[B, m, T]`` gradient (a convolution), the
    per-example products are batched matrix products on that layout, which avoids a transposed copy.
    """
    channels_first = g.transpose(1, 2)
    if g.shape[1] > 1 and channels_first.is_contiguous():
        return torch.bmm(channels_first, g).sum(dim=0)
    x = g.reshape(-1, g.shape[-1])
    return x.T @ x


def output_second_moment(g: Tensor) -> Tensor:
    """``sum_b (1/T) sum_t g_bt g_bt^T`` over a batch in normal form (eq. 15's ``1/|I|``)."""
    return output_moment_sum(g) / g.shape[1]
