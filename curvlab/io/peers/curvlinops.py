"""curvlinops' ``KFACLinearOperator`` from curvlab factors and back (docs/factors.md, "Mapping to
curvlinops").

curvlinops (``kfac_approx="expand"``, ``separate_weight_and_bias=False``, ``CrossEntropyLoss``) holds, per
layer with ``T`` locations and ``T_loss`` label locations per example (its ``num_per_example_loss_terms``),

    A_cl = (1/(N T)) Σ_n Σ_t a a^T = A / T,
    S_cl = (1/(N T_loss)) Σ_n Σ_t E[g g^T] = S T / T_loss            (reduction="mean")
    S_cl = Σ_n Σ_t E[g g^T] = N T S                                  (reduction="sum")

so ``S_cl ⊗ A_cl`` is curvlab's ``S ⊗ A`` divided by ``T_loss`` (the Fisher of the mean loss over all
loss terms) or times ``N`` (the summed loss). Both of curvlinops' vectorisations (``vec`` by columns,
``A ⊗ B``) give the same map ``W ↦ S W A`` as curvlab's. Fisher types: ``exact`` ↔ ``type-2``,
``mc`` ↔ ``mc``, ``empirical`` ↔ ``empirical``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from curvlab.errors import OptionError
from curvlab.io.peers import layer_locations

FISHER_TO_CURVLINOPS = {"exact": "type-2", "mc": "mc", "empirical": "empirical"}


def _modules(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    return {name: modules[name] for name in names}


def to_curvlinops(
    factors: Mapping[str, Any],
    model: nn.Module,
    data: Iterable[tuple[Tensor, Tensor]],
    *,
    num_examples: int | None = None,
    loss_locations: int | None = None,
    reduction: str = "mean",
    fisher_type: str | None = None,
):
    """A ``curvlinops.KFACLinearOperator`` holding ``factors`` (a FactorSet or a step's factors).

    ``data``: what the operator is told its data is (one batch is enough: it is used only for the
    layer locations and, without ``loss_locations``, the label locations per example); ``num_examples``
    defaults to the FactorSet's. The operator's parameters are the layers' weights and biases.
    """
    from curvlinops import KFACLinearOperator

    if reduction not in ("mean", "sum"):
        raise OptionError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    names = list(factors)
    data = list(data)
    if not data:
        raise OptionError("to_curvlinops needs at least one batch of data")
    x0, y0 = data[0]
    locations = layer_locations(model, x0[:1], names)
    if loss_locations is None:
        loss_locations = int(y0[0].numel())
    n = num_examples if num_examples is not None else getattr(factors, "num_examples", None)
    if not n:
        raise OptionError("to_curvlinops needs the number of examples the factors came from (num_examples=)")
    fisher = fisher_type or getattr(factors, "fisher_type", None) or "mc"
    if fisher not in FISHER_TO_CURVLINOPS:
        raise OptionError(f"Fisher type {fisher!r} has no curvlinops counterpart")
    modules = _modules(model, names)
    params = []
    for module in modules.values():
        params += [module.weight] + ([module.bias] if module.bias is not None else [])
    op = KFACLinearOperator(
        model,
        nn.CrossEntropyLoss(reduction=reduction),
        params,
        data,
        fisher_type=FISHER_TO_CURVLINOPS[fisher],
        kfac_approx="expand",
        separate_weight_and_bias=False,
        num_data=int(n),
        num_per_example_loss_terms=int(loss_locations),
        check_deterministic=False,
    )
    dtype = params[0].dtype
    for name in names:
        T = locations[name]
        A = torch.as_tensor(np.asarray(factors[name].A), dtype=dtype)
        S = torch.as_tensor(np.asarray(factors[name].S), dtype=dtype)
        if A.dim() != 2 or S.dim() != 2:
            raise OptionError(f"layer {name}: curvlinops needs dense factors")
        op._input_covariances[name] = A / T
        op._gradient_covariances[name] = S * T / loss_locations if reduction == "mean" else S * (int(n) * T)
    return op


def from_curvlinops(op: Any, model: nn.Module, example_input: Tensor):
    """The factors of a ``curvlinops.KFACLinearOperator`` (computed if it has none yet) as a FactorSet."""
    from curvlab.capture.factors import FactorSet, layer_factors, select_layers

    if getattr(op, "_separate_weight_and_bias", False):
        raise OptionError(
            "curvlinops operator with separate_weight_and_bias=True: weight and bias factors "
            "are separate there; build it with separate_weight_and_bias=False"
        )
    if str(op._kfac_approx) not in ("expand", "KFACType.EXPAND"):
        raise OptionError(
            f"curvlinops operator with kfac_approx={op._kfac_approx}: only 'expand' maps onto "
            "curvlab's factors"
        )
    fisher = {v: k for k, v in FISHER_TO_CURVLINOPS.items()}.get(
        str(getattr(op._fisher_type, "value", op._fisher_type))
    )
    if fisher is None:
        raise OptionError(f"curvlinops Fisher type {op._fisher_type} has no curvlab counterpart")
    if not (op._input_covariances or op._gradient_covariances):
        op.compute_kronecker_factors()
    names = list(op._mapping)
    locations = layer_locations(model, example_input[:1], names)
    selected = select_layers(model, None)
    n, t_loss, reduction = int(op._N_data), int(op._num_per_example_loss_terms), op._loss_func.reduction
    layers = {}
    for name in names:
        T = locations[name]
        A = op._input_covariances[name].detach().double() * T
        S_cl = op._gradient_covariances[name].detach().double()
        S = S_cl * t_loss / T if reduction == "mean" else S_cl / (n * T)
        A, S = ((X + X.T) / 2 for X in (A, S))
        source, adapter = selected[name]
        layers[name] = layer_factors(source, adapter, A.cpu().numpy(), S.cpu().numpy())
    attrs = {"source": "curvlinops"}
    if fisher == "mc":
        attrs["mc_samples"] = int(op._mc_samples)
    return FactorSet(layers, fisher_type=fisher, num_examples=n, attrs=attrs)
