"""The numbers behind the seed's NQM figures: Fig. 11 (E.3), Fig. 13 (E.5), Fig. 14 a/b/c (E.6),
Fig. 15 (E.7). Each function returns a JSON-ready dict that says which problem mode produced it;
:mod:`curvlab.plots.nqm` draws them.

Choices the seed leaves open (docs/nqm.md): batch sizes ``2^2 … 2^20``; Fig. 13 thresholds
0.1, 0.05, 0.02, 0.01, 0.005 (the initial risk of the default problem is 4.89); Figs. 14 and 15 target
0.01; learning-rate and momentum grids of the authors' notebook (:func:`paper_lr_grid`,
:func:`paper_decay_grid`); Fig. 15 with 10 equal pieces.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from curvlab.nqm.analysis import Grid, paper_decay_grid, paper_lr_grid, steps_to_target
from curvlab.nqm.dynamics import sgd_parts
from curvlab.nqm.problem import Problem, default_problem
from curvlab.nqm.schedule import optimal_pwc
from curvlab.nqm.theorems import theorem1_convergence

FIGURES = ("11", "13", "14a", "14b", "14c", "15")
BATCH_SIZES = tuple(2**k for k in range(2, 21))
FIG11_ALPHA_H = 5e-4
FIG11_STEPS = (30, 100, 300, 1000)
FIG13_THRESHOLDS = (0.1, 0.05, 0.02, 0.01, 0.005)
FIG14_POWERS = (0.0, 0.25, 0.5, 0.75)
FIG14_TARGET = 0.01
FIG15_TARGET = 0.01
FIG15_PIECES = 10


def _floats(x) -> list:
    """JSON list with NaN/inf as None."""
    arr = np.asarray(x, dtype=np.float64)
    return [None if not np.isfinite(v) else float(v) for v in arr.ravel()] if arr.ndim <= 1 else [
        _floats(row) for row in arr
    ]


def _ints(x) -> list:
    """JSON list of steps with -1 (never) as None."""
    return [None if int(v) < 0 else int(v) for v in np.asarray(x).ravel()]


def _tick(progress) -> None:
    if progress is not None:
        progress.update(1)


# ----------------------------------------------------------------------------------- Fig. 11


def fig11_data(alpha_h: float = FIG11_ALPHA_H, steps: Sequence[int] = FIG11_STEPS,
               one_minus_beta: np.ndarray | None = None) -> dict:
    """Convergence term (first term of eq. 6 / eq. 33) of momentum SGD vs plain SGD at the effective rate.

    One dimension with ``αh`` fixed; momentum β gives ``((r1^{t+1} − r2^{t+1} − β(r1^t − r2^t))/(r1−r2))²``
    (eq. 34's factor), plain SGD at ``α/(1−β)`` gives ``(1 − αh/(1−β))^{2t}``. Both are normalised by the
    initial value ``E[θ(0)²]`` (so they start at 1), as functions of ``1 − β`` (seed E.3).
    """
    omb = np.logspace(-3, 0, 301) if one_minus_beta is None else np.asarray(one_minus_beta, dtype=np.float64)
    beta = 1.0 - omb
    steps = [int(t) for t in steps]
    momentum, sgd = [], []
    for t in steps:
        momentum.append(theorem1_convergence(t, alpha_h, beta, 1.0))
        decay, _ = sgd_parts(t, alpha_h / omb, 1.0)
        sgd.append(decay)
    momentum_arr, sgd_arr = np.array(momentum), np.array(sgd)
    return {
        "figure": "11",
        "mode": "analytic (one dimension, closed forms)",
        "alpha_h": float(alpha_h),
        "normalisation": "divided by E[theta(0)^2]",
        "one_minus_beta": _floats(omb),
        "steps": steps,
        "momentum": _floats(momentum_arr),
        "sgd_effective_lr": _floats(sgd_arr),
        "max_abs_difference": _floats(np.max(np.abs(momentum_arr - sgd_arr), axis=1)),
    }


# ----------------------------------------------------------------------------------- Fig. 13


def fig13_data(problem: Problem | None = None, thresholds: Sequence[float] = FIG13_THRESHOLDS,
               batch_sizes: Sequence[int] = BATCH_SIZES, lrs: np.ndarray | None = None,
               progress=None) -> dict:
    """Steps to each loss threshold vs batch size, plain SGD, grid search over constant rates (seed E.5)."""
    problem = default_problem() if problem is None else problem
    grid = Grid("sgd", paper_lr_grid("sgd") if lrs is None else lrs)
    steps, lr = [], []
    for c in thresholds:
        res = steps_to_target(problem, float(c), batch_sizes, grid)
        steps.append(_ints(res.steps))
        lr.append(_floats(res.lr))
        _tick(progress)
    return {
        "figure": "13",
        "mode": problem.mode,
        "problem": problem.describe(),
        "optimizer": "sgd, constant learning rate",
        "lr_grid": _floats(grid.lrs),
        "batch_sizes": [int(b) for b in batch_sizes],
        "thresholds": [float(c) for c in thresholds],
        "steps": steps,
        "lr": lr,
    }


# ----------------------------------------------------------------------------------- Fig. 14


def fig14_data(variant: str, problem: Problem | None = None, powers: Sequence[float] = FIG14_POWERS,
               batch_sizes: Sequence[int] = BATCH_SIZES, target: float = FIG14_TARGET,
               lr_num: int = 100, decay_num: int = 20, progress=None, reference: dict | None = None) -> dict:
    """Optimal learning rate vs batch size for preconditioning powers p (seed E.6).

    ``variant``: ``"a"`` plain SGD; ``"b"`` momentum 0.9; ``"c"`` tuned momentum (grid
    ``1 − logspace(-5, 0, 20)``). For b and c the plotted rate is the effective rate ``α/(1−β)``, and
    the dict carries variant a's rates as ``dashed`` (computed here unless ``reference`` is given).
    """
    if variant not in ("a", "b", "c"):
        raise ValueError(f"Fig. 14 variant must be a, b or c, got {variant!r}")
    problem = default_problem() if problem is None else problem
    rows = {"optimal_lr": [], "lr": [], "momentum": [], "steps": []}
    for p in powers:
        if variant == "a":
            grid = Grid("sgd", paper_lr_grid("sgd", lr_num), precond=float(p))
        else:
            decays = np.array([0.9]) if variant == "b" else paper_decay_grid(decay_num)
            grid = Grid("momentum", paper_lr_grid("momentum", lr_num), decays, precond=float(p))
        res = steps_to_target(problem, target, batch_sizes, grid)
        rows["optimal_lr"].append(_floats(res.effective_lr))
        rows["lr"].append(_floats(res.lr))
        rows["momentum"].append(_floats(res.decay) if variant != "a" else None)
        rows["steps"].append(_ints(res.steps))
        _tick(progress)
    out = {
        "figure": f"14{variant}",
        "mode": problem.mode,
        "problem": problem.describe(),
        "optimizer": {"a": "sgd", "b": "momentum 0.9", "c": "tuned momentum"}[variant],
        "plotted": "learning rate" if variant == "a" else "effective learning rate lr/(1-momentum)",
        "target": float(target),
        "powers": [float(p) for p in powers],
        "batch_sizes": [int(b) for b in batch_sizes],
        **rows,
    }
    if variant != "a":
        ref = reference if reference is not None else fig14_data("a", problem, powers, batch_sizes, target,
                                                                  lr_num, decay_num)
        out["dashed"] = ref["optimal_lr"]
    return out


# ----------------------------------------------------------------------------------- Fig. 15


def fig15_data(problem: Problem | None = None, batch_sizes: Sequence[int] = BATCH_SIZES,
               target: float = FIG15_TARGET, pieces: int = FIG15_PIECES, progress: bool = False) -> dict:
    """Final learning rate of the optimised piecewise-constant schedule vs batch size (seed E.7)."""
    problem = default_problem(mode="binned") if problem is None else problem
    res = optimal_pwc(problem, target, batch_sizes, pieces=pieces, progress=progress)
    batch = np.asarray(batch_sizes, dtype=np.float64)
    final = res.final_lr
    small = np.isfinite(final) & (batch <= 64)
    slope = float(np.polyfit(np.log(batch[small]), np.log(final[small]), 1)[0]) if small.sum() >= 2 else None
    return {
        "figure": "15",
        "mode": problem.mode,
        "problem": problem.describe(),
        "optimizer": f"sgd, optimised piecewise-constant schedule, {pieces} equal pieces",
        "target": float(target),
        "batch_sizes": [int(b) for b in batch_sizes],
        "final_lr": _floats(final),
        "lrs": _floats(res.lrs),
        "steps_per_piece": _ints(res.steps_per_piece),
        "total_steps": _ints(np.where(res.steps_per_piece >= 0, res.total_steps, -1)),
        "risk": _floats(res.risk),
        "constant_steps": _ints(res.constant_steps),
        "constant_lr": _floats(res.constant_lr),
        "loglog_slope_b_le_64": slope,
    }
