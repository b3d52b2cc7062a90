"""Curvature along chosen weight directions: ``v^T F v`` from Jacobian-vector products.

For softmax cross-entropy the true Fisher equals the generalised Gauss-Newton matrix,
``F = (1/N) Σ_n J_n^T H_n J_n`` with ``J_n`` the Jacobian of example ``n``'s logits w.r.t. the
parameters and ``H_n = diag(p_n) − p_n p_n^T`` the Hessian of the loss at the logits (summed over the
example's locations). A Fisher/GGN-vector product (Schraudolph 2002) is ``J^T H J v`` — a jvp and a
vjp — but the quadratic form needs only the forward half:

    v^T F v = (1/N) Σ_n u_n^T H_n u_n = (1/N) Σ_n [Σ_c p_c u_c² − (Σ_c p_c u_c)²],   u_n = J_n v,

one forward-mode pass (``torch.func.jvp``) per direction and batch, with no backward pass at all.
Directions are weight perturbations of one layer, given as the ``m × n`` matrix of design.md (bias as
the last column); :func:`split_weight_matrix` turns one into the layer's parameter tangents.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp


def split_weight_matrix(module: nn.Module, matrix: Tensor) -> dict[str, Tensor]:
    """The ``weight`` (and ``bias``) tangents of a Linear/Conv2d layer from an ``m × n`` matrix."""
    tangents = {"weight": matrix[:, : module.weight[0].numel()].reshape(module.weight.shape)}
    if getattr(module, "bias", None) is not None:
        tangents["bias"] = matrix[:, -1].reshape(module.bias.shape)
    return tangents


def quadratic_form_at_logits(logits: Tensor, u: Tensor) -> Tensor:
    """``Σ_locations u^T (diag(p) − p p^T) u``, per example (logits ``(B, ..., C)``)."""
    p = torch.softmax(logits, dim=-1)
    per_location = (p * u * u).sum(-1) - (p * u).sum(-1) ** 2
    return per_location.reshape(per_location.shape[0], -1).sum(-1)


def directional_curvature(
    model: nn.Module,
    layer: str,
    directions: Sequence[Tensor],
    batches: Iterable[tuple[Tensor, Tensor]],
) -> Tensor:
    """``v^T F v`` of the true Fisher (= GGN) for each ``m × n`` direction of ``layer`` (float64)."""
    module = model.get_submodule(layer)
    device = next(model.parameters()).device
    names = {key: f"{layer}.{key}" for key in ("weight", "bias") if getattr(module, key, None) is not None}
    params = {k: v.detach() for k, v in model.named_parameters()}
    primals = tuple(params[full] for full in names.values())
    tangents = [
        tuple(split_weight_matrix(module, d.to(device=device, dtype=primals[0].dtype))[k] for k in names)
        for d in directions
    ]
    totals = torch.zeros(len(directions), dtype=torch.float64, device=device)
    count = 0
    for inputs, _ in batches:
        inputs = inputs.to(device)

        def logits_of(*layer_params: Tensor, inputs: Tensor = inputs) -> Tensor:
            replaced = dict(params, **dict(zip(names.values(), layer_params, strict=True)))
            return functional_call(model, replaced, (inputs,))

        for k, tangent in enumerate(tangents):
            logits, u = jvp(logits_of, primals, tangent)
            totals[k] += quadratic_form_at_logits(logits.double(), u.double()).sum()
        count += inputs.shape[0]
    return totals / count
