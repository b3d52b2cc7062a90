"""Several processes (torchrun, gloo on CPU) give the single-process results; a lost peer stops the others.

The multi-process runs are real: ``torchrun --standalone`` starts 2 or 3 ``python -m curvlab`` processes that
join a gloo group, each takes every W-th batch, the sums are all-reduced and process 0 writes the file. The
single-process reference is the same command without torchrun. Sums of the same per-batch terms in another
order differ by rounding only: ``rtol`` 1e-12 relative to each dataset's largest value is ~10^4 float64 ulps,
far below any real difference (a missing or doubled batch changes a factor by >1e-3).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import struct
import termios
import threading
import time

import h5py
import numpy as np
import pytest
import torch
from torchrun_util import free_port, h5_differences, process_env, start_rank, torchrun

from curvlab import distributed
from curvlab.commands import main

ORDER_RTOL = 1e-12  # float64 sums of the same terms in another order (see the module docstring)

TINY_TRANSFORMER = ["--model", "transformer_shallow", "--model-arg", "d_model=32", "--model-arg", "d_ff=64",
                    "--model-arg", "layers=1", "--model-arg", "seq_len=16", "--model-arg", "vocab=200"]


# ------------------------------------------------------------------------------------------ pieces


def test_single_process_context_is_the_identity():
    ctx = distributed.context()
    assert (ctx.rank, ctx.world_size, ctx.active, ctx.is_main) == (0, 1, False, True)
    assert list(distributed.my_batches("abc")) == [(0, "a"), (1, "b"), (2, "c")]
    t = torch.arange(3.0)
    distributed.all_reduce_sum([t])
    assert t.tolist() == [0.0, 1.0, 2.0]
    assert distributed.all_reduce_max_int([3, 1], "x") == [3, 1]
    distributed.barrier("x")


def test_batches_are_dealt_round_robin_to_every_process_exactly_once():
    dealt = [
        [k for k, _ in distributed.my_batches(range(7), distributed.Context(rank, 3))] for rank in range(3)
    ]
    assert dealt == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(dealt, [])) == list(range(7))


def test_batch_seeds_depend_on_seed_and_index_only():
    seeds = {distributed.batch_seed(s, k) for s in range(4) for k in range(50)}
    assert len(seeds) == 200
    assert distributed.batch_seed(3, 17) == distributed.batch_seed(3, 17)


@pytest.mark.parametrize("value", ["0", "-3", "soon"])
def test_bad_timeout_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv(distributed.TIMEOUT_ENV, value)
    with pytest.raises(distributed.OptionError, match="CURVLAB_DIST_TIMEOUT"):
        distributed.timeout_seconds()


def test_launched_reads_world_size(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.launched()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not distributed.launched()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.launched()


def test_single_process_commands_refuse_torchrun(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["info", str(tmp_path / "x.h5")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "curvlab info runs in one process" in err


# -------------------------------------------------------------------------- same results as one process


@pytest.mark.parametrize(
    ("nproc", "args"),
    [
        # 5 batches (4 of 64, one of 44) over 2 processes: 3 and 2 batches, 192 and 108 examples
        (2, ["--model", "mlp", "--examples", "300", "--batch-size", "64", "--fisher", "mc",
             "--mc-samples", "2"]),
        # 2 batches over 3 processes: process 2 sees no data and contributes zeros of the right shapes
        (3, ["--model", "mlp", "--examples", "100", "--batch-size", "64", "--fisher", "exact"]),
        # convolutions, and the tied embedding / pre-softmax weight of a Transformer
        (2, ["--model", "simple_cnn", "--examples", "90", "--batch-size", "32", "--fisher", "empirical"]),
        (2, [*TINY_TRANSFORMER, "--examples", "40", "--batch-size", "16", "--fisher", "mc"]),
    ],
    ids=["mlp-mc-uneven", "mlp-exact-empty-process", "cnn-empirical", "transformer-tied"],
)
def test_factors_under_torchrun_write_the_single_process_checkpoint(tmp_path, nproc, args):
    one = torchrun(["factors", *args, "--quiet", "-o", "one.h5"], cwd=tmp_path, nproc=1)
    # the mlp case starts the installed `curvlab` script under torchrun, the others `-m curvlab`
    many = torchrun(["factors", *args, "--quiet", "--json", "-o", "many.h5"], cwd=tmp_path, nproc=nproc,
                    entry_point=args[1] == "mlp" and nproc == 2)
    assert one.returncode == 0, one.stderr
    assert many.returncode == 0, many.stderr
    assert h5_differences(tmp_path / "one.h5", tmp_path / "many.h5", rtol=ORDER_RTOL) == []
    summary = [line for line in many.stdout.splitlines() if line.startswith("{")]
    assert len(summary) == 1  # only process 0 prints
    with h5py.File(tmp_path / "one.h5") as f:
        assert json.loads(summary[0])["num_examples"] == int(f["steps/0"].attrs["num_examples"])


def test_gradcov_under_torchrun_equals_one_process(tmp_path):
    assert torchrun(["factors", "--model", "mlp", "--examples", "200", "--quiet", "-o", "ck.h5"],
                    cwd=tmp_path, nproc=1).returncode == 0
    # 3 batches of 64 and one of 8 over 2 processes; mc curvature (per-batch seeds) and 2 jvp directions
    args = ["gradcov", "ck.h5", "--examples", "200", "--batch-size", "64", "--curvature", "mc",
            "--mc-samples", "2", "--directions", "2", "--quiet", "--json"]
    one = torchrun([*args, "-o", "one.h5"], cwd=tmp_path, nproc=1)
    many = torchrun([*args, "-o", "many.h5"], cwd=tmp_path, nproc=2)
    assert one.returncode == 0, one.stderr
    assert many.returncode == 0, many.stderr
    differences = h5_differences(tmp_path / "one.h5", tmp_path / "many.h5", rtol=ORDER_RTOL,
                                 skip=lambda name: name.endswith("@source"))
    assert differences == []
    a, b = json.loads(one.stdout), json.loads(many.stdout.strip().splitlines()[-1])
    assert a["num_examples"] == b["num_examples"] == 200
    assert a["spearman"] == pytest.approx(b["spearman"], rel=1e-12)


# ----------------------------------------------------------------------------------- lost processes

FACTORS = ["factors", "--model", "mlp", "--examples", "300", "--batch-size", "64", "--quiet"]


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("curvlab:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return lines[0]


def test_a_process_that_never_comes_stops_the_others_after_the_timeout(tmp_path):
    start = time.monotonic()
    rank0 = start_rank([*FACTORS, "-o", "x.h5"], rank=0, world_size=2, port=free_port(), cwd=tmp_path,
                       CURVLAB_DIST_TIMEOUT="3")
    _, err = rank0.communicate(timeout=120)
    assert rank0.returncode == 1
    line = _error_line(err)
    assert "process 0 of 2: could not join the process group" in line and "within 3 s" in line
    assert time.monotonic() - start < 60
    assert not (tmp_path / "x.h5").exists()


def test_a_process_that_fails_stops_the_others_with_one_line(tmp_path):
    port = free_port()
    rank0 = start_rank([*FACTORS, "-o", "x.h5"], rank=0, world_size=2, port=port, cwd=tmp_path)
    rank1 = start_rank([*FACTORS, "--data", "npz:missing.npz", "-o", "x.h5"], rank=1, world_size=2, port=port,
                       cwd=tmp_path)
    _, err1 = rank1.communicate(timeout=120)
    _, err0 = rank0.communicate(timeout=120)
    assert rank1.returncode == 2 and "process 1 of 2: " in _error_line(err1)
    assert rank0.returncode == 1
    assert "process 0 of 2: checking the options: lost the other processes" in _error_line(err0)
    assert not (tmp_path / "x.h5").exists()


def test_a_killed_process_stops_the_others(tmp_path):
    """SIGKILL process 1 as soon as process 0 shows its progress bar (both have passed the start barrier,
    so process 1 is at work): process 0 finishes its batches, then its all-reduce fails — one line, no
    file, no hang. Process 0's stderr is a pseudo-terminal: progress bars are drawn only on one."""
    port = free_port()
    args = [*FACTORS[:-1], "--examples", "1797", "--batch-size", "16", "--fisher", "exact", "-o", "x.h5"]
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # tqdm needs a width
    rank0 = start_rank(args, rank=0, world_size=2, port=port, cwd=tmp_path, stderr=slave)
    os.close(slave)
    rank1 = start_rank(args, rank=1, world_size=2, port=port, cwd=tmp_path)
    seen: list[str] = []
    started = threading.Event()

    def read_progress() -> None:
        while True:
            try:
                chunk = os.read(master, 1024).decode(errors="replace")
            except OSError:  # the process has closed the terminal
                break
            if not chunk:
                break
            seen.append(chunk)
            if "factors" in "".join(seen)[-256:]:
                started.set()

    reader = threading.Thread(target=read_progress, daemon=True)
    reader.start()
    assert started.wait(timeout=120), "".join(seen)
    rank1.send_signal(signal.SIGKILL)
    rank1.communicate(timeout=60)
    rank0.wait(timeout=120)
    reader.join(timeout=10)
    os.close(master)
    err0 = "".join(seen)
    assert rank0.returncode == 1, err0
    line = [ln for ln in err0.replace("\r", "\n").splitlines() if ln.startswith("curvlab:")]
    assert len(line) == 1 and "process 0 of 2: " in line[0] and "lost the other processes" in line[0], err0
    assert "Connection closed by peer" in line[0] and "GLHF" not in line[0]  # gloo's first sentence only
    assert "Traceback" not in err0
    assert not (tmp_path / "x.h5").exists()


def test_process_env_has_no_group_variables():
    env = process_env()
    assert "WORLD_SIZE" not in env and env["OMP_NUM_THREADS"] == "1"
    assert np.isfinite(float(env["CURVLAB_DIST_TIMEOUT"]))


def test_nested_stages_name_the_outer_one_first(monkeypatch):
    monkeypatch.setattr(distributed, "context", lambda: distributed.Context(1, 2))
    with pytest.raises(distributed.DistributedError) as info:
        with distributed.collective("step 5"):
            with distributed.collective("adding up the factor sums"):
                raise RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:4. This is typically")
    text = str(info.value)
    assert text.startswith("process 1 of 2: step 5: adding up the factor sums: lost the other processes "
                           "(Connection closed by peer [127.0.0.1]:4); one of them died")


def test_processes_that_choose_different_steps_stop_with_one_line(tmp_path):
    """Each process picks the step of --weights itself (the latest, unless given): if they disagree (a
    checkpoint appended to while it is read, here forced by different --step options) every process
    stops before any work with exit status 2."""
    base = ["factors", "--model", "mlp", "--examples", "64", "--quiet"]
    assert torchrun([*base, "-o", "ck.h5"], cwd=tmp_path, nproc=1).returncode == 0
    appended = torchrun([*base, "--append", "--as-step", "5", "-o", "ck.h5"], cwd=tmp_path, nproc=1)
    assert appended.returncode == 0
    port = free_port()
    ranks = [start_rank(["factors", "--weights", "ck.h5", "--step", step, "--examples", "64", "--quiet",
                         "-o", "x.h5"], rank=r, world_size=2, port=port, cwd=tmp_path)
             for r, step in enumerate(("0", "5"))]
    errors = [p.communicate(timeout=120)[1] for p in ranks]
    assert [p.returncode for p in ranks] == [2, 2]
    for rank, err in enumerate(errors):
        line = _error_line(err)
        assert f"process {rank} of 2: ck.h5: the step of --weights: the processes disagree" in line
    assert not (tmp_path / "x.h5").exists()


def test_only_transport_failures_are_called_lost_peers():
    assert distributed._lost_peer(RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:4"))
    assert distributed._lost_peer(RuntimeError("Timed out waiting 60000ms for recv operation to complete"))
    assert not distributed._lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    singular = torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge (timeout)")
    assert not distributed._lost_peer(singular)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        with distributed.collective("step 3"):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")
