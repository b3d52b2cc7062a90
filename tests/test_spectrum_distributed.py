"""``curvlab spectrum`` under torchrun: the eigendecompositions shared out, the single-process file.

The multi-process runs are real: ``torchrun --standalone`` starts two ``python -m curvlab`` processes in
a gloo group; each decomposes its share of every step and sends it to process 0, which writes the file.
The reference is the same command in one process (same environment: one thread per process).

Tolerance: none. Each ``eigh`` call of one process is made, with the same factors in the same order,
by exactly one process of the group (``plan_batches``), and the results travel bit for bit, so every
dataset and attribute must be *equal*, eigenvectors included (no sign freedom is used: the same call
returns the same signs). A rounding-level difference would mean a factor was decomposed in another
call, e.g. at another offset of a batch, where MKL rounds differently (see ``plan_batches``).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from test_spectrum import write_checkpoint
from torchrun_util import free_port, h5_differences, start_rank, torchrun

from curvlab.analysis.spectrum import (
    DEFAULT_BATCH_BYTES,
    assign_batches,
    assign_factors,
    decompose_factors,
    factor_cost,
    plan_batches,
)
from curvlab.analysis.spectrum.sharing import _lightest_share_first
from curvlab.commands import main

# ------------------------------------------------------------------------------- sharing out the work


def loads(sizes, owner, world_size) -> list[int]:
    total = [0] * world_size
    for key, n, kind in sizes:
        total[owner[key]] += factor_cost(n, kind)
    return total


def random_sizes(rng, count: int) -> list:
    return [(f"f{k}", int(rng.integers(1, 60)), "dense" if rng.random() < 0.8 else "diagonal")
            for k in range(count)]


def test_every_factor_goes_to_exactly_one_process():
    sizes = random_sizes(np.random.default_rng(0), 40)
    owner = assign_factors(sizes, 3)
    assert list(owner) == [key for key, _, _ in sizes]  # every factor once, in the order given
    assert set(owner.values()) == {0, 1, 2}
    assert assign_factors(sizes, 3) == owner  # deterministic


def test_one_process_gets_everything_and_spare_processes_get_nothing():
    sizes = [("a", 10, "dense"), ("b", 30, "dense"), ("c", 500, "diagonal")]
    assert set(assign_factors(sizes, 1).values()) == {0}
    # Largest first, each to the least-loaded process, ties to the lowest rank: b, a, c on 0, 1, 2.
    assert assign_factors(sizes, 5) == {"b": 0, "a": 1, "c": 2}
    assert assign_factors([], 4) == {}


def test_largest_first_to_the_least_loaded_with_ties_to_the_lowest_rank():
    # Costs: dense 30, 20, 20, 10 -> 27000, 8000, 8000, 1000; a diagonal of 5000 -> 5000 (cost n).
    sizes = [("s", 10, "dense"), ("d", 5000, "diagonal"), ("x", 20, "dense"), ("y", 20, "dense"),
             ("big", 30, "dense")]
    # big -> 0 (27000); then 1 stays the least loaded: x (8000), y (16000), d (21000), s (22000).
    assert assign_factors(sizes, 2) == {"s": 1, "d": 1, "x": 1, "y": 1, "big": 0}
    # Equal costs keep their order and fill the processes from rank 0.
    assert assign_factors([("p", 7, "dense"), ("q", 7, "dense"), ("r", 7, "dense")], 3) == {
        "p": 0, "q": 1, "r": 2}


def test_balance_is_within_grahams_bounds():
    """max load <= (4/3 - 1/(3W)) * optimum (brute force over all assignments) and <= mean + largest."""
    rng = np.random.default_rng(1)
    for _ in range(25):
        world_size = int(rng.integers(2, 4))
        sizes = random_sizes(rng, int(rng.integers(1, 8)))
        got = max(loads(sizes, assign_factors(sizes, world_size), world_size))
        costs = [factor_cost(n, kind) for _, n, kind in sizes]
        best = min(
            max(sum(c for c, r in zip(costs, ranks, strict=True) if r == rank) for rank in range(world_size))
            for ranks in itertools.product(range(world_size), repeat=len(sizes))
        )
        assert got <= (4 / 3 - 1 / (3 * world_size)) * best + 1e-9
        assert got <= sum(costs) / world_size + max(costs)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="world_size"):
        assign_factors([("a", 3, "dense")], 0)
    with pytest.raises(ValueError, match="twice"):
        assign_factors([("a", 3, "dense"), ("a", 4, "dense")], 2)
    with pytest.raises(ValueError, match="kind"):
        assign_factors([("a", 3, "sparse")], 2)


def test_batches_stay_together_and_are_the_engines_eigh_calls(monkeypatch):
    """``plan_batches`` gives exactly the ``eigh`` calls ``decompose_factors`` makes (spied), and
    ``assign_batches`` hands each of them whole to one process."""
    rng = np.random.default_rng(2)
    sizes = [((f"l{k // 2}", "SA"[k % 2]), n, kind) for k, (n, kind) in enumerate(
        [(20, "dense"), (7, "diagonal"), (20, "dense"), (9, "dense"), (40, "dense"), (20, "dense"),
         (9, "dense"), (40, "dense"), (5, "diagonal"), (20, "dense")])]
    budget = 3 * 20 * 20 * 8  # three 20 x 20 float64 factors fill a batch
    batches = plan_batches(sizes, "float64", budget)
    calls: list[tuple[int, ...]] = []
    real = torch.linalg.eigh

    def spy(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", spy)
    items = [(key, np.diag(rng.random(n) + 1) if kind == "dense" else rng.random(n) + 1)
             for key, n, kind in sizes]
    order = [key for key, _ in decompose_factors(items, batch_bytes=budget)]
    assert order == [key for batch in batches for key, _, _ in batch]  # the same calls, in order
    dense = [batch for batch in batches if batch[0][2] == "dense"]
    assert calls == [(len(batch), batch[0][1], batch[0][1]) for batch in dense]
    assert max(len(batch) for batch in batches) == 3
    ranks = assign_batches(batches, 2)
    assert len(ranks) == len(batches) and set(ranks) == {0, 1}
    assert plan_batches(sizes, "float64", DEFAULT_BATCH_BYTES["cpu"]) == plan_batches(
        sizes, "float64", DEFAULT_BATCH_BYTES["cpu"])


# ------------------------------------------------------------------------- one process vs two, end to end


def mixed_checkpoint(path: Path) -> None:
    """Dense float64, dense float32 and diagonal factors, written with plain h5py (docs/format.md)."""
    rng = np.random.default_rng(3)

    def psd(n: int, dtype=np.float64) -> np.ndarray:
        x = rng.standard_normal((3 * n, n)) * np.linspace(1, 3, n)
        return ((x.T @ x + (x.T @ x).T) / (6 * n)).astype(dtype)

    write_checkpoint(path, {
        "fc": ("Linear", (16, 8), True, psd(9), psd(16)),
        "embed": ("Embedding", (40, 12), False, rng.random(40) + 0.05, psd(12, np.float32)),
        "decoder": ("TiedEmbedding", (30, 8), False, psd(8), rng.random(30) + 0.01),
        "fc2": ("Linear", (9, 16), False, psd(16), psd(9)),
    })


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """mlp on digits with two steps (layers 64->128->128->10), simple_cnn (two convs, two Linear),
    and a hand-written one with diagonal and float32 factors."""
    folder = tmp_path_factory.mktemp("ckpts")
    mlp, cnn, hand = folder / "mlp.h5", folder / "cnn.h5", folder / "hand.h5"
    base = ["factors", "--model", "mlp", "--examples", "200", "--quiet", "-o", str(mlp)]
    assert main(base) == 0
    assert main([*base, "--seed", "1", "--append", "--as-step", "1"]) == 0
    assert main(["factors", "--model", "simple_cnn", "--examples", "100", "--quiet", "-o", str(cnn)]) == 0
    mixed_checkpoint(hand)
    return {"mlp": mlp, "cnn": cnn, "hand": hand}


CASES = {
    "mlp, every step, eigenvectors": ("mlp", ["--step", "all"]),
    "cnn, no eigenvectors, float32 eigh": ("cnn", ["--no-vectors", "--dtype", "float32"]),
    "diagonal and float32 factors, float32 eigenvectors": ("hand", ["--dtype", "float32"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_write_the_single_process_file(checkpoints, tmp_path, case):
    name, args = CASES[case]
    command = ["spectrum", str(checkpoints[name]), *args, "--json", "--quiet", "-o", "spectrum.h5"]
    runs = {}
    for nproc in (1, 2):
        cwd = tmp_path / f"nproc{nproc}"  # the same relative -o: the JSON summaries can be equal
        cwd.mkdir()
        runs[nproc] = torchrun(command, cwd=cwd, nproc=nproc)
        assert runs[nproc].returncode == 0, runs[nproc].stderr
    lines = runs[2].stdout.splitlines()
    assert len(lines) == 1, runs[2].stdout  # process 0 alone prints
    assert json.loads(lines[0]) == json.loads(runs[1].stdout)
    one, two = tmp_path / "nproc1" / "spectrum.h5", tmp_path / "nproc2" / "spectrum.h5"
    assert h5_differences(one, two) == []  # exactly equal (see the module docstring)
    with h5py.File(one, "r") as f:
        steps = list(f["steps"])
        layers = f["steps"][steps[-1]]["layers"]
        some_layer = layers[next(iter(layers))]
        assert ("S_eigenvectors" in some_layer or "S_order" in some_layer) == ("--no-vectors" not in args)
    assert len(steps) == (2 if name == "mlp" else 1)
    assert sorted(p.name for p in (tmp_path / "nproc2").iterdir()) == ["spectrum.h5"]  # no temp files


def test_a_failed_decomposition_names_its_factor_and_stops_process_0(tmp_path):
    """An indefinite factor decomposed by process 1: one CheckpointError line there (exit 2), one
    DistributedError line on process 0 (exit 1), no output file."""
    ckpt = tmp_path / "bad.h5"
    mixed_checkpoint(ckpt)
    with h5py.File(ckpt, "r+") as f:
        # Passes the reader's checks (|X_ij| <= sqrt(X_ii X_jj)) but has eigenvalue -0.8.
        del f["steps/7/factors/fc2/S"]
        f["steps/7/factors/fc2/S"] = np.kron(np.eye(3), [[1, 0.9, -0.9], [0.9, 1, 0.9], [-0.9, 0.9, 1]])
    sizes = [(("fc", "S"), 16, "dense"), (("fc", "A"), 9, "dense"), (("embed", "S"), 12, "dense"),
             (("embed", "A"), 40, "diagonal"), (("decoder", "S"), 30, "diagonal"),
             (("decoder", "A"), 8, "dense"), (("fc2", "S"), 9, "dense"), (("fc2", "A"), 16, "dense")]
    batches = plan_batches(sizes, "float64", DEFAULT_BATCH_BYTES["cpu"])
    assigned = assign_batches(batches, 2)
    first = {key: r for batch, r in zip(batches, assigned, strict=True) for key, _, _ in batch}
    assert first[("fc2", "S")] == 1
    # then the lighter share (the 9s) is renumbered to process 0, which receives after its own work
    final = _lightest_share_first(assigned, batches, 2)
    owner = {key: rank for batch, rank in zip(batches, final, strict=True) for key, _, _ in batch}
    assert owner[("fc2", "S")] == 0 and owner[("fc", "S")] == 1
    port = free_port()
    args = ["spectrum", str(ckpt), "--quiet", "-o", "out.h5"]
    ranks = [start_rank(args, rank=r, world_size=2, port=port, cwd=tmp_path, CURVLAB_DIST_TIMEOUT="30")
             for r in (0, 1)]
    errors = [p.communicate(timeout=120)[1] for p in ranks]
    for err in errors:
        assert len([line for line in err.splitlines() if line.strip()]) == 1 and "Traceback" not in err, err
    assert ranks[0].returncode == 2
    assert f"curvlab: error: process 0 of 2: {ckpt}: step 7: layer fc2: factor S is not positive " \
        "semi-definite" in errors[0]
    assert ranks[1].returncode == 1
    assert "process 1 of 2: sending the eigendecompositions of step 7" in errors[1]
    assert "lost the other processes" in errors[1]
    assert not (tmp_path / "out.h5").exists()
