"""The straightforward reference for the NQM sweeps: one setting at a time, evaluated from the closed
forms with no precomputation, each with its own scalar bisection over t, in a plain Python loop.

* :func:`point_risk`: ``R(t; B) = Σ_i ½ h_i (D_i(t) E[θ_i(0)²] + N_i(t) c_i/B)`` of one setting after t
  constant-rate steps, from the closed forms of :mod:`curvlab.nqm.dynamics` over the entries;
* :func:`reference_steps`: ``steps(B)``, the smallest integer t in ``[0, t_max]`` with ``R(t; B) < C`` by
  bisection on t (``lo = 0``, ``hi = t_max``, ``mid = ⌊(lo+hi)/2⌋``); ``-1`` ("never") if the setting
  diverges (any dimension unstable, :func:`point_stable`) or ``R(t_max; B) ≥ C``;
* :func:`reference_sweep`: a loop over batch sizes and grid points (lr outer, decay inner) keeping the
  first strict minimum.

The fast path (:func:`curvlab.nqm.analysis.steps_to_target`) must give the same minimum and the same
first minimiser; the tests and ``benchmarks/nqm_sweep.py`` compare the two. See docs/nqm.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from curvlab.nqm.analysis import DEFAULT_T_MAX, Grid, SweepResult, _check_sweep_args, entry_weights
from curvlab.nqm.dynamics import ema_system, momentum_system, sgd_parts, sgd_stable
from curvlab.nqm.problem import Problem, preconditioned


def point_risk(problem: Problem, kind: str, lr: float, decay: float, precond: float, batch_size: float,
               t: int) -> float:
    """Expected risk of one setting after t constant-rate steps, from the closed forms of
    :mod:`curvlab.nqm.dynamics` evaluated over the entries (the straightforward way, no precomputation)."""
    h_eff, c_eff, w_det, w_noise = entry_weights(problem, precond)
    if kind == "sgd":
        det, unit = sgd_parts(t, lr, h_eff)
    else:
        system = (momentum_system if kind == "momentum" else ema_system)(lr, decay, h_eff)
        det, unit = system.readout_parts(t)
    with np.errstate(all="ignore"):
        return float(np.sum(w_det * det) + np.sum(w_noise * unit) / batch_size)


def point_stable(problem: Problem, kind: str, lr: float, decay: float, precond: float) -> bool:
    """Whether every dimension of the setting is stable (divergence means "never reaches")."""
    h_eff, _ = preconditioned(problem.h, problem.c, precond)
    if kind == "sgd":
        return bool(np.all(sgd_stable(lr, h_eff)))
    system = (momentum_system if kind == "momentum" else ema_system)(lr, decay, h_eff)
    return bool(np.all(system.stable))


def reference_steps(problem: Problem, kind: str, lr: float, decay: float, precond: float,
                    batch_size: float, target: float, t_max: int = DEFAULT_T_MAX) -> int:
    """One setting's steps to target, by its own scalar bisection over t (the reference)."""
    if not point_stable(problem, kind, lr, decay, precond):
        return -1
    if problem.initial_risk() < target:
        return 0
    if not point_risk(problem, kind, lr, decay, precond, batch_size, t_max) < target:
        return -1
    lo, hi = 0, int(t_max)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if point_risk(problem, kind, lr, decay, precond, batch_size, mid) < target:
            hi = mid
        else:
            lo = mid
    return hi


def reference_sweep(problem: Problem, target: float, batch_sizes: Sequence[float], grid: Grid, *,
                    t_max: int = DEFAULT_T_MAX, points: Sequence[int] | None = None) -> SweepResult:
    """The straightforward sweep: a Python loop over batch sizes and grid points (lr outer, decay inner),
    each point with its own bisection (:func:`reference_steps`), keeping the first strict minimum.
    ``points`` restricts the loop to those flat grid indices (for timing a subset)."""
    batch = _check_sweep_args(problem, target, batch_sizes, t_max)
    todo = range(grid.size) if points is None else [int(p) for p in points]
    steps = np.full(batch.size, -1, dtype=np.int64)
    best = np.full(batch.size, -1, dtype=np.int64)
    for i, b in enumerate(batch):
        best_steps = math.inf
        for g in todo:
            lr, decay = grid.point(g)
            s = reference_steps(problem, grid.kind, float(lr), float(decay), grid.precond, float(b), target,
                                t_max)
            if s >= 0 and s < best_steps:
                best_steps, steps[i], best[i] = s, s, g
    lr, decay = grid.point(np.maximum(best, 0))
    return SweepResult(float(target), batch, steps, np.where(best >= 0, lr, np.nan),
                       np.where(best >= 0, decay, np.nan), grid, problem.mode)
