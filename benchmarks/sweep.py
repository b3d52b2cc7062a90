"""``curvlab sweep`` throughput: trials per hour with 1 and 2 worker processes, and the study database's
overhead per trial.

The work is fixed: mlp on digits, SGD, batch sizes 32 and 128, 8 search trials each, 150 steps per trial
with the target unreachable (``loss=0``), so every trial trains its whole budget and no seed re-runs
follow. Three runs in one process, on the same machine and load:

* ``direct``: the same 16 trials (the same Sobol points) through :func:`curvlab.sweep.trial.run_trial`
  in a loop, no Optuna — the floor;
* ``workers=1``: ``curvlab.sweep.sweep`` in this process, one torch thread (a fresh SQLite database);
* ``workers=2``: two worker processes, one thread each.

Reported: trials per hour of each, the scaling efficiency ``rate(2) / (2 · rate(1))``, and the
database's overhead per trial ``(t(workers=1) − t(direct)) / 16`` in seconds and as a share of a trial.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import write_result

TRIALS = 8
BATCH_SIZES = [32, 128]


def _config():
    from curvlab.sweep.config import SweepConfig

    return SweepConfig(model="mlp", data="digits", optimizers=["sgd"], batch_sizes=BATCH_SIZES,
                       target="loss=0", trials=TRIALS, max_steps=150, seeds=1, eval_every="10").check()


def _direct(config) -> float:
    from curvlab.sweep.space import sobol_point, space_for, study_seed, to_train_fields
    from curvlab.sweep.study import search_name
    from curvlab.sweep.trial import load_splits, run_trial

    data = load_splits(config)
    space = space_for("sgd", config.space)
    names = list(space)
    start = time.perf_counter()
    for b in BATCH_SIZES:
        seed = study_seed(search_name("sgd", b))
        for n in range(TRIALS):
            u = sobol_point(len(names), n, seed)
            params = {k: space[k].low * (space[k].high / space[k].low) ** u[i] for i, k in enumerate(names)}
            run_trial(config, "sgd", b, to_train_fields(params, config.max_steps), config.seed, data=data)
    return time.perf_counter() - start


def _sweep(config, workers: int) -> float:
    from curvlab.sweep import sweep

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        sweep(config, str(Path(tmp) / "s"), workers=workers, threads=1, replicates=10)
        return time.perf_counter() - start


def run() -> str:
    torch.set_num_threads(1)
    config = _config()
    n = TRIALS * len(BATCH_SIZES)
    direct = _direct(config)
    one = _sweep(config, 1)
    two = _sweep(config, 2)
    rate = {k: 3600 * n / t for k, t in (("direct", direct), ("workers_1", one), ("workers_2", two))}
    overhead = (one - direct) / n
    result = {
        "work": f"mlp on digits, sgd, batch sizes {BATCH_SIZES}, {TRIALS} trials each, 150 steps per trial",
        "trials": n,
        "seconds": {"direct": direct, "workers_1": one, "workers_2": two},
        "trials_per_hour": rate,
        "scaling_efficiency_2_workers": rate["workers_2"] / (2 * rate["workers_1"]),
        "db_overhead_s_per_trial": overhead,
        "db_overhead_share_of_trial": overhead / (direct / n),
        "notes": "2-core machine shared with other jobs; workers=2 includes starting 2 processes (spawn, "
        "import torch) and the sweep's end (results, bootstrap with 10 replicates, plot)",
    }
    write_result("sweep", result)
    return (f"sweep: {rate['workers_1']:.0f} trials/h with 1 worker, {rate['workers_2']:.0f} with 2 "
            f"(efficiency {result['scaling_efficiency_2_workers']:.2f}); database overhead "
            f"{overhead:.3f} s per trial")


if __name__ == "__main__":
    print(run())
