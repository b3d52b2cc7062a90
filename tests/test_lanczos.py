"""Lanczos, SLQ and Hutchinson (analysis/lanczos.py) on dense matrices with known spectra.

SLQ's guarantee (Chen, Trogdon & Ubaru 2021) and Hutchinson's interval are probabilistic claims: both are
checked by simulation over seeds, against the exact spectrum and trace.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from curvlab.analysis.lanczos import extreme_eigenpairs, hutchinson, lanczos, slq, slq_plan
from curvlab.errors import OptionError


def test_lanczos_tridiagonalises_with_an_orthonormal_basis():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(40, 40, generator=gen, dtype=torch.float64)
    M = X @ X.T
    run = lanczos(lambda v: M @ v, torch.randn(40, generator=gen, dtype=torch.float64), 15)
    Q = run.basis
    T = (
        torch.diag(torch.as_tensor(run.alpha))
        + torch.diag(torch.as_tensor(run.beta[:-1]), 1)
        + torch.diag(torch.as_tensor(run.beta[:-1]), -1)
    )
    assert float((Q.T @ Q - torch.eye(15, dtype=torch.float64)).abs().max()) < 1e-12
    assert float((Q.T @ M @ Q - T).abs().max()) < 1e-10 * float(M.abs().max())
    full = lanczos(lambda v: M @ v, torch.ones(40, dtype=torch.float64), 100)
    assert full.exhausted and full.steps == 40
    values = extreme_eigenpairs(M, 3, which="smallest", tol=1e-10, max_steps=40).values
    np.testing.assert_allclose(values, torch.linalg.eigvalsh(M).numpy()[:3], rtol=1e-8)


def test_slq_plan_is_the_theorems():
    # ⌈12/t + 1/2⌉ steps and ⌈4 (D+2)^-1 t^-2 ln(2D/η)⌉ probes
    assert slq_plan(1000, 0.1, 0.05) == (121, 5)  # 0.3992 · 100 · ln(40000) = 4.2
    assert slq_plan(18, 0.1, 0.05) == (121, 132)


def test_slq_meets_the_chen_trogdon_ubaru_bound_and_hutchinson_covers():
    """SLQ's W1 error (in units of the spectral range) against the exact spectrum, over seeds: the theorem
    says it stays below t with probability >= 1 - η; Hutchinson's ±1.96 SE interval covers the trace."""
    gen = torch.Generator().manual_seed(5)
    D = 200
    Q = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))[0]
    lam = 1.0 / torch.arange(1, D + 1, dtype=torch.float64)  # the NQM's 1/i spectrum
    M = (Q * lam) @ Q.T
    t, eta = 0.2, 0.1
    exact = np.sort(lam.numpy())
    errors = []
    for seed in range(20):
        density = slq(M, accuracy=t, failure=eta, seed=seed)
        assert density.accuracy == t and density.steps == 61
        grid = np.linspace(0, 1, 4001)
        w1 = np.trapezoid(np.abs(density.cdf(grid) - np.searchsorted(exact, grid, side="right") / D), grid)
        errors.append(w1 / (exact[-1] - exact[0]))
    assert max(errors) < t  # measured max ~1e-3: the bound is far from tight here
    covered = 0
    trials = 300
    for seed in range(trials):
        est = hutchinson(M, 40, seed=seed)
        covered += abs(est.estimate - float(lam.sum())) <= 1.96 * est.standard_error
    # nominal 95%; 300 trials: binomial SD 1.3%, so [0.90, 0.99] is a wide acceptance band
    assert 0.90 <= covered / trials <= 0.99
    with pytest.raises(OptionError):
        slq(M, accuracy=0.0)
