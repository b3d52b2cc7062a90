"""K-FAC and EKFAC operators against dense matrices built independently (torch.kron, eigvalsh, solve).

Everything in float64. The operators and the references are different orders of the same float64
sums and products of matrices with entries O(1) and condition numbers below 1e4, so they agree to
~1e-14 relative; the tolerance 1e-12 leaves room for that conditioning.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from curvlab.analysis.layout import ParameterLayout
from curvlab.analysis.operators import EKFACOperator, KFACOperator
from curvlab.capture.factors import collect_factors, save_factors
from curvlab.errors import OptionError
from curvlab.io.checkpoint import LayerFactors

TOL = 1e-12


def _psd(n, gen, rank=None):
    x = torch.randn(n, rank or 2 * n, generator=gen, dtype=torch.float64)
    return (x @ x.T / x.shape[1]).numpy()


def _factors(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "fc": LayerFactors("Linear", (4, 3), True, _psd(4, gen), _psd(4, gen)),  # A (n+1), S (m)
        "emb": LayerFactors(
            "Embedding",
            (6, 3),
            False,
            torch.rand(6, generator=gen, dtype=torch.float64).numpy() + 0.1,
            _psd(3, gen),
        ),
        "tied": LayerFactors(
            "TiedEmbedding",
            (5, 2),
            False,
            _psd(2, gen),
            torch.rand(5, generator=gen, dtype=torch.float64).numpy() + 0.1,
        ),
        # a normalisation layer's (γ, β): 3 channel blocks of 2 × 2 (A), S = [1]; and one without β
        "norm": LayerFactors(
            "NormAffine", (3,), True, np.stack([_psd(2, gen) for _ in range(3)]), np.ones(1)
        ),
        "rms": LayerFactors(
            "NormAffine", (2, 2), False, np.stack([_psd(1, gen) for _ in range(4)]), np.full(1, 0.7)
        ),
    }


def _dense_factor(x):
    x = torch.as_tensor(x, dtype=torch.float64)
    if x.dim() == 3:  # blocks (C, k, k): the block-diagonal matrix
        return torch.block_diag(*x)
    return torch.diag(x) if x.dim() == 1 else x


def _dense(factors):
    return torch.block_diag(*[torch.kron(_dense_factor(f.S), _dense_factor(f.A)) for f in factors.values()])


def _close(a, b, tol=TOL):
    scale = max(float(torch.as_tensor(b).abs().max()), 1e-300)
    assert float((torch.as_tensor(a) - torch.as_tensor(b)).abs().max()) <= tol * scale


def test_matvec_matmat_and_dict_match_the_dense_kronecker_blocks():
    factors = _factors()
    op = KFACOperator(factors)
    dense = _dense(factors)
    assert op.shape == dense.shape == (16 + 18 + 10 + 6 + 4, 16 + 18 + 10 + 6 + 4)
    assert op.kinds["norm"] == ("diagonal", "blocks") and op.layout.index["norm"].n == 6
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(op.layout.dim, generator=gen, dtype=torch.float64)
    M = torch.randn(op.layout.dim, 5, generator=gen, dtype=torch.float64)
    _close(op.matvec(v), dense @ v)
    _close(op @ M, dense @ M)
    blocks, _, _ = op.layout.to_blocks(v)
    as_dict = op.matvec({k: b[0] for k, b in blocks.items()})
    _close(op.layout.from_blocks({k: b[None] for k, b in as_dict.items()}, "flat", True), dense @ v)
    _close(op.to_dense(), dense)


def test_scipy_view_gives_the_dense_top_eigenvalues():
    from scipy.sparse.linalg import eigsh

    factors = _factors()
    op = KFACOperator(factors)
    top = eigsh(op.to_scipy(), k=3, which="LA", tol=1e-14)[0]
    expected = torch.linalg.eigvalsh(_dense(factors)).numpy()[-3:]
    np.testing.assert_allclose(np.sort(top), expected, rtol=1e-11)


def test_exact_and_factored_inverses():
    factors = _factors()
    op = KFACOperator(factors)
    dense = _dense(factors)
    gen = torch.Generator().manual_seed(2)
    M = torch.randn(op.layout.dim, 3, generator=gen, dtype=torch.float64)
    lam = 0.3
    _close(
        op.inverse(lam) @ M, torch.linalg.solve(dense + lam * torch.eye(len(dense), dtype=torch.float64), M)
    )
    # factored Tikhonov: (S + √λ/π I) ⊗ (A + π√λ I) with π from the traces, built here independently;
    # a NormAffine entry's blocks get the optimizer's plain Tikhonov S ⊗ A + λ I (docs/kfac.md)
    blocks = []
    eye = lambda n: torch.eye(n, dtype=torch.float64)  # noqa: E731
    for f in factors.values():
        S, A = _dense_factor(f.S), _dense_factor(f.A)
        if f.module_type == "NormAffine":
            blocks.append(torch.kron(S, A) + lam * eye(len(S) * len(A)))
            continue
        pi = math.sqrt((A.trace() / len(A)) / (S.trace() / len(S)))
        blocks.append(
            torch.kron(S + math.sqrt(lam) / pi * eye(len(S)), A + pi * math.sqrt(lam) * eye(len(A)))
        )
    factored = torch.block_diag(*blocks)
    _close(op.inverse(lam, "factored") @ M, torch.linalg.solve(factored, M))
    assert op.logdet(lam, method="factored") == pytest.approx(
        float(torch.linalg.slogdet(factored)[1]), rel=TOL
    )
    with pytest.raises(OptionError):
        op.inverse(0.0)
    with pytest.raises(OptionError):
        op.inverse(0.1, method="cholesky")


def test_factored_inverse_is_the_optimizers_preconditioner():
    from curvlab.optim.kfac import KFAC

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 3, (32,))
    opt = KFAC(model, lr=0.1, damping=0.05, fisher="exact", kl_clip=None)
    opt.initialize_factors([(x, y)])
    opt.decompose()
    op = KFACOperator(opt.running_factors())
    assert op.kinds["1"] == ("diagonal", "blocks")
    G = {
        name: torch.randn(op.layout.index[name].m, op.layout.index[name].n, dtype=torch.float64)
        for name in op.layout.index
    }
    ours = op.inverse(0.05, "factored").matvec(G)
    for name in G:
        _close(ours[name], opt.precondition(name, G[name]), 1e-10)  # the optimizer's eigh vs the engine's
    opt.close()


def test_eigen_trace_logdet_frobenius():
    factors = _factors()
    op = KFACOperator(factors)
    dense = _dense(factors)
    expected = torch.linalg.eigvalsh(dense)
    spectrum = op.eigenvalues()
    np.testing.assert_allclose(spectrum.sorted_values()[::-1], expected.numpy(), rtol=1e-11)
    values, vectors = op.top_eigenpairs(4)
    np.testing.assert_allclose(values.numpy(), expected.numpy()[::-1][:4], rtol=1e-11)
    _close(dense @ vectors, vectors * values)
    _close(vectors.T @ vectors, torch.eye(4, dtype=torch.float64))
    assert op.trace() == pytest.approx(float(dense.trace()), rel=TOL)
    assert op.logdet() == pytest.approx(float(torch.linalg.slogdet(dense)[1]), rel=1e-11)
    assert op.logdet(0.2) == pytest.approx(
        float(torch.linalg.slogdet(dense + 0.2 * torch.eye(len(dense), dtype=torch.float64))[1]), rel=TOL
    )
    assert op.frobenius_norm() == pytest.approx(float(torch.linalg.norm(dense)), rel=TOL)


def test_ekfac_against_its_dense_matrix():
    factors = _factors()
    kfac = KFACOperator(factors)
    gen = torch.Generator().manual_seed(3)
    lam = {
        b.name: torch.rand(b.m, b.n, generator=gen, dtype=torch.float64) + 0.05 for b in kfac.layout.blocks
    }
    op = EKFACOperator.from_kfac(kfac, lam)
    blocks = []
    for name, (bs, ba) in kfac.bases().items():
        Q = torch.kron(
            torch.stack([bs.column(i) for i in range(bs.size)], 1),
            torch.stack([ba.column(j) for j in range(ba.size)], 1),
        )
        blocks.append(Q @ torch.diag(lam[name].reshape(-1)) @ Q.T)
    dense = torch.block_diag(*blocks)
    M = torch.randn(op.layout.dim, 2, generator=gen, dtype=torch.float64)
    _close(op @ M, dense @ M)
    _close(
        op.inverse(0.1) @ M, torch.linalg.solve(dense + 0.1 * torch.eye(len(dense), dtype=torch.float64), M)
    )
    np.testing.assert_allclose(
        op.eigenvalues().sorted_values()[::-1], torch.linalg.eigvalsh(dense).numpy(), rtol=1e-11
    )
    values, vectors = op.top_eigenpairs(3)
    _close(dense @ vectors, vectors * values)
    assert op.trace() == pytest.approx(float(dense.trace()), rel=TOL)
    assert op.logdet(0.1) == pytest.approx(
        float(torch.linalg.slogdet(dense + 0.1 * torch.eye(len(dense), dtype=torch.float64))[1]), rel=TOL
    )
    # with the K-FAC eigenvalues EKFAC is K-FAC
    same = EKFACOperator.from_kfac(kfac, {n: kfac.kfe_eigenvalues(n) for n in lam})
    _close(same @ M, kfac @ M)
    with pytest.raises(OptionError, match="fc"):
        EKFACOperator.from_kfac(kfac, {**lam, "fc": -lam["fc"]})


def test_a_diagonal_factor_is_never_densified():
    """S of 200,000 entries: a dense S (or its eigenvectors) would take 320 GB."""
    V = 200_000
    gen = torch.Generator().manual_seed(4)
    s = torch.rand(V, generator=gen, dtype=torch.float64).numpy() + 0.5
    factors = {"tied": LayerFactors("TiedEmbedding", (V, 2), False, _psd(2, gen), s)}
    op = KFACOperator(factors)
    v = torch.randn(op.layout.dim, generator=gen, dtype=torch.float64)
    W = v.reshape(V, 2)
    A = torch.as_tensor(factors["tied"].A)
    _close(op.matvec(v), ((torch.as_tensor(s)[:, None] * W) @ A).reshape(-1))
    back = op.inverse(1e-3) @ (op.matvec(v) + 1e-3 * v)
    _close(back, v, 1e-10)
    assert op.top_eigenpairs(2)[1].shape == (op.layout.dim, 2)


def test_parameter_lists_and_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)
    ).double()
    x, y = torch.randn(16, 2, 4, 4, dtype=torch.float64), torch.randint(0, 4, (16,))
    factors = collect_factors(model, [(x, y)], fisher="exact")
    op = KFACOperator(factors, model=model)
    params = op.layout.parameters()
    assert [p.shape for p in params] == [p.shape for p in model.parameters()]
    vec = [torch.randn(*p.shape, 2, dtype=torch.float64) for p in params]
    out = op.matmat(vec)
    flat_in = torch.cat(
        [
            torch.cat([vec[0].reshape(3, -1, 2), vec[1][:, None]], 1).reshape(-1, 2),
            torch.cat([vec[2], vec[3][:, None]], 1).reshape(-1, 2),
        ]
    )
    flat_out = op @ flat_in
    got = torch.cat(
        [
            torch.cat([out[0].reshape(3, -1, 2), out[1][:, None]], 1).reshape(-1, 2),
            torch.cat([out[2], out[3][:, None]], 1).reshape(-1, 2),
        ]
    )
    _close(got, flat_out)
    single = op.matvec([v[..., 0] for v in vec])
    assert [s.shape for s in single] == [p.shape for p in params]
    path = tmp_path / "x.h5"
    save_factors(str(path), factors, model=model)
    again = KFACOperator.from_checkpoint(path)
    _close(again @ flat_in, flat_out)
    with pytest.raises(OptionError, match="need the model"):
        again.matvec([v[..., 0] for v in vec])
    with pytest.raises(OptionError, match="length"):
        op.matvec(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(OptionError, match="non-finite"):
        op.matvec(torch.full((op.layout.dim,), float("nan"), dtype=torch.float64))


def test_layout_refuses_a_model_that_does_not_fit():
    factors = _factors()
    layout = ParameterLayout.from_factors({"fc": factors["fc"]})
    with pytest.raises(OptionError, match="fc"):
        layout.bind(nn.Sequential(nn.Linear(3, 4)))
