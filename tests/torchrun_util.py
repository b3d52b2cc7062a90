"""Helpers for the multi-process tests: start ``curvlab`` under ``torchrun`` (gloo on CPU), start
single ranks by hand, and compare two HDF5 files dataset by dataset and attribute by attribute."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import h5py
import numpy as np

# Every multi-process run is bounded: a hang fails the test instead of stalling the suite.
RUN_TIMEOUT_S = 240


def process_env(**extra: str) -> dict[str, str]:
    """The environment of a test process: one thread each (two processes share two cores)."""
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CURVLAB_DIST_TIMEOUT": "60"})
    if os.path.exists("/sys/class/net/lo"):  # one machine: gloo over loopback, whatever the hostname is
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env.update(extra)
    return env


def torchrun(args: Sequence[str], *, cwd: Path, nproc: int = 2, timeout: float = RUN_TIMEOUT_S,
             entry_point: bool = False, **env: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N -m curvlab ARGS`` (``nproc=1``: plain ``python -m``);
    ``entry_point``: torchrun starts the installed ``curvlab`` script instead of ``-m curvlab``."""
    program = [str(Path(sys.executable).parent / "curvlab")] if entry_point else ["-m", "curvlab"]
    if nproc == 1:
        command = [sys.executable, "-m", "curvlab", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   *program, *args]
    return subprocess.run(command, cwd=cwd, env=process_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_rank(args: Sequence[str], *, rank: int, world_size: int, port: int, cwd: Path,
               stderr: int | None = None, **env: str) -> subprocess.Popen:
    """One process of a group, started by hand the way torchrun would (no agent watching it).
    ``stderr``: a file descriptor for its stderr (e.g. a pseudo-terminal's), default a pipe."""
    extra = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **env}
    return subprocess.Popen([sys.executable, "-m", "curvlab", *args], cwd=cwd, env=process_env(**extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE if stderr is None else stderr,
                            text=True)


def h5_differences(a: Path, b: Path, *, rtol: float = 0.0, atol: float = 0.0,
                   skip: Callable[[str], bool] = lambda name: False) -> list[str]:
    """Every place where two HDF5 files differ: structure, attributes, dataset values beyond tolerance.

    Floating-point datasets are compared with ``|x - y| <= atol + rtol * max|x|`` (relative to the
    dataset's largest value: sums of the same terms in another order differ by rounding only).
    """
    found: list[str] = []

    def same_value(x: object, y: object) -> bool:
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape:
            return False
        if np.issubdtype(x.dtype, np.floating) and np.issubdtype(y.dtype, np.floating):
            scale = float(np.max(np.abs(x))) if x.size else 0.0
            close = np.all(np.abs(x - y) <= atol + rtol * scale)
            return bool(close and np.array_equal(np.isnan(x), np.isnan(y)))
        return bool(np.array_equal(x, y))

    def walk(g1: h5py.Group, g2: h5py.Group, path: str) -> None:
        if set(g1.attrs) != set(g2.attrs):
            found.append(f"{path}: attributes {sorted(set(g1.attrs) ^ set(g2.attrs))}")
        for key in set(g1.attrs) & set(g2.attrs):
            if not skip(f"{path}@{key}") and not same_value(g1.attrs[key], g2.attrs[key]):
                found.append(f"{path}@{key}: {g1.attrs[key]!r} != {g2.attrs[key]!r}")
        if isinstance(g1, h5py.Dataset):
            if not skip(path) and not same_value(g1[()], g2[()]):
                found.append(f"{path}: values differ")
            return
        if set(g1) != set(g2):
            found.append(f"{path}: members {sorted(set(g1) ^ set(g2))}")
        for key in set(g1) & set(g2):
            walk(g1[key], g2[key], f"{path}/{key}")

    with h5py.File(a, "r") as f1, h5py.File(b, "r") as f2:
        walk(f1, f2, "")
    return found
