"""Factor capture in 1 process vs 2 processes (torch.distributed, gloo) on this machine.

Work: the K-FAC factors (MC Fisher) of every layer of ``resnet8`` on 2,048 random 3×32×32 inputs in
batches of 128 (16 batches), float32 model, float64 sums — the work of ``benchmarks/factor_capture.py``.

Configurations, each started as fresh worker processes by this script and timed inside the workers
(start-up, imports and the rendezvous excluded; both processes start the clock after a barrier):

* ``1 process x 1 thread``  — the baseline of the scaling efficiency;
* ``1 process x 2 threads`` — what one process does with this machine's two cores;
* ``2 processes x 1 thread`` — ``torchrun --nproc-per-node 2`` (which sets one thread per process):
  every process takes every other batch, then one all-reduce of all factor sums.

Reported: wall seconds (median of repeats), the all-reduce's share, the per-process compute imbalance,
speed-ups and the scaling efficiency ``E = T(1 x 1) / (2 · T(2 x 1))``. The factors of the 2-process
run are checked against the 1-process ones before timing.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from typing import Any

from benchmarks.harness import write_result

NUM_EXAMPLES = 2048
BATCH_SIZE = 128
REPEAT = 3


def _worker(rank: int, world: int, threads: int, port: int, repeat: int, queue: Any) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    from curvlab import distributed
    from curvlab.capture.factors import collect_factors
    from curvlab.models import build_model

    if world > 1:
        distributed.start()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(NUM_EXAMPLES, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (NUM_EXAMPLES,), generator=gen)
    batches = [(x[i : i + BATCH_SIZE], y[i : i + BATCH_SIZE]) for i in range(0, NUM_EXAMPLES, BATCH_SIZE)]
    torch.manual_seed(0)
    model = build_model("resnet8", (3, 32, 32), 10).eval()
    collect_factors(model, batches[:world], fisher="mc")  # warm-up: allocator, kernels, the group
    runs = []
    for _ in range(repeat):
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        factors = collect_factors(model, batches, fisher="mc")
        total = time.perf_counter() - start
        runs.append(total)
    # the all-reduce alone, on sums of the factors' sizes
    sums = [torch.zeros_like(torch.from_numpy(f.A)) for f in factors.values()]
    sums += [torch.zeros_like(torch.from_numpy(f.S)) for f in factors.values()]
    reduce_times = []
    for _ in range(repeat):
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        distributed.all_reduce_sum(sums)
        reduce_times.append(time.perf_counter() - start)
    checksum = {name: (f.A.copy(), f.S.copy()) for name, f in factors.items()} if rank == 0 else None
    queue.put((rank, runs, reduce_times, checksum, sum(f.A.size + f.S.size for f in factors.values())))
    distributed.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(world: int, threads: int, repeat: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, threads, port, repeat, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=900) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise RuntimeError(f"worker exited with {p.exitcode}")
    per_rank = [r[1] for r in results]
    wall = [max(ts) for ts in zip(*per_rank, strict=True)]  # the slowest process ends the run
    return {
        "processes": world,
        "threads_per_process": threads,
        "median_s": statistics.median(wall),
        "times_s": wall,
        "all_reduce_s": statistics.median(results[0][2]),
        "per_process_median_s": [statistics.median(ts) for ts in per_rank],
        "factor_numbers": results[0][4],
        "factors": results[0][3],
    }


def _max_rel_diff(a: dict, b: dict) -> float:
    import numpy as np

    worst = 0.0
    for name, (A, S) in a.items():
        for x, y in ((A, b[name][0]), (S, b[name][1])):
            worst = max(worst, float(np.max(np.abs(x - y)) / np.max(np.abs(x))))
    return worst


def run(repeat: int = REPEAT) -> str:
    one_one = _run(1, 1, repeat)
    one_two = _run(1, 2, repeat)
    two_one = _run(2, 1, repeat)
    agreement = _max_rel_diff(one_one.pop("factors"), two_one.pop("factors"))
    one_two.pop("factors")
    efficiency = one_one["median_s"] / (2 * two_one["median_s"])
    result = {
        "work": f"resnet8 MC-Fisher factors, {NUM_EXAMPLES} x 3x32x32, batch {BATCH_SIZE}, float32 model",
        "configurations": [one_one, one_two, two_one],
        "speedup_2proc_vs_1x1": one_one["median_s"] / two_one["median_s"],
        "speedup_2proc_vs_1x2": one_two["median_s"] / two_one["median_s"],
        "speedup_2threads_vs_1x1": one_one["median_s"] / one_two["median_s"],
        "scaling_efficiency": efficiency,
        "all_reduce_share": two_one["all_reduce_s"] / two_one["median_s"],
        "factors_max_rel_diff_2proc_vs_1proc": agreement,
        "load_average_at_end": os.getloadavg(),
    }
    write_result("distributed", result)
    return (
        f"distributed factor capture (resnet8): 2 processes x 1 thread {two_one['median_s']:.2f} s vs "
        f"1 x 1 {one_one['median_s']:.2f} s (speed-up {result['speedup_2proc_vs_1x1']:.2f}, efficiency "
        f"{efficiency:.2f}) vs 1 x 2 threads {one_two['median_s']:.2f} s; all-reduce "
        f"{100 * result['all_reduce_share']:.1f}% of the run; factors agree to {agreement:.1e}"
    )


if __name__ == "__main__":
    print(run(int(sys.argv[1]) if len(sys.argv) > 1 else REPEAT))
