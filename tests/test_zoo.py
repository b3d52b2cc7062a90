"""The models of tests/models_zoo.py end to end: KFE projections of every entry kind (convolutions,
attention projections, norm blocks, tied and multi-use layers) against brute force, the spectrum with
norm blocks, and K-FAC training.

References (tests/brute_force.py) go through the models' own forward passes: per-example gradients by
torch.func give ``c_n = Q_S^T G_n Q_A``; the dense true Fisher (= GGN) gives ``v^T F v`` for every
direction. Float64; the routes differ by summation order only, relative 1e-9 (as in test_gradcov.py)
with an absolute floor of 1e-12 of the layer's largest value for directions that carry no gradient.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from brute_force import dense_basis_A, dense_fisher, entry_direction, entry_gradients, per_example_grads
from models_zoo import build
from test_coverage import Twice
from torch import nn

from curvlab.analysis.curvature import directional_curvature
from curvlab.analysis.gradcov import LayerBasis, project_gradients, select_directions
from curvlab.analysis.spectrum import KroneckerSpectrum, compute_spectrum, load_layer_eigenvalues
from curvlab.capture.factors import collect_factors, save_factors, select_layers
from curvlab.optim.kfac import KFAC

RTOL = 1e-9


def _data(kind: str, n: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    if kind == "transformer":  # vocabulary 7, 3 tokens (the default-size model in the slow runs)
        x = torch.randint(0, 7, (n, 3), generator=gen)
        return x, torch.randint(0, 7, (n, 3), generator=gen)
    shape, classes = {"cnn": ((1, 3, 3), 10), "conv1d": ((2, 11), 3), "cross_attention": ((6, 3), 3),
                      "twice": ((3, 4), 3)}[kind]
    x = torch.randn(n, *shape, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, classes, (n,), generator=gen)


def _model(kind: str) -> nn.Module:
    if kind == "twice":
        model = Twice()
    elif kind == "transformer":
        model = build(kind=kind, seed=0, vocab_size=7, d_model=4, max_len=3)
    else:
        model = build(kind=kind, seed=0)
    return model.double().eval()


KINDS = ["cnn", "transformer", "conv1d", "cross_attention", "twice"]


@pytest.mark.parametrize("kind", KINDS)
def test_kfe_statistics_of_every_entry_equal_brute_force(kind):
    model = _model(kind)
    x, y = _data(kind)
    factors = collect_factors(model, [(x, y)], fisher="exact")
    assert factors.coverage.complete
    bases = {name: LayerBasis.from_factors(f.S, f.A) for name, f in factors.items()}
    stats = project_gradients(model, [(x[:3], y[:3]), (x[3:], y[3:])], bases, curvature="exact")
    grads = per_example_grads(model, x, y)
    fisher = dense_fisher(model, x)
    entries = select_layers(model)
    for name, basis in bases.items():
        source, adapter = entries[name]
        G = entry_gradients(grads, model, source, adapter)
        c = basis.Q_S.T @ G @ dense_basis_A(basis)
        scale = float((c * c).mean(0).max())
        np.testing.assert_allclose(stats[name].mean, c.mean(0).numpy(), rtol=RTOL, atol=1e-12 * scale**0.5)
        np.testing.assert_allclose(stats[name].second_moment, (c * c).mean(0).numpy(), rtol=RTOL,
                                   atol=1e-12 * scale)
        m, n = basis.shape
        V = torch.stack([entry_direction(model, source, adapter, basis.direction(i, j))
                         for i in range(m) for j in range(n)], dim=1)
        curvature = torch.einsum("pd,pq,qd->d", V, fisher, V).reshape(m, n).numpy()
        np.testing.assert_allclose(stats[name].curvature, curvature, rtol=RTOL, atol=1e-12 * curvature.max())


@pytest.mark.parametrize("kind", [pytest.param("cnn", marks=pytest.mark.slow), "transformer",
                                  "cross_attention"])
def test_jvp_curvature_of_every_entry_equals_the_all_direction_route(kind):
    model = _model(kind)
    x, y = _data(kind, seed=1)
    factors = collect_factors(model, [(x, y)], fisher="exact")
    bases = {name: LayerBasis.from_factors(f.S, f.A) for name, f in factors.items()}
    stats = project_gradients(model, [(x, y)], bases, curvature="exact")
    for name, basis in bases.items():
        picks = select_directions(stats[name].kfac_eigenvalue, 2)
        directions = [basis.direction(i, j) for i, j in picks]
        fvp = directional_curvature(model, name, directions, [(x[:2], y[:2]), (x[2:], y[2:])])
        expected = np.array([stats[name].curvature[i, j] for i, j in picks])
        np.testing.assert_allclose(fvp.numpy(), expected, rtol=RTOL, atol=1e-12 * stats[name].curvature.max())


def test_norm_blocks_join_the_whole_network_spectrum(tmp_path):
    model = _model("cnn")
    x, y = _data("cnn", n=8)
    factors = collect_factors(model, [(x, y)], fisher="exact")
    path = tmp_path / "cnn.h5"
    save_factors(str(path), factors, model=model)
    result = compute_spectrum(path, tmp_path / "cnn.spectrum.h5")
    (step,) = result.steps
    layers = {layer.name: layer for layer in step.layers}
    for name in ("bn", "block.bn1", "gn"):
        blocks = factors[name].A
        expected = np.sort(np.linalg.eigvalsh(scipy.linalg.block_diag(*blocks)))
        np.testing.assert_allclose(layers[name].A, np.clip(expected, 0, None), rtol=1e-10,
                                   atol=1e-14 * expected.max())
        assert layers[name].S.tolist() == [1.0] and layers[name].module_type == "NormAffine"
    spectrum = step.kronecker()
    assert spectrum.count == sum(f.S.shape[0] * f.A.shape[0] * (f.A.shape[-1] if f.A.ndim == 3 else 1)
                                 for f in factors.values())
    products = np.concatenate([np.outer(layer.S, layer.A).ravel() for layer in step.layers])
    np.testing.assert_allclose(spectrum.top(5), np.sort(products)[::-1][:5], rtol=1e-12)
    number, from_file = load_layer_eigenvalues(tmp_path / "cnn.spectrum.h5")
    _, from_checkpoint = load_layer_eigenvalues(path)
    for name, (_, a) in from_checkpoint.items():
        # eigh with and without vectors: the same eigenvalues to rounding
        np.testing.assert_allclose(from_file[name][1], a, rtol=1e-9, atol=1e-12 * a.max())
    assert isinstance(KroneckerSpectrum(list(from_file.values())).max(), float)


@pytest.mark.parametrize("kind", ["cnn", "transformer", "conv1d", "cross_attention"])
def test_kfac_trains_every_zoo_model(kind):
    model = _model(kind).train()
    x, y = _data(kind, n=16, seed=2)

    def loss_fn(logits, labels):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    with torch.no_grad():
        before = float(loss_fn(model(x), y))
    with KFAC(model, lr=0.1, damping=0.01, inverse_update_every=1, fisher="mc") as opt:
        for _ in range(8):
            opt.train_step(x, y, loss_fn)
        coverage = opt.coverage()
    with torch.no_grad():
        after = float(loss_fn(model(x), y))
    assert after < before
    if kind == "cnn":  # batch norm in training mode: plain gradient steps, reported
        assert {s["name"].split(".")[-2] for s in coverage.skipped} == {"bn", "bn1", "bn2"}
    else:
        assert coverage.complete
