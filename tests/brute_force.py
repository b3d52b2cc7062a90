"""Brute-force references for the tests of the layer coverage: torch.func per-example gradients and
dense Fisher (= GGN) matrices of tiny float64 models, computed through the models' own forward passes
(PyTorch's ``nn.MultiheadAttention.forward``, not curvlab's visible forward; no hooks at all).

* :func:`per_example_grads` — ``∇_θ L_n`` of the per-example loss (cross-entropy summed over the
  example's label locations), every Parameter, by ``vmap(grad)``;
* :func:`dense_fisher` — ``F = (1/N) Σ_n J_n^T H_n J_n`` over all Parameters (flattened in
  ``named_parameters`` order), ``J_n`` by ``jacrev``, ``H_n`` the softmax cross-entropy Hessian,
  block diagonal over locations;
* :func:`entry_gradients` — an entry's per-example ``m × n`` matrices ``G_n`` from those gradients,
  through the entry's adapter (``to_matrix``: which rows of which Parameter, bias last);
* :func:`entry_direction` — a direction matrix of an entry as a flat vector over all Parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from curvlab.analysis.curvature import parameter_tangents


def softmax_hessian(z: Tensor) -> Tensor:
    """``diag(p) - p p^T`` of softmax cross-entropy at logits ``z`` (one location)."""
    p = torch.softmax(z, dim=-1)
    return torch.diag(p) - torch.outer(p, p)


def _loss(model: nn.Module):
    def loss(params, xi, yi):
        logits = functional_call(model, params, (xi.unsqueeze(0),))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yi.reshape(-1), reduction="sum")

    return loss


def per_example_grads(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """``{parameter name: [N, *shape]}``: per-example gradients of the summed cross-entropy."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    return vmap(grad(_loss(model)), in_dims=(None, 0, 0))(params, x, y)


def dense_fisher(model: nn.Module, x: Tensor) -> Tensor:
    """The true Fisher (= GGN) of the mean per-example loss over all Parameters, ``P × P``."""
    names = [k for k, _ in model.named_parameters()]
    params = {k: v.detach() for k, v in model.named_parameters()}
    total = None
    for xi in x:
        def logits_of(p, xi=xi):
            return functional_call(model, p, (xi.unsqueeze(0),)).reshape(-1)

        logits = logits_of(params).detach()
        jac = jacrev(logits_of)(params)
        J = torch.cat([jac[k].reshape(logits.numel(), -1) for k in names], dim=1)
        classes = functional_call(model, params, (xi.unsqueeze(0),)).shape[-1]
        H = torch.block_diag(*[softmax_hessian(z) for z in logits.reshape(-1, classes)])
        term = J.T @ H @ J
        total = term if total is None else total + term
    return total / len(x)


def entry_gradients(grads: dict[str, Tensor], model: nn.Module, source, adapter) -> Tensor:
    """``G_n`` of one entry for every example, ``[N, m, n]`` (the adapter's ``to_matrix`` layout)."""
    name_of = {id(p): k for k, p in model.named_parameters()}
    weight, bias = adapter.parameters(source)
    w = grads[name_of[id(weight)]]
    b = None if bias is None else grads[name_of[id(bias)]]
    return torch.stack(
        [adapter.to_matrix(source, w[n], None if b is None else b[n]) for n in range(len(w))]
    )


def entry_direction(model: nn.Module, source, adapter, matrix: Tensor) -> Tensor:
    """The flat vector over all Parameters that direction ``matrix`` of an entry moves."""
    tangents = {id(p): t for p, t in parameter_tangents(source, adapter, matrix)}
    return torch.cat(
        [tangents.get(id(p), torch.zeros_like(p)).reshape(-1) for _, p in model.named_parameters()]
    )


def dense_basis_A(basis) -> Tensor:  # noqa: N802 (the math name)
    """``Q_A`` as a dense ``n × n`` matrix (block diagonal for a blocks basis)."""
    return torch.block_diag(*basis.Q_A) if basis.Q_A.dim() == 3 else basis.Q_A
