"""The Fig. 14c sweep of the NQM in exact mode: curvlab's vectorised search vs the straightforward loop.

Work: steps to reach risk 0.01 on the default problem (d = 10^4, h_i = 1/i, c_i = h_i, exact mode) with
tuned heavy-ball momentum — a 100 learning-rate × 20 momentum grid (the authors' notebook grids) — for
10 batch sizes 2^2, 2^4, …, 2^20 and the 4 preconditioning powers 0, 0.25, 0.5, 0.75 of Fig. 14c:
80,000 (batch size, setting) pairs, each needing a bisection over t ∈ [0, 10^9].

* ``curvlab`` — :func:`curvlab.nqm.steps_to_target` (binned screening, exact bisection of candidates,
  exact verification of every grid point at the best step count).
* ``reference`` — :func:`curvlab.nqm.reference_sweep`: a Python loop over batch sizes and grid points,
  each point with its own scalar bisection over t, the closed form evaluated over the 10^4 dimensions
  at every probe (what a reference implementation does; stepping the recursion instead would take
  ~10^6 iterations per probe). The full loop would take about an hour, so it is timed on a sub-grid —
  every 10th learning rate × every 4th momentum (50 settings) at p = 0, all 10 batch sizes — and
  extrapolated linearly in the number of pairs. The ratio is extrapolated; the JSON says so.

Same answers, on the sub-grid: the reference loop's minimum steps and minimiser per batch size equal
curvlab's (screened search on the same sub-grid), and every one of the 500 per-pair step counts equals
curvlab's exhaustive vectorised bisection.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from benchmarks.harness import write_result
from curvlab.nqm.analysis import Grid, paper_decay_grid, paper_lr_grid, steps_to_target
from curvlab.nqm.problem import default_problem
from curvlab.nqm.reference import reference_steps, reference_sweep

TARGET = 0.01
POWERS = (0.0, 0.25, 0.5, 0.75)
BATCH = [2**k for k in range(2, 21, 2)]


def _full_grid(p: float) -> Grid:
    return Grid("momentum", paper_lr_grid("momentum"), paper_decay_grid(), p)


def _sub_grid(p: float) -> Grid:
    return Grid("momentum", paper_lr_grid("momentum")[::10], paper_decay_grid()[::4], p)


def run() -> str:
    problem = default_problem()
    load_before = os.getloadavg()
    # curvlab: the full sweep, all four powers
    start, cpu = time.perf_counter(), time.process_time()
    fast = {p: steps_to_target(problem, TARGET, BATCH, _full_grid(p)) for p in POWERS}
    fast_s, fast_cpu = time.perf_counter() - start, time.process_time() - cpu
    pairs_full = len(POWERS) * len(BATCH) * _full_grid(0.0).size

    # reference loop on the sub-grid (p = 0), timed
    sub = _sub_grid(0.0)
    start, cpu = time.perf_counter(), time.process_time()
    ref = reference_sweep(problem, TARGET, BATCH, sub)
    ref_sub_s, ref_sub_cpu = time.perf_counter() - start, time.process_time() - cpu
    pairs_sub = len(BATCH) * sub.size
    ref_full_s = ref_sub_s * pairs_full / pairs_sub
    ref_full_cpu = ref_sub_cpu * pairs_full / pairs_sub

    # same answers on the sub-grid: minimum and minimiser, and every per-pair step count
    mine = steps_to_target(problem, TARGET, BATCH, sub)
    same_best = bool(np.array_equal(mine.steps, ref.steps) and np.array_equal(mine.lr, ref.lr)
                     and np.array_equal(mine.decay, ref.decay))
    grid_steps = steps_to_target(problem, TARGET, BATCH, sub, strategy="exhaustive").steps_grid
    per_pair = np.array([[reference_steps(problem, "momentum", float(sub.point(g)[0]), float(sub.point(g)[1]),
                                          0.0, b, TARGET) for g in range(sub.size)] for b in BATCH])
    same_pairs = bool(np.array_equal(grid_steps.reshape(len(BATCH), -1), per_pair))

    ratio = ref_full_s / fast_s
    result = {
        "work": "Fig. 14c sweep: tuned momentum, exact mode d=10^4, 100 lr x 20 momentum grid, "
        f"{len(BATCH)} batch sizes x {len(POWERS)} preconditioning powers = {pairs_full} pairs, "
        f"target {TARGET}",
        "curvlab_s": fast_s,
        "curvlab_cpu_s": fast_cpu,
        "reference_subset": {
            "pairs": pairs_sub,
            "grid": "lrs[::10] x momenta[::4], p = 0, all batch sizes",
            "seconds": ref_sub_s,
            "cpu_seconds": ref_sub_cpu,
            "per_pair_s": ref_sub_s / pairs_sub,
        },
        "reference_full_s_extrapolated": ref_full_s,
        "reference_full_cpu_s_extrapolated": ref_full_cpu,
        "speedup_vs_reference_extrapolated": ratio,
        "cpu_speedup_vs_reference_extrapolated": ref_full_cpu / fast_cpu,
        "note": "the reference loop is timed on the subset and extrapolated linearly in the number of pairs; "
        "wall and process (CPU) times are both reported because other jobs may share the machine",
        "same_best_on_subset": same_best,
        "same_steps_all_subset_pairs": same_pairs,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "curvlab_stats": {str(p): fast[p].stats for p in POWERS},
        "results": {str(p): fast[p].records() for p in POWERS},
    }
    write_result("nqm_sweep", result)
    return (
        f"nqm_sweep: Fig. 14c exact sweep ({pairs_full} pairs) curvlab {fast_s:.1f} s "
        f"(CPU {fast_cpu:.1f} s) vs reference loop ~{ref_full_s:.0f} s (CPU ~{ref_full_cpu:.0f} s, "
        f"extrapolated from {pairs_sub} pairs) "
        f"= {ratio:.0f}x wall, {ref_full_cpu / fast_cpu:.0f}x CPU; same answers on the subset: "
        f"{same_best and same_pairs}"
    )


if __name__ == "__main__":
    print(run())
    sys.exit(0)
