"""The task object (curvlab/capture/task.py): tuple/dict inputs, dict/dataclass outputs and DataLoader
batches give exactly the numbers of the plain ``(tensor, tensor)`` model, in factor capture, gradcov,
the jvp curvature and K-FAC; K-FAC's step with every loss equals the dense damped natural gradient.

Same weights, same arithmetic: the results agree to rounding (float64, rtol 1e-12), except K-FAC against
its dense reference, which is a different algorithm for the same numbers (rtol 1e-8 as in test_kfac).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvlab.analysis.curvature import directional_curvature
from curvlab.analysis.gradcov import LayerBasis, project_gradients
from curvlab.capture.factors import CoverageWarning, collect_factors
from curvlab.capture.loss import BinaryCrossEntropy, CrossEntropy, MeanSquaredError
from curvlab.capture.task import Task
from curvlab.errors import DataError, ModelError
from curvlab.optim.kfac import KFAC

RTOL = 1e-12


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


class DictModel(nn.Module):
    """``model(features=x, shift=s)`` -> ``{"logits": ..., "hidden": ...}``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.net = _net(seed)

    def forward(self, features, shift):
        return {"hidden": features, "logits": self.net(features + shift)}


@dataclass
class Output:
    logits: torch.Tensor
    aux: torch.Tensor


class TupleModel(nn.Module):
    """``model(a, b)`` on the two halves of the features -> a dataclass with ``.logits``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.net = _net(seed)

    def forward(self, a, b):
        return Output(logits=self.net(torch.cat([a, b], dim=-1)), aux=a)


def _data(n: int = 10):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def _batches(kind: str, x, y, size: int = 4):
    out = []
    for start in range(0, len(x), size):
        xb, yb = x[start : start + size], y[start : start + size]
        if kind == "plain":
            out.append((xb, yb))
        elif kind == "dict":
            out.append(({"features": xb, "shift": torch.zeros(())}, yb))
        elif kind == "dict_batch":
            out.append({"features": xb, "shift": torch.zeros(()), "labels": yb})
        else:
            out.append(((xb[:, :2], xb[:, 2:]), yb))
    return out


def _model(kind: str) -> nn.Module:
    return {"plain": _net, "dict": DictModel, "dict_batch": DictModel, "tuple": TupleModel}[kind]()


def _same(a, b, prefix: str) -> None:
    assert len(a) == len(b)
    for name in a:
        for key in ("A", "S"):
            np.testing.assert_allclose(getattr(b[prefix + name], key), getattr(a[name], key), rtol=RTOL,
                                       atol=0)


@pytest.mark.parametrize("kind", ["dict", "dict_batch", "tuple"])
@pytest.mark.parametrize("fisher", ["mc", "exact"])
def test_tuple_and_dict_inputs_and_outputs_through_collect_factors(kind, fisher):
    x, y = _data()
    plain = collect_factors(_net(), _batches("plain", x, y), fisher=fisher, seed=3)
    other = collect_factors(_model(kind), _batches(kind, x, y), fisher=fisher, seed=3)
    _same(plain, other, "net.")
    assert other.num_examples == plain.num_examples == len(x)


def test_a_dataloader_of_a_tensor_dataset_with_the_default_task():
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    for fisher in ("mc", "empirical"):
        expected = collect_factors(_net(), _batches("plain", x, y), fisher=fisher, seed=5)
        got = collect_factors(_net(), loader, fisher=fisher, seed=5, task=Task())
        _same(expected, got, "")


@pytest.mark.parametrize("kind", ["dict", "tuple"])
def test_gradcov_and_jvp_curvature_through_the_task(kind):
    x, y = _data()
    factors = collect_factors(_net(), _batches("plain", x, y), fisher="exact")
    bases = {name: LayerBasis.from_factors(f.S, f.A) for name, f in factors.items()}
    plain = project_gradients(_net(), _batches("plain", x, y), bases, curvature="exact")
    other = project_gradients(_model(kind), _batches(kind, x, y), {f"net.{k}": v for k, v in bases.items()},
                              curvature="exact")
    for name, stats in plain.items():
        for key in ("mean", "variance", "curvature"):
            np.testing.assert_allclose(getattr(other[f"net.{name}"], key), getattr(stats, key), rtol=1e-10,
                                       atol=1e-14)
    direction = [torch.outer(bases["2"].Q_S[:, 0], bases["2"].Q_A[:, -1])]
    expected = directional_curvature(_net(), "2", direction, _batches("plain", x, y))
    got = directional_curvature(_model(kind), "net.2", direction, _batches(kind, x, y))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_a_kfac_train_step_through_the_task():
    x, y = _data(8)
    plain, other = _net(), DictModel()
    options = {"lr": 0.1, "damping": 1e-2, "fisher": "mc"}
    with KFAC(plain, **options) as a, KFAC(other, **options) as b:
        for (xp, yp), (xd, yd) in zip(_batches("plain", x, y), _batches("dict", x, y), strict=True):
            loss_a, loss_b = a.train_step(xp, yp), b.train_step(xd, yd)
            torch.testing.assert_close(loss_b, loss_a, rtol=1e-12, atol=0)
    for name, p in plain.named_parameters():
        torch.testing.assert_close(other.get_parameter(f"net.{name}"), p, rtol=1e-12, atol=1e-15)


def test_what_the_task_cannot_read_is_a_one_line_error():
    x, y = _data()

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _net()

        def forward(self, x):
            return self.net(x), x

    with pytest.raises(ModelError, match=r"batch 0: the model returned a tuple of 2: .* Task\(logits=...\)"):
        collect_factors(Pair(), [(x, y)])
    picked = collect_factors(Pair(), [(x, y)], fisher="exact", task=Task(logits=lambda out: out[0]))
    _same(collect_factors(_net(), [(x, y)], fisher="exact"), picked, "net.")
    with pytest.raises(DataError, match=r"batch 1: a batch must be a pair \(inputs, labels\) or a mapping"):
        collect_factors(_net(), [(x, y), (x, y, y)])
    with pytest.raises(DataError, match="batch 0: labels must be in"):
        collect_factors(_net(), [(x, y + 3)], fisher="empirical")


def test_move_reaches_every_tensor_and_casts_only_floats():
    @dataclass
    class Pack:
        ids: torch.Tensor
        weights: torch.Tensor
        name: str

    value = {"a": [torch.ones(2), (torch.arange(3), "text")], "b": Pack(torch.arange(2), torch.ones(2), "p")}
    moved = Task.move(value, "cpu", torch.float64)
    assert moved["a"][0].dtype == torch.float64 and moved["a"][1][0].dtype == torch.int64
    assert moved["a"][1][1] == "text" and moved["b"].weights.dtype == torch.float64
    assert moved["b"].ids.dtype == torch.int64 and moved["b"].name == "p"


def test_ignored_examples_and_a_layer_without_the_batch_first():
    """A layer whose input folds the tokens into the first dimension has no per-example rows, so it is
    set aside (the coverage names it and says why) whether or not an example is ignored: the ignored
    examples can never be left out of the wrong rows. The batch-first layer leaves them out of ``A``
    and the example count: its factors are those of the counted example alone (exact Fisher, float64:
    the same sums in the same order, so equal to rounding; 1e-14 relative)."""

    class Folding(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4).double()
            self.fold = nn.Linear(4, 4).double()

        def forward(self, x):
            h = torch.tanh(self.fc(x))
            return self.fold(h.reshape(-1, 4)).reshape(x.shape[0], x.shape[1], 4)

    torch.manual_seed(0)
    model = Folding()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    y = torch.randint(0, 4, (2, 5))
    task = Task(CrossEntropy(ignore_index=-100))
    reason = "fold: called on a tensor whose first dimension (10) is not the batch (2 examples)"
    for ignored in (False, True):
        labels = y.clone()
        if ignored:
            labels[1] = -100
        with pytest.warns(CoverageWarning, match="fold.weight"):
            factors = collect_factors(model, [(x, labels)], fisher="exact", task=task)
        assert list(factors) == ["fc"] and factors.num_examples == (1 if ignored else 2)
        skipped = {s["name"]: s["reason"] for s in factors.coverage.skipped}
        assert set(skipped) == {"fold.weight", "fold.bias"} and skipped["fold.weight"].startswith(reason)
    alone = collect_factors(model, [(x[:1], y[:1])], fisher="exact", task=task)
    for which in ("A", "S"):
        ours, ref = getattr(factors["fc"], which), getattr(alone["fc"], which)
        np.testing.assert_allclose(ours, ref, rtol=1e-14, atol=1e-14 * np.abs(ref).max())


# ------------------------------------------------------------------------------------ K-FAC per loss


def _kfac_case(name: str):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    if name == "ce_ignore":  # tokens: (B, T, 5) -> (B, T, 3)
        x = torch.randn(6, 4, 5, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (6, 4), generator=gen)
        y[0, :3] = -100
        y[4] = -100
        return _net(), x, y, CrossEntropy(ignore_index=-100, label_smoothing=0.1)
    x = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    if name == "mse":
        return _net(), x, torch.randn(8, 3, generator=gen, dtype=torch.float64), MeanSquaredError()
    return _net(), x, torch.rand(8, 3, generator=gen, dtype=torch.float64).round(), BinaryCrossEntropy()


@pytest.mark.parametrize("name", ["ce_ignore", "mse", "bce"])
def test_kfac_step_with_each_loss_is_the_dense_damped_natural_gradient(name):
    """``vec Δ = ((S̃ + √λ/π I) ⊗ (A + π√λ I))^-1 vec G`` with ``S̃ = S / T_loss``, ``T_loss`` the loss
    terms per counted example (K / N: 3 outputs for mse and bce, 17 counted tokens / 5 examples for the
    cross-entropy with ignored labels), ``G`` the gradient of torch's mean loss."""
    model, x, y, loss = _kfac_case(name)
    damping = 1e-2
    task = Task(loss)
    factors = collect_factors(model, [(x, y)], fisher="exact", task=task)
    t_loss = loss.num_terms(model(x), y) / loss.num_examples(model(x), y)
    assert t_loss == {"ce_ignore": 17 / 5, "mse": 3, "bce": 3}[name]
    model.zero_grad()
    torch_loss = {"ce_ignore": lambda z: F.cross_entropy(z.reshape(-1, 3), y.reshape(-1),
                                                         ignore_index=-100, label_smoothing=0.1),
                  "mse": lambda z: F.mse_loss(z, y),
                  "bce": lambda z: F.binary_cross_entropy_with_logits(z, y)}
    torch_loss[name](model(x)).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = {}
    for layer in ("0", "2"):
        module = model.get_submodule(layer)
        G = torch.cat([module.weight.grad, module.bias.grad[:, None]], dim=1).numpy()
        A, S = factors[layer].A, factors[layer].S / t_loss
        pi = math.sqrt((np.trace(A) / len(A)) / (np.trace(S) / len(S)))
        root = math.sqrt(damping)
        dense = np.kron(S + root / pi * np.eye(len(S)), A + pi * root * np.eye(len(A)))
        expected[layer] = np.linalg.solve(dense, G.reshape(-1)).reshape(G.shape)
    model.zero_grad()
    with KFAC(model, lr=1.0, damping=damping, momentum=0.0, kl_clip=None, fisher="exact", task=task) as opt:
        opt.train_step(x, y)
        assert opt.loss_locations == pytest.approx(t_loss, rel=1e-15)
    for layer in ("0", "2"):
        dw = before[f"{layer}.weight"] - model.get_parameter(f"{layer}.weight")
        db = before[f"{layer}.bias"] - model.get_parameter(f"{layer}.bias")
        np.testing.assert_allclose(torch.cat([dw, db[:, None]], dim=1).detach().numpy(), expected[layer],
                                   rtol=1e-8, atol=1e-12)
