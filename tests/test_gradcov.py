"""KFE projections and curvature against brute force: torch.func per-example gradients, dense Fishers.

All in float64. The projections, the all-direction curvature and the jvp quadratic forms are
different summation orders of the same sums, so they agree to ~1e-12 relative; the tolerance 1e-9
leaves room for the conditioning of the eigenbases.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from curvlab.analysis import gradcov
from curvlab.analysis.curvature import directional_curvature, split_weight_matrix
from curvlab.analysis.gradcov import LayerBasis, contraction_order, project_gradients, select_directions
from curvlab.capture.factors import collect_factors
from curvlab.capture.loss import loss_hessian

RTOL = 1e-9


def _data(n, shape, classes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=gen, dtype=torch.float64), torch.randint(
        0, classes, (n,), generator=gen
    )


def _models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3, bias=False)).double()
    cnn = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 3 * 3, 4)
    ).double()
    return {"mlp": (mlp, (5,), 3), "cnn": (cnn, (2, 5, 5), 4)}


def _per_example_matrices(model, x, y, layer):
    """Brute force: per-example gradient matrices ``G_n`` (m × n, bias last) by torch.func."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None], reduction="sum")

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    w = grads[f"{layer}.weight"].reshape(len(x), grads[f"{layer}.weight"].shape[1], -1)
    w = w.reshape(len(x), w.shape[1], -1)
    if f"{layer}.bias" in grads:
        w = torch.cat([w, grads[f"{layer}.bias"][..., None]], dim=2)
    return w


def _bases(model, x, y):
    factors = collect_factors(model, [(x, y)], fisher="exact")
    return {name: LayerBasis.from_factors(f.S, f.A) for name, f in factors.items()}


def _dense_fisher(model, x, layer):
    """The exact Fisher (GGN) block of one layer, ``(1/N) Σ J^T H J``, built explicitly."""
    module = model.get_submodule(layer)
    params = {k: v.detach() for k, v in model.named_parameters()}
    keys = [k for k in ("weight", "bias") if getattr(module, k, None) is not None]
    total = 0
    for xi in x:

        def logits(*tensors, xi=xi):
            p = dict(params, **{f"{layer}.{k}": t for k, t in zip(keys, tensors, strict=True)})
            return functional_call(model, p, (xi[None],))[0]

        jac = jacrev(logits, argnums=tuple(range(len(keys))))(*(params[f"{layer}.{k}"] for k in keys))
        m = module.weight.shape[0]
        blocks = [jac[0].reshape(jac[0].shape[0], m, -1)]
        if len(keys) == 2:
            blocks.append(jac[1].reshape(jac[1].shape[0], m, 1))
        j = torch.cat(blocks, dim=2).reshape(jac[0].shape[0], -1)
        total = total + j.T @ loss_hessian(logits(*(params[f"{layer}.{k}"] for k in keys)).detach()) @ j
    return total / len(x)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_projection_statistics_equal_brute_force(name):
    model, shape, classes = _models()[name]
    x, y = _data(9, shape, classes)
    bases = _bases(model, x, y)
    stats = project_gradients(model, [(x[:4], y[:4]), (x[4:], y[4:])], bases, curvature="exact")
    for layer, basis in bases.items():
        g = _per_example_matrices(model, x, y, layer)
        c = basis.Q_S.T @ g @ basis.Q_A  # [N, m, n] brute force
        s = stats[layer]
        np.testing.assert_allclose(s.mean, c.mean(0).numpy(), rtol=RTOL, atol=1e-12)
        np.testing.assert_allclose(s.variance, c.var(0, unbiased=True).numpy(), rtol=RTOL, atol=1e-12)
        np.testing.assert_allclose(s.second_moment, (c**2).mean(0).numpy(), rtol=RTOL, atol=1e-12)
        # curvature v^T F v of every direction against the explicitly built Fisher block
        fisher = _dense_fisher(model, x, layer)
        m, n = basis.Q_S.shape[0], basis.Q_A.shape[0]
        v = torch.einsum("ai,bj->ijab", basis.Q_S, basis.Q_A).reshape(m, n, m * n)
        dense = torch.einsum("ijk,kl,ijl->ij", v, fisher, v).numpy()
        np.testing.assert_allclose(s.curvature, dense, rtol=RTOL, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_jvp_curvature_equals_all_direction_route(name):
    model, shape, classes = _models()[name]
    x, y = _data(7, shape, classes, seed=1)
    bases = _bases(model, x, y)
    stats = project_gradients(model, [(x, y)], bases, curvature="exact")
    for layer, basis in bases.items():
        picks = select_directions(stats[layer].kfac_eigenvalue, 5)
        directions = [torch.outer(basis.Q_S[:, i], basis.Q_A[:, j]) for i, j in picks]
        fvp = directional_curvature(model, layer, directions, [(x[:3], y[:3]), (x[3:], y[3:])])
        expected = np.array([stats[layer].curvature[i, j] for i, j in picks])
        np.testing.assert_allclose(fvp.numpy(), expected, rtol=RTOL, atol=1e-13)


def test_mc_curvature_is_unbiased_for_exact():
    model, shape, classes = _models()["mlp"]
    x, y = _data(6, shape, classes)
    bases = _bases(model, x, y)
    exact = project_gradients(model, [(x, y)], bases, curvature="exact")
    runs = [project_gradients(model, [(x, y)], bases, curvature="mc", seed=s) for s in range(300)]
    for layer in bases:
        samples = np.stack([r[layer].curvature for r in runs])
        stderr = samples.std(0, ddof=1) / np.sqrt(len(samples))
        assert np.all(np.abs(samples.mean(0) - exact[layer].curvature) <= 5 * stderr + 1e-12)


@pytest.mark.parametrize("order", ["project_first", "gradient_first"])
def test_contraction_orders_agree(order, monkeypatch):
    model, shape, classes = _models()["cnn"]
    x, y = _data(5, shape, classes)
    bases = _bases(model, x, y)
    reference = project_gradients(model, [(x, y)], bases, curvature="exact")
    monkeypatch.setattr(gradcov, "contraction_order", lambda *args: order if args[0] > 1 else "outer")
    monkeypatch.setattr(gradcov, "CHUNK_BYTES", 1)  # one example per chunk
    forced = project_gradients(model, [(x, y)], bases, curvature="exact")
    for layer in bases:
        for key in ("mean", "variance", "second_moment", "curvature"):
            np.testing.assert_allclose(
                getattr(forced[layer], key), getattr(reference[layer], key), rtol=RTOL, atol=1e-13
            )


def test_contraction_order_choice():
    assert contraction_order(1, 10, 10, 2) == "outer"
    assert contraction_order(1024, 16, 145, 11) == "gradient_first"  # many locations, narrow layer
    assert contraction_order(4, 512, 512, 1) == "project_first"


def test_select_directions_spans_the_range():
    eig = np.outer([1.0, 2.0, 3.0], [1.0, 10.0])
    picks = select_directions(eig, 3)
    values = sorted(eig[i, j] for i, j in picks)
    assert values[0] == eig.min() and values[-1] == eig.max() and len(picks) == 3
    assert len(select_directions(eig, 100)) == 6


def test_split_weight_matrix_round_trip():
    conv = nn.Conv2d(2, 3, 3)
    matrix = torch.randn(3, 2 * 9 + 1)
    t = split_weight_matrix(conv, matrix)
    assert t["weight"].shape == conv.weight.shape and t["bias"].shape == (3,)
    torch.testing.assert_close(t["weight"].flatten(1), matrix[:, :-1])


def test_reverse_mode_fallback_equals_forward_mode():
    """The double-backward ``J v`` (used where an op lacks forward-mode AD) gives the same curvature."""
    from curvlab.analysis import curvature

    model, shape, classes = _models()["cnn"]
    x, y = _data(4, shape, classes)
    directions = [torch.randn(3, 2 * 9 + 1, dtype=torch.float64) for _ in range(2)]
    forward = directional_curvature(model, "0", directions, [(x, y)])
    original = curvature.jvp
    try:
        def broken(*args, **kwargs):
            raise NotImplementedError("no forward-mode derivative")

        curvature.jvp = broken
        reverse = directional_curvature(model, "0", directions, [(x, y)])
    finally:
        curvature.jvp = original
    torch.testing.assert_close(reverse, forward, rtol=1e-12, atol=0)
