"""KFE projections and curvature with every loss, against brute force on torch's own losses (float64).

Per-example gradients come from ``torch.func.vmap(grad(...))`` of ``F.cross_entropy`` (with
``ignore_index``) / ``F.mse_loss`` / ``F.binary_cross_entropy_with_logits`` summed over the example; the
curvature of every direction from the dense GGN block ``(1/N) Σ_n J_n^T H_n J_n`` (torch.func Jacobian
of the logits, Hessian of the loss). The statistics are over the examples with a counted label. As in
tests/test_gradcov.py the routes differ by summation order only: rtol 1e-9, atol 1e-12.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

from curvlab.analysis.curvature import directional_curvature
from curvlab.analysis.gradcov import LayerBasis, project_gradients, select_directions
from curvlab.capture.factors import collect_factors
from curvlab.capture.loss import BinaryCrossEntropy, CrossEntropy, MeanSquaredError
from curvlab.capture.task import Task

RTOL, ATOL = 1e-9, 1e-12
IGNORE = -100
N, T, D_IN, K = 7, 2, 4, 3


def _setup(name: str):
    """model (tokens ``(N, T, D_IN)`` -> logits ``(N, T, K)``), data, the task, torch's summed loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, 5), nn.Tanh(), nn.Linear(5, K)).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, T, D_IN, generator=gen, dtype=torch.float64)
    if name == "ce_ignore":
        y = torch.randint(0, K, (N, T), generator=gen)
        y[1, 0] = IGNORE
        y[5] = IGNORE  # no counted label: not an example of the statistics
        loss = CrossEntropy(ignore_index=IGNORE, label_smoothing=0.1)

        def reference(z, t):
            return F.cross_entropy(z.reshape(-1, K), t.reshape(-1), reduction="sum", ignore_index=IGNORE,
                                   label_smoothing=0.1)
    elif name == "mse":
        y = torch.randn(N, T, K, generator=gen, dtype=torch.float64)
        loss = MeanSquaredError()

        def reference(z, t):
            return F.mse_loss(z, t, reduction="sum")
    else:
        y = torch.rand(N, T, K, generator=gen, dtype=torch.float64)
        loss = BinaryCrossEntropy()

        def reference(z, t):
            return F.binary_cross_entropy_with_logits(z, t, reduction="sum")
    counted = torch.ones(N, dtype=torch.bool)
    if name == "ce_ignore":
        counted[5] = False
    return model, x, y, Task(loss), reference, counted


def _layer_jacobian(model, x_n, layer):
    """``∂ vec z_n / ∂ [W, b]`` as a ``(T·K, m·(n+1))`` matrix, bias last (row-major ``[W, b]``)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def logits(w, b):
        return functional_call(model, {**params, f"{layer}.weight": w, f"{layer}.bias": b}, (x_n[None],))[0]

    jw, jb = jacrev(logits, argnums=(0, 1))(params[f"{layer}.weight"], params[f"{layer}.bias"])
    jw, jb = jw.reshape(T * K, *jw.shape[-2:]), jb.reshape(T * K, -1)
    return torch.cat([jw, jb[..., None]], dim=2).reshape(T * K, -1), logits(*(params[f"{layer}.{k}"]
                                                                              for k in ("weight", "bias")))


@pytest.mark.parametrize("name", ["ce_ignore", "mse", "bce"])
def test_projections_and_curvature_equal_brute_force(name):
    model, x, y, task, reference, counted = _setup(name)
    factors = collect_factors(model, [(x, y)], fisher="exact", task=task)
    bases = {layer: LayerBasis.from_factors(f.S, f.A) for layer, f in factors.items()}
    stats = project_gradients(model, [(x[:3], y[:3]), (x[3:], y[3:])], bases, curvature="exact", task=task)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def example_loss(p, xi, yi):
        return reference(functional_call(model, p, (xi[None],))[0], yi)

    grads = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x, y)
    for layer, basis in bases.items():
        g = torch.cat([grads[f"{layer}.weight"], grads[f"{layer}.bias"][..., None]], dim=2)[counted]
        c = basis.Q_S.T @ g @ basis.Q_A
        s = stats[layer]
        assert s.num_examples == int(counted.sum())
        np.testing.assert_allclose(s.mean, c.mean(0).numpy(), rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(s.variance, c.var(0, unbiased=True).numpy(), rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(s.second_moment, (c**2).mean(0).numpy(), rtol=RTOL, atol=ATOL)
        fisher = 0
        for n in torch.nonzero(counted).flatten().tolist():
            jac, z = _layer_jacobian(model, x[n], layer)
            fisher = fisher + jac.T @ hessian(reference)(z.detach(), y[n]).reshape(T * K, T * K) @ jac
        fisher = fisher / counted.sum()
        m, n_in = basis.Q_S.shape[0], basis.Q_A.shape[0]
        v = torch.einsum("ai,bj->ijab", basis.Q_S, basis.Q_A).reshape(m, n_in, m * n_in)
        dense = torch.einsum("ijk,kl,ijl->ij", v, fisher, v).detach().numpy()
        np.testing.assert_allclose(s.curvature, dense, rtol=RTOL, atol=ATOL)
        # the jvp route, on directions spread over the eigenvalue range
        picks = select_directions(s.kfac_eigenvalue, 4)
        directions = [torch.outer(basis.Q_S[:, i], basis.Q_A[:, j]) for i, j in picks]
        fvp = directional_curvature(model, layer, directions, [(x[:4], y[:4]), (x[4:], y[4:])], task=task)
        np.testing.assert_allclose(fvp.numpy(), [dense[i, j] for i, j in picks], rtol=RTOL, atol=ATOL)


def test_mc_curvature_of_mse_is_unbiased_for_exact():
    """300 seeds of one Gaussian draw per example: the mean curvature is within 5 standard errors
    (measured over the seeds, per direction) of the exact route's."""
    model, x, y, task, _, _ = _setup("mse")
    factors = collect_factors(model, [(x, y)], fisher="exact", task=task)
    bases = {layer: LayerBasis.from_factors(f.S, f.A) for layer, f in factors.items()}
    exact = project_gradients(model, [(x, y)], bases, curvature="exact", task=task)
    runs = [project_gradients(model, [(x, y)], bases, curvature="mc", seed=s, task=task) for s in range(300)]
    for layer in bases:
        samples = np.stack([r[layer].curvature for r in runs])
        se = samples.std(0, ddof=1) / np.sqrt(len(samples))
        assert np.all(np.abs(samples.mean(0) - exact[layer].curvature) <= 5 * se + 1e-12)
