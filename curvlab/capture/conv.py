"""Convolutions in normal form (seed eq. 15; Grosse & Martens 2016): ``nn.Conv1d``, ``Conv2d``, ``Conv3d``.

An ``N``-d convolution with weight ``(c_out, c_in, k_1, ..., k_N)`` and ``groups == 1`` is the layer
``s_t = W a_t`` with ``W = weight.flatten(1)`` (``c_out × c_in·k_1···k_N``) at every output position
``t`` (the locations: ``L_out``, ``H_out·W_out`` or ``D_out·H_out·W_out``); ``a_t`` is the unfolded
input patch at ``t`` in the order of ``weight.flatten(1)`` (feature ``c·(k_1···k_N) + offset``, the
order of ``F.unfold`` in 2-D) and ``g_t`` the output gradient there. One adapter serves every ``N``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.capture.normal_form import second_moment, split_matrix, weight_matrix

#: Bytes of unfolded patches built at once by :meth:`ConvAdapter.input_second_moment`.
CHUNK_BYTES = 4 * 2**20

_WEIGHT_GRADIENT = {
    1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight
}


@dataclass(frozen=True)
class ConvAdapter:
    """``nn.ConvNd`` (``groups == 1``): unfolded patches, one location per output position (eq. 15).

    Patches are cut from the padded input in channels-last layout, one strided view per kernel offset
    ``k`` (row-major over the kernel dimensions), and concatenated: that gives them "offset-major"
    (feature ``k * c_in + c``), one copy and cache-friendly. :meth:`inputs` reorders them to the
    weight's order ``c * K + k`` (``K`` kernel offsets); :meth:`input_second_moment` instead permutes
    the small ``n × n`` result.
    """

    module_type: str = "Conv2d"
    dims: int = 2
    input_kind: str = "dense"

    def _padded_channels_last(self, module: nn.Module, x: Tensor) -> Tensor:
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            # padding="same"/"valid" or a non-zero padding mode: pad exactly as the module does.
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        else:
            pads = [p for size in reversed(module.padding) for p in (size, size)]
            x = F.pad(x, pads)
        return x.movedim(1, -1).contiguous()

    def _output_size(self, module: nn.Module, padded: Tensor) -> list[int]:
        size, kernel = padded.shape[1:-1], module.kernel_size
        dilation, stride = module.dilation, module.stride
        return [(size[d] - dilation[d] * (kernel[d] - 1) - 1) // stride[d] + 1 for d in range(self.dims)]

    def _offset_major_patches(self, module: nn.Module, padded: Tensor) -> Tensor:
        """``[B, T, K*c_in]`` patches, feature ``k * c_in + c``, from channels-last input."""
        out = self._output_size(module, padded)
        per_dim = [
            [
                slice(i * module.dilation[d], i * module.dilation[d] + module.stride[d] * (out[d] - 1) + 1,
                      module.stride[d])
                for i in range(module.kernel_size[d])
            ]
            for d in range(self.dims)
        ]
        views = [padded[(slice(None), *index)] for index in itertools.product(*per_dim)]
        return torch.cat(views, dim=-1).reshape(padded.shape[0], math.prod(out), -1)

    def _weight_order(self, module: nn.Module) -> Tensor:
        """Index ``perm`` with ``weight_order_feature = offset_major_feature[perm]``."""
        offsets = math.prod(module.kernel_size)
        channel = torch.arange(module.in_channels).repeat_interleave(offsets)
        offset = torch.arange(offsets).repeat(module.in_channels)
        return offset * module.in_channels + channel

    def inputs(self, module: nn.Module, x: Tensor) -> Tensor:
        """Unfolded patches ``[B, T, c_in*K]``, in the order of ``W.flatten(1)``."""
        patches = self._offset_major_patches(module, self._padded_channels_last(module, x))
        return patches[..., self._weight_order(module).to(patches.device)]

    def inputs_any_order(self, module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Offset-major patches and ``order`` with ``inputs(module, x) = patches[..., order]``: one copy
        fewer than :meth:`inputs`; a consumer permutes its small ``n × n`` matrices instead."""
        patches = self._offset_major_patches(module, self._padded_channels_last(module, x))
        return patches, self._weight_order(module).to(patches.device)

    def per_example_gradients(self, module: nn.Module, x: Tensor, grad_output: Tensor) -> Tensor:
        """``G_n = Σ_t g_nt a_nt^T`` for every example, ``[B, m, n]`` in weight order (no bias column).

        Taken from the convolution's own weight-gradient kernel, one example at a time under ``vmap``:
        no unfolded patches are built (4× faster than patches and a batched product on a 16-channel
        32×32 layer).
        """
        padding = module.padding
        if isinstance(padding, str) or module.padding_mode != "zeros":
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
            padding = 0
        shape = module.weight.shape
        kernel = _WEIGHT_GRADIENT[self.dims]

        def one(xi: Tensor, gi: Tensor) -> Tensor:
            return kernel(
                xi[None], shape, gi[None], stride=module.stride, padding=padding, dilation=module.dilation
            )

        return torch.func.vmap(one)(x, grad_output).flatten(2)

    def input_second_moment(self, module: nn.Module, x: Tensor) -> Tensor:
        """``Σ_{b,t} a a^T`` (bias-augmented), computed in chunks of examples of about 4 MiB of patches.

        Chunking keeps each patch block in cache between the copy that makes it and the product that
        uses it; the result is permuted from offset-major to weight order at the end.
        """
        padded = self._padded_channels_last(module, x)
        has_bias = self.has_bias(module)
        total = None
        per_example = padded[:1].numel() * math.prod(module.kernel_size) * padded.element_size()
        chunk = max(1, CHUNK_BYTES // max(per_example, 1))
        for start in range(0, padded.shape[0], chunk):
            patches = self._offset_major_patches(module, padded[start : start + chunk])
            moment = second_moment(patches, has_bias)
            total = moment if total is None else total.add_(moment)
        order = self._weight_order(module).to(total.device)
        if has_bias:
            order = torch.cat([order, order.new_tensor([len(order)])])
        return total[order][:, order]

    def output_grads(self, module: nn.Module, grad_output: Tensor) -> Tensor:
        """``g`` as ``[B, T, c_out]`` (a transposed view of the contiguous ``[B, c_out, T]``)."""
        return grad_output.flatten(2).transpose(1, 2)

    def weight_shape(self, module: nn.Module) -> tuple[int, ...]:
        return tuple(module.weight.shape)

    def has_bias(self, module: nn.Module) -> bool:
        return module.bias is not None

    def supports(self, module: nn.Module) -> str | None:
        """``None`` if the module is supported, else the reason it is not."""
        if module.groups != 1:
            return f"groups={module.groups} (a grouped convolution; only groups=1 has K-FAC factors here)"
        return None

    def parameters(self, module: nn.Module) -> tuple[Tensor, Tensor | None]:
        return module.weight, module.bias

    def rows(self, module: nn.Module) -> tuple[slice | None, slice | None]:
        return None, None

    def to_matrix(self, module: nn.Module, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``W = [weight.flatten(1) | bias]`` (``c_out × (c_in·K)[+1]``)."""
        return weight_matrix(module, weight, bias)

    def from_matrix(self, module: nn.Module, matrix: Tensor) -> tuple[Tensor, Tensor | None]:
        return split_matrix(matrix, module.weight.shape, module.bias is not None)


#: The 2-D adapter under its former name.
Conv2dAdapter = ConvAdapter
