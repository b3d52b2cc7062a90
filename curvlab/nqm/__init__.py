"""The noisy quadratic model (seed appendices B–E): exact per-dimension dynamics of SGD, heavy-ball
momentum and iterate averaging, Theorems 1 and 2, steps-to-target sweeps and the numbers behind
Figs. 11, 13, 14 and 15. See docs/nqm.md.

Modules: :mod:`~curvlab.nqm.problem` (the problem and its binned / preconditioned forms),
:mod:`~curvlab.nqm.dynamics` (closed forms), :mod:`~curvlab.nqm.theorems`, :mod:`~curvlab.nqm.analysis`
(steps-to-target sweeps over grids), :mod:`~curvlab.nqm.reference` (the straightforward loop they are
checked against), :mod:`~curvlab.nqm.schedule` (the optimised piecewise-constant schedule, E.7) and
:mod:`~curvlab.nqm.figures`.

>>> from curvlab.nqm import default_problem, Grid, paper_lr_grid, steps_to_target
>>> res = steps_to_target(default_problem(mode="binned"), 0.01, [64, 1024], Grid("sgd", paper_lr_grid()))
>>> [r["steps"] for r in res.records()]   # doctest: +SKIP
"""

from __future__ import annotations

from curvlab.nqm.analysis import (
    Grid,
    SweepResult,
    paper_decay_grid,
    paper_lr_grid,
    slow_bound,
    steps_to_target,
)
from curvlab.nqm.dynamics import (
    ema_step,
    ema_system,
    ema_transition,
    momentum_step,
    momentum_system,
    momentum_transition,
    run_schedule,
    sgd_parts,
    sgd_second_moment,
    sgd_step,
)
from curvlab.nqm.problem import Problem, binned, default_problem, preconditioned, spectrum_problem
from curvlab.nqm.reference import point_risk, reference_steps, reference_sweep
from curvlab.nqm.schedule import PWCResult, optimal_pwc
from curvlab.nqm.theorems import theorem1_bound, theorem2_bound

__all__ = [
    "Grid",
    "PWCResult",
    "Problem",
    "SweepResult",
    "binned",
    "default_problem",
    "ema_step",
    "ema_system",
    "ema_transition",
    "momentum_step",
    "momentum_system",
    "momentum_transition",
    "optimal_pwc",
    "paper_decay_grid",
    "paper_lr_grid",
    "point_risk",
    "preconditioned",
    "reference_steps",
    "reference_sweep",
    "run_schedule",
    "sgd_parts",
    "sgd_second_moment",
    "sgd_step",
    "slow_bound",
    "spectrum_problem",
    "steps_to_target",
    "theorem1_bound",
    "theorem2_bound",
]
