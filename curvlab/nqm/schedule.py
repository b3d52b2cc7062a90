"""The optimised piecewise-constant learning-rate schedule on the NQM (seed E.7, Fig. 15).

``K`` equal pieces of ``k`` steps each, piece ``j`` at rate ``α_j``. SGD's second moment of dimension
``i`` follows the closed form piece by piece,

    A ← A_∞ + (1 − α h)^{2k} (A − A_∞),      A_∞ = α c / (B h (2 − α h)),

(``h``, ``c`` here the preconditioned curvature and noise, :func:`curvlab.nqm.problem.preconditioned`)
and the risk is ``R = Σ_i ½ h_i counts_i A_i`` with the problem's own ``h`` (:func:`pwc_risk_torch`, in
torch float64, differentiable in the log-rates). :func:`optimal_pwc` starts from the best
constant rate and its steps T (feasible with ``⌈T/K⌉`` steps per piece), then bisects on the steps per
piece; each trial optimises the K log-rates with L-BFGS-B on ``Σ log R`` (exact autograd gradients),
bounded above by ``0.999 · 2 / max h^{1−p}``, warm-started from the last feasible schedule, all batch
sizes at once. See docs/nqm.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from curvlab.nqm.analysis import (
    DEFAULT_T_MAX,
    Grid,
    _check_sweep_args,
    _progress_bar,
    entry_weights,
    paper_lr_grid,
    steps_to_target,
)
from curvlab.nqm.problem import Problem


@dataclass
class PWCResult:
    """The optimised piecewise-constant schedule per batch size (seed E.7, Fig. 15).

    ``pieces`` equal pieces of ``steps_per_piece[b]`` steps each; ``lrs[b]`` their rates (first to last);
    ``steps_per_piece`` is the smallest value for which the optimised schedule reaches ``risk < target``
    (bisection, each trial re-optimised); ``final_lr = lrs[:, -1]``.
    """

    target: float
    batch_sizes: np.ndarray
    pieces: int
    steps_per_piece: np.ndarray
    lrs: np.ndarray
    risk: np.ndarray
    constant_steps: np.ndarray
    constant_lr: np.ndarray
    precond: float
    mode: str

    @property
    def final_lr(self) -> np.ndarray:
        return self.lrs[:, -1]

    @property
    def total_steps(self) -> np.ndarray:
        return self.steps_per_piece * self.pieces


def pwc_risk_torch(log_lrs, steps_per_piece, inv_batch, h_eff, c_eff, weight, a0):
    """Risk after a piecewise-constant SGD schedule, differentiable (torch, float64).

    ``log_lrs``: (n, K) log rates; ``steps_per_piece``: (n,) steps of every piece; per piece the closed
    form ``A ← A_∞ + (1−αh)^{2k}(A − A_∞)``, ``A_∞ = α c/(B h (2 − αh))``. Returns (n,) risks
    ``Σ_i weight_i A_i``.
    """
    import torch

    lrs = torch.exp(log_lrs)
    a = a0.expand(lrs.shape[0], -1)
    k = steps_per_piece[:, None].to(lrs.dtype)
    for j in range(lrs.shape[1]):
        lr = lrs[:, j : j + 1]
        x = lr * h_eff
        stat = lr * c_eff * inv_batch[:, None] / (h_eff * (2.0 - x))
        decay = torch.pow((1.0 - x) ** 2, k)  # finite gradient even where αh = 1
        a = stat + decay * (a - stat)
    return (a * weight).sum(dim=1)


def _single_blas_thread():
    """One BLAS thread (threadpoolctl, a scikit-learn dependency), or nothing where it is missing."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1)


def _optimise_pwc(log_init: np.ndarray, steps: np.ndarray, inv_batch: np.ndarray, arrays, max_log_lr: float,
                  min_log_lr: float) -> tuple[np.ndarray, np.ndarray]:
    """L-BFGS-B over all rows at once on ``Σ_rows log risk`` (separable), exact gradients by autograd."""
    import torch
    from scipy.optimize import minimize

    h_eff, c_eff, weight, a0 = arrays
    steps_t = torch.as_tensor(steps, dtype=torch.float64)
    inv_b = torch.as_tensor(inv_batch, dtype=torch.float64)
    shape = log_init.shape

    def fun(flat: np.ndarray) -> tuple[float, np.ndarray]:
        x = torch.tensor(flat.reshape(shape), dtype=torch.float64, requires_grad=True)
        risk = pwc_risk_torch(x, steps_t, inv_b, h_eff, c_eff, weight, a0)
        total = torch.log(risk).sum()
        total.backward()
        return float(total.detach()), x.grad.numpy().ravel().copy()

    bounds = [(min_log_lr, max_log_lr)] * log_init.size
    with _single_blas_thread():  # L-BFGS-B's tiny BLAS calls: threads only contend
        res = minimize(fun, np.clip(log_init, min_log_lr, max_log_lr).ravel(), jac=True, method="L-BFGS-B",
                       bounds=bounds, options={"maxiter": 2000, "ftol": 1e-12, "gtol": 1e-9})
    x = res.x.reshape(shape)
    with torch.no_grad():
        risk = pwc_risk_torch(torch.as_tensor(x), steps_t, inv_b, h_eff, c_eff, weight, a0).numpy()
    return x, risk


def optimal_pwc(problem: Problem, target: float, batch_sizes: Sequence[float], *, pieces: int = 10,
                precond: float = 0.0, lrs: np.ndarray | None = None, t_max: int = DEFAULT_T_MAX,
                progress: bool = False) -> PWCResult:
    """The fastest piecewise-constant SGD schedule with ``pieces`` equal pieces per batch size (seed E.7).

    Start: the best constant rate on ``lrs`` (default :func:`paper_lr_grid`) and its steps T; the
    schedule with every piece at that rate and ``⌈T/K⌉`` steps per piece reaches the target. Then
    bisection on the steps per piece: each trial optimises the K log-rates (bounded above by the
    largest stable rate ``2/max h^{1-p}``, times 0.999) with L-BFGS-B on exact autograd gradients,
    warm-started from the last feasible schedule; feasible means optimised risk ``< target``.
    Vectorised over batch sizes. Batch sizes that never reach the target get NaN rates.
    """
    import torch

    if pieces < 1:
        raise ValueError(f"pieces must be a positive integer, got {pieces}")
    batch = _check_sweep_args(problem, target, batch_sizes, t_max)
    grid = Grid("sgd", paper_lr_grid("sgd") if lrs is None else lrs, precond=precond)
    const = steps_to_target(problem, target, batch, grid, t_max=t_max)
    h_eff, c_eff, _, _ = entry_weights(problem, precond)
    arrays = tuple(torch.as_tensor(v, dtype=torch.float64)[None, :] for v in
                   (h_eff, c_eff, 0.5 * problem.h * problem.counts, problem.a0))
    max_log_lr = math.log(0.999 * 2.0 / float(h_eff.max()))
    min_log_lr = math.log(1e-12)
    ok = const.steps > 0
    nb = batch.size
    lrs_out = np.full((nb, pieces), np.nan)
    risk_out = np.full(nb, np.nan)
    per_piece = np.full(nb, -1, dtype=np.int64)
    if ok.any():
        rows = np.flatnonzero(ok)
        hi = -(-const.steps[rows] // pieces)
        lo = np.zeros_like(hi)
        best = np.tile(np.log(const.lr[rows])[:, None], (1, pieces))
        best_risk = np.full(rows.size, np.nan)
        inv_batch = 1.0 / batch[rows]
        # the constant schedule at hi steps per piece is feasible; record its optimised version
        x, risk = _optimise_pwc(best, hi, inv_batch, arrays, max_log_lr, min_log_lr)
        better = risk < target
        best = np.where(better[:, None], x, best)
        best_risk = np.where(better, risk, best_risk)
        bar = _progress_bar(progress, int(np.ceil(np.log2(max(hi.max(), 2)))), "bisection steps")
        try:
            while np.any(hi - lo > 1):
                act = np.flatnonzero(hi - lo > 1)
                mid = (lo[act] + hi[act]) // 2
                x, risk = _optimise_pwc(best[act], mid, inv_batch[act], arrays, max_log_lr, min_log_lr)
                feasible = risk < target
                hi[act] = np.where(feasible, mid, hi[act])
                lo[act] = np.where(feasible, lo[act], mid)
                best[act] = np.where(feasible[:, None], x, best[act])
                best_risk[act] = np.where(feasible, risk, best_risk[act])
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        per_piece[rows] = hi
        lrs_out[rows] = np.exp(best)
        risk_out[rows] = best_risk
    return PWCResult(float(target), batch, int(pieces), per_piece, lrs_out, risk_out, const.steps,
                     const.lr, float(precond), problem.mode)
