"""``curvlab sweep``: steps to a target against the batch size on a real network, every batch size tuned.

The experiment behind the paper's main claims (Zhang et al. 2019; protocol of Shallue et al. 2018):
for each optimizer (sgd, momentum, adam, kfac) and batch size, a quasi-random search over the F.3
schedule and the F.4 hyper-parameters, each trial trained until a target holds; the best
configuration re-run over fresh seeds; McCandlish et al.'s ``S(B) = S_min (1 + B_crit / B)`` fitted
to the result. One module per concept:

* :mod:`~curvlab.sweep.config` — :class:`SweepConfig`, the target and the evaluation cadence;
* :mod:`~curvlab.sweep.space` — the search ranges and the Sobol sampler;
* :mod:`~curvlab.sweep.trial` — one trial (``curvlab train``'s run and update loop, in memory);
* :mod:`~curvlab.sweep.study` — the Optuna studies, the workers, resumption after a kill;
* :mod:`~curvlab.sweep.results` — ``results.json`` from the storage, :func:`load_results`;
* :mod:`~curvlab.sweep.run` — one invocation of the command (:func:`sweep`, :func:`join`).

The ``S(B)`` fit is :mod:`curvlab.analysis.scaling`; the plot :mod:`curvlab.plots.sweep`. See
docs/sweep.md. Importing this package imports neither torch nor optuna.
"""

from __future__ import annotations

from curvlab.sweep.config import SweepConfig, evaluation_steps, parse_target

__all__ = [
    "SweepConfig", "evaluation_steps", "join", "load_results", "measured_curve", "parse_target", "sweep",
]


def __getattr__(name: str):
    if name in ("sweep", "join"):
        from curvlab.sweep import run

        return getattr(run, name)
    if name in ("load_results", "measured_curve"):
        from curvlab.sweep import results

        return getattr(results, name)
    raise AttributeError(name)
