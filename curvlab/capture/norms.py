"""The affine parameters of normalisation layers: exact per-channel Fisher blocks (``NormAffine``).

``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``, ``nn.InstanceNorm*d`` (affine) and ``nn.BatchNorm*d``
in eval mode compute ``y_ct = γ_c x̂_ct + β_c`` for every channel ``c`` at every location ``t``, with
``x̂`` the normalised input (statistics of the example itself, or the running statistics of batch norm
in eval mode: no coupling between examples). The per-example gradient of channel ``c``'s parameters
``θ_c = (γ_c, β_c)`` is

    r_nc = Σ_t g_nct [x̂_nct, 1]^T        (g = dL_n/dy, the output gradient)

and the entry stores the exact Fisher block of every channel, a ``k × k`` matrix (``k = 2``, or 1
without a shift ``β``: RMSNorm, ``LayerNorm(bias=False)``)::

    F_c = (1/N) Σ_n E_u[r_nc r_nc^T]                     (E_u over the Fisher type's samples)

— the Fisher restricted to ``θ_c``, with nothing approximated beyond dropping the couplings between
channels (and between layers). In the factor format it is the entry ``F = S ⊗ A`` with ``S = [1]``
(one output, a diagonal of length 1) and ``A`` the block-diagonal ``diag(F_1, ..., F_C)``, stored as
its ``(C, k, k)`` blocks (``A_kind = "blocks"``). As a matrix ``W`` (design.md) the entry is one row
``(1 × C·k)``: ``[γ_1, β_1, γ_2, β_2, ...]`` (channel-major, scale before shift), ``C`` the number of
entries of ``γ`` (``normalized_shape`` for LayerNorm, ``num_channels``/``num_features`` otherwise).

Batch norm in training mode (or without running statistics) normalises with the statistics of the
batch, which couple the examples: per-example gradients, and so Fisher blocks, are not defined. Factor
capture refuses it with a one-line error; the K-FAC optimizer leaves its parameters to plain gradient
steps (docs/kfac.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from curvlab.errors import LayerError

NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, _BatchNorm, _InstanceNorm)


def _shift(module: nn.Module) -> Tensor | None:
    """``β`` (``None`` without one: RMSNorm has no ``bias`` attribute at all)."""
    return getattr(module, "bias", None)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES)


def batch_coupled(module: nn.Module) -> str | None:
    """Why ``module`` normalises with batch statistics now (``None``: it does not)."""
    if isinstance(module, _BatchNorm):
        if module.training:
            return f"{type(module).__name__} in training mode (its batch statistics couple the examples)"
        if not module.track_running_stats or module.running_mean is None:
            return f"{type(module).__name__} without running statistics (normalises with batch statistics)"
    return None


@dataclass(frozen=True)
class NormAdapter:
    """The ``(γ, β)`` of a normalisation layer: per-channel ``k × k`` Fisher blocks (module docstring)."""

    module_type: str = "NormAffine"
    input_kind: str = "blocks"
    output_kind: str = "diagonal"

    @staticmethod
    def _channels_last(module: nn.Module) -> bool:
        return isinstance(module, (nn.LayerNorm, nn.RMSNorm))

    def channels(self, module: nn.Module) -> int:
        return module.weight.numel()

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        """``x̂``: the input normalised exactly as the module does, without its affine parameters."""
        if isinstance(module, nn.LayerNorm):
            return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
        if isinstance(module, nn.RMSNorm):
            return F.rms_norm(x, module.normalized_shape, None, module.eps)
        if isinstance(module, nn.GroupNorm):
            return F.group_norm(x, module.num_groups, None, None, module.eps)
        if isinstance(module, _InstanceNorm):
            own = module.training or not module.track_running_stats
            stats = (None, None) if own else (module.running_mean, module.running_var)
            return F.instance_norm(x, *stats, None, None, own, 0.0, module.eps)
        reason = batch_coupled(module)
        if reason is not None:
            raise LayerError(reason)
        return F.batch_norm(x, module.running_mean, module.running_var, None, None, False, 0.0, module.eps)

    def normal_form(self, module: nn.Module, t: Tensor) -> Tensor:
        """An input-shaped tensor as ``[B, T, C]`` (channels last, every other dimension a location)."""
        if self._channels_last(module):
            return t.reshape(t.shape[0], -1, self.channels(module))
        return t.reshape(t.shape[0], t.shape[1], -1).transpose(1, 2)

    def inputs(self, module: nn.Module, x: Tensor) -> Tensor:
        """``x̂`` in normal form ``[B, T, C]``."""
        return self.normal_form(module, self.normalized(module, x))

    def output_grads(self, module: nn.Module, grad_output: Tensor) -> Tensor:
        """``g`` in normal form ``[B, T, C]``."""
        return self.normal_form(module, grad_output)

    def check_output(self, module: nn.Module, x_hat: Tensor, output: Tensor, name: str) -> None:
        """:class:`LayerError` unless ``output = γ x̂ + β`` (in normal form) to the precision of its dtype:
        a subclass with its own forward (e.g. ghost batch statistics in training mode) is caught here."""
        gamma = module.weight.detach().reshape(-1)
        expected = x_hat * gamma
        if _shift(module) is not None:
            expected = expected + _shift(module).detach().reshape(-1)
        actual = self.normal_form(module, output.detach())
        scale = max(1.0, float(actual.abs().max())) if actual.numel() else 1.0
        tol = math.sqrt(torch.finfo(actual.dtype).eps) * scale
        if actual.shape != expected.shape or float((actual - expected).abs().max()) > tol:
            raise LayerError(
                f"layer {name}: the output of {type(module).__name__} is not weight * normalise(input) + "
                "bias as PyTorch's normalisation computes it (a forward of its own?): no Fisher block"
            )

    def terms(self, module: nn.Module, x_hat: Tensor, g: Tensor) -> Tensor:
        """``r_nc = Σ_t g_nct [x̂_nct, 1]``, ``[B, C, k]`` (``k = 1`` without a shift)."""
        scale = (g * x_hat).sum(dim=1)
        if _shift(module) is None:
            return scale.unsqueeze(-1)
        return torch.stack([scale, g.sum(dim=1)], dim=-1)

    def per_example_gradients(self, module: nn.Module, x: Tensor, grad_output: Tensor) -> Tensor:
        """``G_n`` as the ``1 × C·k`` matrix of the entry, ``[B, 1, C·k]``."""
        r = self.terms(module, self.inputs(module, x), self.output_grads(module, grad_output))
        return r.reshape(r.shape[0], 1, -1)

    @staticmethod
    def block_moment(r: Tensor) -> Tensor:
        """``Σ_n r_nc r_nc^T`` for every channel, ``[C, k, k]``."""
        return torch.einsum("nci,ncj->cij", r, r)

    def weight_shape(self, module: nn.Module) -> tuple[int, ...]:
        return tuple(module.weight.shape)

    def has_bias(self, module: nn.Module) -> bool:
        return _shift(module) is not None

    def supports(self, module: nn.Module) -> str | None:
        weight = dict(module.named_parameters(recurse=False)).get("weight")
        if weight is None:
            return "no affine weight Parameter (a parametrization?)"
        bias = dict(module.named_parameters(recurse=False)).get("bias")
        if bias is not None and bias.shape != weight.shape:
            return f"bias of shape {tuple(bias.shape)} does not match weight {tuple(weight.shape)}"
        return None

    def parameters(self, module: nn.Module) -> tuple[Tensor, Tensor | None]:
        return module.weight, _shift(module)

    def rows(self, module: nn.Module) -> tuple[slice | None, slice | None]:
        return None, None

    def to_matrix(self, module: nn.Module, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``W = [γ_1, β_1, γ_2, β_2, ...]`` as a ``1 × C·k`` matrix (a missing bias gradient is zero)."""
        columns = [weight.reshape(-1)]
        if _shift(module) is not None:
            columns.append(torch.zeros_like(weight).reshape(-1) if bias is None else bias.reshape(-1))
        return torch.stack(columns, dim=1).reshape(1, -1)

    def from_matrix(self, module: nn.Module, matrix: Tensor) -> tuple[Tensor, Tensor | None]:
        k = 2 if _shift(module) is not None else 1
        blocks = matrix.reshape(-1, k)
        shape = module.weight.shape
        return blocks[:, 0].reshape(shape), (blocks[:, 1].reshape(shape) if k == 2 else None)
