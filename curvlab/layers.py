"""Per-layer adapters: the only place that knows how a module type maps onto ``s = W a``.

Every supported layer is brought into one normal form (``shared/design.md``, "Shape of the package"):
the layer's inputs become ``a`` of shape ``[batch, locations, n]`` and the gradients of the per-example
loss with respect to its outputs become ``g`` of shape ``[batch, locations, m]``, so that at every
location ``t`` the layer computes ``s_t = W a_t`` with ``W`` the ``(m, n)`` weight matrix (plus a bias
column when the layer has one). After this step every layer is the same and the downstream math —
K-FAC factors (seed eqs. 13 and 15), projections onto the Kronecker-factored eigenbasis, K-FAC
preconditioning — is written once.

* ``nn.Linear``, weight ``(m, n)``: an input of shape ``(B, n)`` has one location; an input of shape
  ``(B, T1, T2, ..., n)`` has ``T1*T2*...`` locations (tokens of a sequence, treated like the spatial
  locations of a convolution, the "expand" setting).
* ``nn.Conv2d``, weight ``(c_out, c_in, kh, kw)`` with ``groups == 1``: the locations are the output
  pixels, ``a_t`` is the unfolded input patch at pixel ``t`` (length ``c_in*kh*kw``, ordered like the
  flattened weight) and ``g_t`` the output gradient there (seed eq. 15, Grosse & Martens 2016).

The bias is handled by augmenting ``a`` with a trailing 1 (the bias is the last column of ``W``); the
adapters return ``a`` *without* that column, and :func:`augment` adds it where a caller needs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class LinearAdapter:
    """``nn.Linear``: ``s = W a + b`` at each location (leading dims beyond the batch are locations)."""

    module_type: str = "Linear"

    def inputs(self, module: nn.Linear, x: Tensor) -> Tensor:
        """``a`` in normal form ``[B, T, n]`` from the module's input ``(B, ..., n)``."""
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def input_second_moment(self, module: nn.Linear, x: Tensor) -> Tensor:
        """``Σ_{b,t} a a^T`` over a batch (bias-augmented)."""
        return second_moment(self.inputs(module, x), self.has_bias(module))

    def output_grads(self, module: nn.Linear, grad_output: Tensor) -> Tensor:
        """``g`` in normal form ``[B, T, m]`` from the gradient w.r.t. the output ``(B, ..., m)``."""
        return grad_output.reshape(grad_output.shape[0], -1, grad_output.shape[-1])

    def weight_shape(self, module: nn.Linear) -> tuple[int, ...]:
        return tuple(module.weight.shape)

    def has_bias(self, module: nn.Linear) -> bool:
        return module.bias is not None

    def supports(self, module: nn.Module) -> str | None:
        """``None`` if the module is supported, else the reason it is not."""
        return None


@dataclass(frozen=True)
class Conv2dAdapter:
    """``nn.Conv2d`` (``groups == 1``): unfolded patches, one location per output pixel (eq. 15).

    Patches are cut from the padded input in channels-last layout, one strided view per kernel offset
    ``k = (i, j)``, and concatenated: that gives them "offset-major" (feature ``k * c_in + c``), one
    copy and cache-friendly. :meth:`inputs` reorders them to the weight's order ``c * (kh*kw) + k``;
    :meth:`input_second_moment` instead permutes the small ``n × n`` result.
    """

    module_type: str = "Conv2d"

    def _padded_channels_last(self, module: nn.Conv2d, x: Tensor) -> Tensor:
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            # padding="same"/"valid" or a non-zero padding mode: pad exactly as Conv2d does.
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        else:
            ph, pw = module.padding
            x = F.pad(x, (pw, pw, ph, ph))
        return x.permute(0, 2, 3, 1).contiguous()

    def _offset_major_patches(self, module: nn.Conv2d, padded: Tensor) -> Tensor:
        """``[B, H_out*W_out, kh*kw*c_in]`` patches, feature ``k * c_in + c``, from channels-last input."""
        (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
        h_out = (padded.shape[1] - dh * (kh - 1) - 1) // sh + 1
        w_out = (padded.shape[2] - dw * (kw - 1) - 1) // sw + 1
        rows = [slice(i * dh, i * dh + sh * (h_out - 1) + 1, sh) for i in range(kh)]
        cols = [slice(j * dw, j * dw + sw * (w_out - 1) + 1, sw) for j in range(kw)]
        views = [padded[:, r, c] for r in rows for c in cols]
        return torch.cat(views, dim=-1).reshape(padded.shape[0], h_out * w_out, -1)

    def _weight_order(self, module: nn.Conv2d) -> Tensor:
        """Index ``perm`` with ``weight_order_feature = offset_major_feature[perm]``."""
        offsets = module.kernel_size[0] * module.kernel_size[1]
        channel = torch.arange(module.in_channels).repeat_interleave(offsets)
        offset = torch.arange(offsets).repeat(module.in_channels)
        return offset * module.in_channels + channel

    def inputs(self, module: nn.Conv2d, x: Tensor) -> Tensor:
        """Unfolded patches ``[B, H_out*W_out, c_in*kh*kw]``, in the order of ``W.flatten(1)``."""
        patches = self._offset_major_patches(module, self._padded_channels_last(module, x))
        return patches[..., self._weight_order(module).to(patches.device)]

    def input_second_moment(self, module: nn.Conv2d, x: Tensor) -> Tensor:
        """``Σ_{b,t} a a^T`` (bias-augmented), computed in chunks of examples of about 4 MiB of patches.

        Chunking keeps each patch block in cache between the copy that makes it and the product that
        uses it; the result is permuted from offset-major to weight order at the end.
        """
        padded = self._padded_channels_last(module, x)
        has_bias = self.has_bias(module)
        total = None
        chunk = _examples_per_chunk(padded[:1], module)
        for start in range(0, padded.shape[0], chunk):
            patches = self._offset_major_patches(module, padded[start : start + chunk])
            moment = second_moment(patches, has_bias)
            total = moment if total is None else total.add_(moment)
        order = self._weight_order(module).to(total.device)
        if has_bias:
            order = torch.cat([order, order.new_tensor([len(order)])])
        return total[order][:, order]

    def output_grads(self, module: nn.Conv2d, grad_output: Tensor) -> Tensor:
        """``g`` as ``[B, H_out*W_out, c_out]``."""
        return grad_output.flatten(2).transpose(1, 2)

    def weight_shape(self, module: nn.Conv2d) -> tuple[int, ...]:
        return tuple(module.weight.shape)

    def has_bias(self, module: nn.Conv2d) -> bool:
        return module.bias is not None

    def supports(self, module: nn.Module) -> str | None:
        if module.groups != 1:
            return f"groups={module.groups} (only groups=1 is supported)"
        return None


CHUNK_BYTES = 4 * 2**20


def _examples_per_chunk(one_example: Tensor, module: nn.Conv2d) -> int:
    """How many examples' patches fit in :data:`CHUNK_BYTES` (at least one)."""
    kh, kw = module.kernel_size
    per_example = one_example.numel() * kh * kw * one_example.element_size()
    return max(1, CHUNK_BYTES // max(per_example, 1))


LayerAdapter = LinearAdapter | Conv2dAdapter

_ADAPTERS: dict[type[nn.Module], LayerAdapter] = {
    nn.Linear: LinearAdapter(),
    nn.Conv2d: Conv2dAdapter(),
}


def adapter_for(module: nn.Module) -> LayerAdapter | None:
    """The adapter of a module's type (exact type or a subclass), or ``None`` if it has no factors."""
    for module_class, adapter in _ADAPTERS.items():
        if isinstance(module, module_class):
            return adapter
    return None


def augment(a: Tensor) -> Tensor:
    """``a`` with a trailing 1 appended on its last axis: the input of the bias column of ``W``."""
    return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)


def weight_matrix(module: nn.Module, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The ``(m, n[+1])`` matrix ``W`` of design.md from a layer's weight (and bias) tensors."""
    matrix = weight.reshape(weight.shape[0], -1)
    if bias is not None:
        matrix = torch.cat([matrix, bias.reshape(-1, 1)], dim=1)
    return matrix


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


def output_second_moment(g: Tensor) -> Tensor:
    """``sum_b (1/T) sum_t g_bt g_bt^T`` over a batch in normal form (eq. 15's ``1/|I|``).

    When ``g`` is the transposed view of a contiguous ``[B, m, T]`` gradient (a convolution), the
    per-example products are batched matrix products on that layout, which avoids a transposed copy.
    """
    num_locations = g.shape[1]
    channels_first = g.transpose(1, 2)
    if num_locations > 1 and channels_first.is_contiguous():
        return torch.bmm(channels_first, g).sum(dim=0) / num_locations
    x = g.reshape(-1, g.shape[-1])
    return (x.T @ x) / num_locations
