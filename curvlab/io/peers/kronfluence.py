"""kronfluence's factor files from curvlab factors and back (docs/factors.md, "Mapping to kronfluence").

kronfluence keeps, in one folder (``<output_dir>/<analysis>/factors_<name>/``), one safetensors file per
statistic, each mapping module names to tensors:

* ``activation_covariance``, ``gradient_covariance``: the **sums** ``Σ_{n,t} a a^T`` (bias-augmented) and
  ``Σ_{n,t} g g^T`` over all examples and locations; ``num_activation_covariance_processed``,
  ``num_gradient_covariance_processed``: their counts ``N T`` (int64, shape ``(1,)``);
* ``activation_eigenvectors``/``_eigenvalues``, ``gradient_eigenvectors``/``_eigenvalues``: of the
  normalised covariances ``sum / count``, i.e. of ``A / T`` and ``S``;
* ``lambda_matrix`` (``m × n``) and ``num_lambda_processed`` (``N``): ``Σ_n (Q_S^T G_n Q_A)²`` in that
  basis — EKFAC's second moments times ``N``.

In curvlab's terms (``A = (1/N) Σ_n Σ_t a a^T``, ``S = (1/N) Σ_n (1/T) Σ_t g g^T``): activation sum
``= N A``, gradient sum ``= N T S``, counts ``N T``, lambda ``= N Λ``. kronfluence's K-FAC is thus
``S ⊗ (A / T)``: it counts every location as an example on both sides. Files are read with
safetensors (no pickle); every tensor's shape and dtype is checked from the header before it is read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from curvlab.errors import CheckpointError, OptionError
from curvlab.io.peers import layer_locations
from curvlab.limits import check_regular_file

COVARIANCE = (
    "activation_covariance",
    "gradient_covariance",
    "num_activation_covariance_processed",
    "num_gradient_covariance_processed",
)
EIGEN = ("activation_eigenvectors", "activation_eigenvalues", "gradient_eigenvectors", "gradient_eigenvalues")
LAMBDA = ("lambda_matrix", "num_lambda_processed")


def save_kronfluence(
    factors: Mapping[str, Any],
    model: nn.Module,
    example_input: Tensor,
    folder: str | os.PathLike,
    *,
    num_examples: int | None = None,
    ekfac: Any = None,
) -> list[str]:
    """Write ``factors`` as kronfluence's covariance and eigendecomposition files into ``folder``; with
    ``ekfac`` (an :class:`~curvlab.analysis.operators.EKFACOperator` of the same layers) also the lambda
    files, in EKFAC's basis. Returns the files written (each written atomically)."""
    from safetensors.torch import save_file

    from curvlab.analysis.operators import FactorBasis
    from curvlab.io.atomic import atomic_output

    names = list(factors)
    n = num_examples if num_examples is not None else getattr(factors, "num_examples", None)
    if not n:
        raise OptionError(
            "save_kronfluence needs the number of examples the factors came from (num_examples=)"
        )
    locations = layer_locations(model, example_input[:1], names)
    out: dict[str, dict[str, Tensor]] = {key: {} for key in (*COVARIANCE, *EIGEN, *LAMBDA)}
    for name in names:
        T = locations[name]
        A = torch.as_tensor(np.asarray(factors[name].A), dtype=torch.float64)
        S = torch.as_tensor(np.asarray(factors[name].S), dtype=torch.float64)
        if A.dim() != 2 or S.dim() != 2:
            raise OptionError(f"layer {name}: kronfluence needs dense factors")
        out["activation_covariance"][name] = (A * n).contiguous()
        out["gradient_covariance"][name] = (S * (n * T)).contiguous()
        count = torch.tensor([n * T], dtype=torch.int64)
        out["num_activation_covariance_processed"][name] = count
        out["num_gradient_covariance_processed"][name] = count.clone()
        if ekfac is not None:
            bs, ba = ekfac.bases()[name]
            if bs.q is None or ba.q is None:
                raise OptionError(f"layer {name}: kronfluence needs dense eigenvectors")
            s_basis = FactorBasis(bs.values.double(), q=bs.q.double())
            a_basis = FactorBasis(ba.values.double() / T, q=ba.q.double())
            out["lambda_matrix"][name] = (ekfac.kfe_eigenvalues(name).double().cpu() * n).contiguous()
            out["num_lambda_processed"][name] = torch.tensor([n], dtype=torch.int64)
        else:
            s_basis = FactorBasis.of(S, dtype=torch.float64, device=torch.device("cpu"))
            a_basis = FactorBasis.of(A / T, dtype=torch.float64, device=torch.device("cpu"))
        out["gradient_eigenvectors"][name] = s_basis.q.contiguous()
        out["gradient_eigenvalues"][name] = s_basis.values.contiguous()
        out["activation_eigenvectors"][name] = a_basis.q.contiguous()
        out["activation_eigenvalues"][name] = a_basis.values.contiguous()
    os.makedirs(folder, exist_ok=True)
    written = []
    for key, tensors in out.items():
        if not tensors:
            continue
        path = os.path.join(os.fspath(folder), f"{key}.safetensors")
        with atomic_output(path) as tmp:
            save_file(tensors, tmp, metadata={"writer": "curvlab"})
        written.append(path)
    return written


def _read(
    folder: str, key: str, expected: Mapping[str, tuple[int, ...]], required: bool = True
) -> dict | None:
    """The tensors of ``<folder>/<key>.safetensors`` for the expected modules, shapes checked first."""
    from safetensors import safe_open

    path = os.path.join(folder, f"{key}.safetensors")
    if not os.path.lexists(path):
        if required:
            raise CheckpointError(f"{path}: missing (not a kronfluence factors folder?)")
        return None
    check_regular_file(path, CheckpointError, "safetensors file")  # a pipe would block the open
    out = {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            keys = set(f.keys())
            for name, shape in expected.items():
                if name not in keys:
                    raise CheckpointError(f"{path}: layer {name}: missing")
                got = tuple(f.get_slice(name).get_shape())
                if got != shape:
                    raise CheckpointError(f"{path}: layer {name}: shape {got}, expected {shape}")
                tensor = f.get_tensor(name)
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    raise CheckpointError(f"{path}: layer {name}: non-finite values")
                out[name] = tensor
    except CheckpointError:
        raise
    except Exception as exc:  # a damaged or foreign file: safetensors raises its own errors
        raise CheckpointError(f"{path}: cannot read ({' '.join(str(exc).split())})") from None
    return out


def load_kronfluence(
    folder: str | os.PathLike,
    model: nn.Module,
    example_input: Tensor,
    *,
    layers: list[str] | None = None,
    fisher_type: str = "mc",
) -> tuple[Any, Any]:
    """``(FactorSet, EKFACOperator or None)`` from a kronfluence factors folder.

    ``layers``: the module names to read (default: every Linear/Conv2d the model has factors for).
    ``fisher_type``: what kronfluence's training loss sampled (``mc`` for its default
    ``compute_train_loss(sample=True)``; ``empirical`` with ``use_empirical_fisher``).
    """
    import warnings

    from curvlab.analysis.layout import ParameterLayout
    from curvlab.analysis.operators import EKFACOperator, FactorBasis
    from curvlab.capture.factors import FactorSet, layer_factors, select_layers

    folder = os.fspath(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        selected = select_layers(model)
    names = layers or [n for n, (_, a) in selected.items() if a.module_type in ("Linear", "Conv2d")]
    locations = layer_locations(model, example_input[:1], names)
    sizes = {}
    for name in names:
        source, adapter = selected[name]
        weight, bias = adapter.parameters(source)
        sizes[name] = tuple(
            adapter.to_matrix(source, weight.detach(), None if bias is None else bias.detach()).shape
        )
    cov = {
        key: _read(
            folder,
            key,
            {
                n: ((sizes[n][1],) * 2 if key.startswith("activation") else (sizes[n][0],) * 2)
                if not key.startswith("num")
                else (1,)
                for n in names
            },
        )
        for key in COVARIANCE
    }
    layer_records, num = {}, set()
    for name in names:
        T = locations[name]
        count_a, count_g = int(cov[COVARIANCE[2]][name][0]), int(cov[COVARIANCE[3]][name][0])
        if count_a <= 0 or count_g <= 0 or count_a % T:
            raise CheckpointError(
                f"{folder}: layer {name}: counts {count_a}, {count_g} do not fit {T} locations"
            )
        A = cov["activation_covariance"][name].double() * T / count_a
        S = cov["gradient_covariance"][name].double() / count_g
        A, S = ((X + X.T) / 2 for X in (A, S))
        source, adapter = selected[name]
        layer_records[name] = layer_factors(source, adapter, A.numpy(), S.numpy())
        num.add(count_a // T)
    if len(num) != 1:
        raise CheckpointError(
            f"{folder}: the layers were estimated from different numbers of examples {sorted(num)}"
        )
    factor_set = FactorSet(
        layer_records, fisher_type=fisher_type, num_examples=num.pop(), attrs={"source": "kronfluence"}
    )
    lam = _read(folder, "lambda_matrix", {n: sizes[n] for n in names}, required=False)
    if lam is None:
        return factor_set, None
    counts = _read(folder, "num_lambda_processed", {n: (1,) for n in names})
    eig = {
        key: _read(
            folder,
            key,
            {
                n: ((sizes[n][1],) * (2 if "vectors" in key else 1))
                if key.startswith("activation")
                else ((sizes[n][0],) * (2 if "vectors" in key else 1))
                for n in names
            },
        )
        for key in EIGEN
    }
    bases, values = {}, {}
    for name in names:
        bases[name] = (
            FactorBasis(
                eig["gradient_eigenvalues"][name].double(), q=eig["gradient_eigenvectors"][name].double()
            ),
            FactorBasis(
                eig["activation_eigenvalues"][name].double() * locations[name],
                q=eig["activation_eigenvectors"][name].double(),
            ),
        )
        values[name] = lam[name].double() / int(counts[name][0])
    layout = ParameterLayout.from_factors(layer_records)
    return factor_set, EKFACOperator(layout, bases, values)
