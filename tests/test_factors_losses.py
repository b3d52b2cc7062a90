"""K-FAC factors of every loss (cross-entropy with label smoothing and ignore_index, mse, bce) against
brute force: torch.func Jacobians of the logits and Hessians of torch's own losses, in float64.

The references never touch curvlab's loss code: the per-example loss is torch's ``F.cross_entropy`` /
``F.mse_loss`` / ``F.binary_cross_entropy_with_logits`` with ``reduction="sum"`` over the example, its
Hessian ``H_n`` comes from ``torch.func.hessian``, and the Jacobian of the logits with respect to a
layer's output at each token from ``torch.func.jacrev``. Then, with ``T`` tokens and ``N`` the examples
with a counted label (docs/factors.md)::

    A = (1/N) Σ_n Σ_t ã_nt ã_nt^T,      S_exact = (1/N) Σ_n (1/T) Σ_t J_nt^T H_n J_nt,
    S_empirical = (1/N) Σ_n (1/T) Σ_t (J_nt^T ∇ℓ_n)(J_nt^T ∇ℓ_n)^T.

Hooked capture and reference differ by summation order only: rtol 1e-10, atol 1e-13 (entries are O(1)).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev

from curvlab.capture.factors import collect_factors
from curvlab.capture.loss import BinaryCrossEntropy, CrossEntropy, MeanSquaredError
from curvlab.capture.task import Task

RTOL, ATOL = 1e-10, 1e-13
IGNORE = -100
B, T, D_IN, HIDDEN, K = 6, 3, 3, 4, 5


def _reference_loss(name: str):
    if name.startswith("ce"):
        smoothing = 0.2 if name == "ce_smooth" else 0.0
        return lambda z, y: F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), reduction="sum",
                                            label_smoothing=smoothing, ignore_index=IGNORE)
    if name == "mse":
        return lambda z, y: F.mse_loss(z, y, reduction="sum")
    return lambda z, y: F.binary_cross_entropy_with_logits(z, y, reduction="sum")


def _loss(name: str):
    return {"ce": CrossEntropy(), "ce_smooth": CrossEntropy(label_smoothing=0.2),
            "ce_ignore": CrossEntropy(ignore_index=IGNORE), "mse": MeanSquaredError(),
            "bce": BinaryCrossEntropy()}[name]


def _labels(name: str, gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    if name.startswith("ce"):
        labels = torch.randint(0, K, shape, generator=gen)
        if name == "ce_ignore":
            labels[0, 1] = labels[4, 0] = labels[4, 2] = IGNORE
            labels[2] = IGNORE  # example 2 has no counted label: not one of the N examples
        return labels
    if name == "mse":
        return torch.randn(*shape, K, generator=gen, dtype=torch.float64)
    return torch.rand(*shape, K, generator=gen, dtype=torch.float64).round()


def _token_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, K)).double()


def _brute_force(model: nn.Sequential, x, y, name: str, fisher: str):
    """``{layer: (A, S)}`` from the formulas of the module docstring, and ``N``."""
    reference = _reference_loss(name)
    counted = torch.ones(len(y), dtype=torch.bool)
    if name.startswith("ce"):
        counted = (y != IGNORE).reshape(len(y), -1).any(1)
    s0 = model[0](x)  # (B, T, HIDDEN): the first layer's outputs
    layers = {"0": (x, s0, lambda s: model[2](model[1](s))), "2": (torch.tanh(s0), model(x), lambda s: s)}
    out = {}
    for name_l, (a, s, rest) in layers.items():
        m = s.shape[-1]
        A = torch.zeros(a.shape[-1] + 1, a.shape[-1] + 1, dtype=torch.float64)
        S = torch.zeros(m, m, dtype=torch.float64)
        for n in range(len(x)):
            if not counted[n]:
                continue
            augmented = torch.cat([a[n], torch.ones(T, 1, dtype=torch.float64)], dim=1)
            A += augmented.T @ augmented
            z = rest(s[n])
            jac = jacrev(rest)(s[n]).reshape(T * K, T, m)  # ∂ vec z_n / ∂ s_nt
            if fisher == "exact":
                H = hessian(reference)(z, y[n]).reshape(T * K, T * K)
                S += sum(jac[:, t].T @ H @ jac[:, t] for t in range(T)) / T
            else:
                g = grad(reference)(z, y[n]).reshape(T * K)
                S += sum(torch.outer(jac[:, t].T @ g, jac[:, t].T @ g) for t in range(T)) / T
        out[name_l] = (A / counted.sum(), S / counted.sum())
    return out, int(counted.sum())


CASES = ["ce", "ce_smooth", "ce_ignore", "mse", "bce"]


@pytest.mark.parametrize("fisher", ["exact", "empirical"])
@pytest.mark.parametrize("name", CASES)
def test_factors_equal_brute_force(name, fisher):
    model = _token_model()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, D_IN, generator=gen, dtype=torch.float64)
    y = _labels(name, gen, (B, T))
    factors = collect_factors(model, [(x[:4], y[:4]), (x[4:], y[4:])], fisher=fisher, task=Task(_loss(name)))
    expected, n = _brute_force(model, x, y, name, fisher)
    assert factors.num_examples == n == (5 if name == "ce_ignore" else B)
    for layer, (A, S) in expected.items():
        np.testing.assert_allclose(factors[layer].A, A.detach().numpy(), rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(factors[layer].S, S.detach().numpy(), rtol=RTOL, atol=ATOL)
    assert factors.attrs["loss"] == _loss(name).name


@pytest.mark.parametrize("name", CASES)
def test_single_example_kronecker_product_is_the_dense_ggn_block(name):
    """One example, one location: ``S ⊗ A`` of each layer is exactly its block of the GGN
    ``J_W^T H J_W`` (Jacobian of the logits w.r.t. the layer's ``[W, b]``, Hessian of torch's loss)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, K)).double()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, generator=gen, dtype=torch.float64)
    y = torch.tensor([2]) if name.startswith("ce") else _labels(name, gen, (1,))
    factors = collect_factors(model, [(x, y)], fisher="exact", task=Task(_loss(name)))
    params = {k: v.detach() for k, v in model.named_parameters()}
    reference = _reference_loss(name)
    z = model(x)[0].detach()
    H = hessian(reference)(z, y[0]).reshape(K, K)
    for layer in ("0", "2"):

        def logits(w, b, layer=layer):
            return functional_call(model, {**params, f"{layer}.weight": w, f"{layer}.bias": b}, (x,))[0]

        jw, jb = jacrev(logits, argnums=(0, 1))(params[f"{layer}.weight"], params[f"{layer}.bias"])
        jac = torch.cat([jw, jb[..., None]], dim=2).reshape(K, -1)  # rows of [W, b], bias last
        np.testing.assert_allclose(np.kron(factors[layer].S, factors[layer].A), (jac.T @ H @ jac).numpy(),
                                   rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["ce_ignore", "mse", "bce"])
def test_mc_factors_are_unbiased_for_exact(name):
    """``S`` from 8 Monte-Carlo labels per example, over 40 seeds: its mean is within 5 standard errors
    (measured over the seeds, per entry; 39 degrees of freedom) of the exact ``S``; ``A`` does not
    depend on the labels."""
    model = _token_model()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, D_IN, generator=gen, dtype=torch.float64)
    y = _labels(name, gen, (B, T))
    task = Task(_loss(name))
    exact = collect_factors(model, [(x, y)], fisher="exact", task=task)
    runs = [collect_factors(model, [(x, y)], fisher="mc", mc_samples=8, seed=s, task=task) for s in range(40)]
    for layer in exact:
        samples = np.stack([r[layer].S for r in runs])
        se = samples.std(0, ddof=1) / np.sqrt(len(samples))
        assert np.all(np.abs(samples.mean(0) - exact[layer].S) <= 5 * se + 1e-12)
        np.testing.assert_array_equal(runs[0][layer].A, exact[layer].A)


@pytest.mark.parametrize("fisher", ["exact", "empirical", "mc"])
def test_examples_whose_labels_are_all_ignored_change_nothing(fisher):
    """Appending examples whose every label is ignore_index changes neither A, nor S, nor N; ignored
    tokens inside an example change S only through the loss terms they remove (see the brute force)."""
    model = _token_model()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, D_IN, generator=gen, dtype=torch.float64)
    y = _labels("ce", gen, (B, T))
    y[1, 2] = IGNORE
    padded_x = torch.cat([x, torch.randn(3, T, D_IN, generator=gen, dtype=torch.float64)])
    padded_y = torch.cat([y, torch.full((3, T), IGNORE)])
    task = Task(CrossEntropy(ignore_index=IGNORE))
    plain = collect_factors(model, [(x, y)], fisher=fisher, task=task)
    padded = collect_factors(model, [(padded_x, padded_y)], fisher=fisher, task=task)
    alone = collect_factors(model, [(padded_x[B:], padded_y[B:]), (x, y)], fisher=fisher, task=task)
    assert plain.num_examples == padded.num_examples == alone.num_examples == B
    # mc: the labels of batch k are drawn with the seed (seed, k) for the whole batch, so the examples
    # keep their draws when ignored ones are appended, not when they are moved to another batch
    for layer in plain:
        for result in (padded,) if fisher == "mc" else (padded, alone):
            np.testing.assert_allclose(result[layer].A, plain[layer].A, rtol=1e-13, atol=1e-15)
            np.testing.assert_allclose(result[layer].S, plain[layer].S, rtol=1e-13, atol=1e-15)
