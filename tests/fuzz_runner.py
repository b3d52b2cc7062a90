"""Run curvlab commands on hostile files, each in a fresh child with limits, and judge the outcome.

A *fork server* (``python tests/fuzz_runner.py --serve``) imports curvlab, its commands and torch once,
without running a torch operation, then forks one child per case; the child sets ``RLIMIT_AS`` to its
address space plus the case's memory allowance (so the allowance bounds what the command itself
allocates, whatever the interpreter and torch already map), redirects stdout and stderr to files,
runs ``curvlab.commands.main(argv)`` and exits with its status (a traceback, if any, goes to stderr
and the status is 1, as with the console script). The server kills a child that runs past its
timeout. Requests and answers are JSON lines on the server's stdin and stdout (:class:`Server`).

:func:`judge` says what is wrong with an outcome, by the rules of issue 15: exit 0 or 2, every stderr
line a ``curvlab:`` line and exactly one error line on exit 2, no traceback, within time and memory,
inputs unchanged (sha256), no output (and no temp file) left by a failing command, strict JSON on
stdout for ``--json``.

As a script (``make fuzz``): builds the corpus of :mod:`hostile_files` from real checkpoints of the
given models, runs ``info``, ``spectrum``, ``fit`` and ``gradcov`` on every crafted file and on
``--cases`` byte-level mutations, and prints the figures by class (and writes them as JSON with
``--report``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


# --------------------------------------------------------------------------------------------------
# The server (one process) and its children (one per case)


def _serve() -> int:
    sys.path.insert(0, str(ROOT))
    import torch  # noqa: F401  (imported once here, not in every child)

    import curvlab.analysis.gradcov_run  # noqa: F401  (what the commands import when they run)
    import curvlab.analysis.powerlaw  # noqa: F401
    import curvlab.analysis.spectrum  # noqa: F401
    import curvlab.commands.common as common
    import curvlab.io.restore  # noqa: F401
    import curvlab.plots.gradcov  # noqa: F401
    import curvlab.plots.powerlaw  # noqa: F401
    import curvlab.plots.spectrum  # noqa: F401
    from curvlab.commands import main as curvlab_main

    common.plot_formats()  # imports matplotlib's backends and Pillow's plugins

    torch.set_num_threads(1)
    for line in sys.stdin:
        request = json.loads(line)
        answer = _run_child(curvlab_main, request)
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    return 0


def _vm_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _rss_kib() -> int:
    """This process's resident memory now (not its peak), in KiB: what a forked child starts with."""
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _run_child(curvlab_main, request: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        base_rss = _rss_kib()
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: limits, redirections, the command
            status = 1
            try:
                limit = _vm_bytes() + int(request["memory"])
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
                os.environ.update(request.get("env", {}))
                os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT, 0o600), 1)
                os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT, 0o600), 2)
                if request.get("cwd"):
                    os.chdir(request["cwd"])
                try:
                    status = curvlab_main(request["argv"])
                except SystemExit as exc:
                    status = exc.code if isinstance(exc.code, int) else 1
                except BaseException:  # noqa: BLE001 (what the console script would print)
                    import traceback

                    traceback.print_exc()
                    status = 1
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(status if isinstance(status, int) else 1)
        killed = False
        while True:
            done, raw, usage = os.wait4(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() - start > request["timeout"]:
                os.kill(pid, 9)
                done, raw, usage = os.wait4(pid, 0)
                killed = True
                break
            time.sleep(0.01)
        seconds = time.monotonic() - start
        rc = os.waitstatus_to_exitcode(raw)
        read = lambda path: open(path, encoding="utf-8", errors="replace").read()  # noqa: E731
        return {
            "rc": rc,
            "stdout": read(out),  # whole: --json is judged on it
            "stderr": read(err)[-20000:],
            "seconds": seconds,
            "killed": killed,
            "rss_extra_mib": max(0, usage.ru_maxrss - base_rss) / 1024,
        }


class Server:
    """The fork server as a subprocess: ``run(argv, timeout=, memory=)`` -> an outcome dict."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def run(
        self,
        argv: list[str],
        *,
        timeout: float = 60.0,
        memory: int = 1 << 30,
        env: dict | None = None,
        cwd: str | None = None,
    ) -> dict:
        request = {"argv": argv, "timeout": timeout, "memory": memory, "env": env or {}, "cwd": cwd}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the fork server died")
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=30)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------
# Judging an outcome


def sha256(path: str | Path) -> str | None:
    path = Path(path)
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _strict_json(text: str) -> None:
    def refuse(name: str) -> None:
        raise ValueError(f"non-strict JSON constant {name}")

    json.loads(text, parse_constant=refuse)


def judge(
    outcome: dict,
    *,
    inputs: dict[str, str | None],
    outputs: list[str],
    timeout: float,
    expect: str | None = None,
    json_out: bool = False,
) -> list[str]:
    """What is wrong with ``outcome`` (empty: nothing). ``inputs``: path -> sha256 before the run;
    ``outputs``: paths the command may write (none may exist after a failure, nor a temp file
    beside them); ``expect``: ``"refuse"`` (exit 2) or ``"accept"`` (exit 0), or None for either."""
    problems = []
    rc, err = outcome["rc"], outcome["stderr"]
    lines = [line for line in err.splitlines() if line.strip()]
    if outcome["killed"]:
        problems.append(f"killed after {timeout:.0f} s (a hang?)")
    if rc not in (0, 2):
        problems.append(f"exit status {rc}")
    if "Traceback" in err:
        problems.append("a traceback on stderr")
    if any(not line.startswith("curvlab: ") for line in lines):
        problems.append(f"stderr lines not of the form 'curvlab: ...': {len(lines)} lines")
    if rc == 2 and sum(line.startswith("curvlab: error:") for line in lines) != 1:
        problems.append("exit 2 without exactly one error line")
    if expect == "refuse" and rc != 2:
        problems.append(f"expected a refusal (exit 2), got exit {rc}")
    if expect == "accept" and rc != 0:
        problems.append(f"expected success (exit 0), got exit {rc}: {lines[-1] if lines else ''}")
    for path, before in inputs.items():
        if sha256(path) != before:
            problems.append(f"input {path} changed")
    if rc != 0:
        for path in outputs:
            if os.path.exists(path):
                problems.append(f"output {path} written by a failing command")
    for path in outputs:
        folder, name = os.path.split(path)
        if os.path.isdir(folder) and any(f.startswith(f".{name}.tmp-") for f in os.listdir(folder)):
            problems.append(f"a temp file of {name} left behind")
    if json_out and rc == 0:
        try:
            _strict_json(outcome["stdout"])
        except ValueError as exc:
            problems.append(f"stdout is not strict JSON ({exc})")
    return problems


# --------------------------------------------------------------------------------------------------
# Cases


@dataclass
class Case:
    """One command on one file: what it is (class, name), how it went and what was wrong."""

    command: str
    kind: str
    name: str
    rc: int
    seconds: float
    rss_extra_mib: float
    problems: list[str]
    message: str


COMMANDS = ("info", "spectrum", "fit", "gradcov")


def argv_for(command: str, path: str, out: Path) -> tuple[list[str], list[str], bool]:
    """``(argv, outputs, json)`` of a command on a checkpoint, writing into ``out``."""
    if command == "info":
        return ["info", path, "--json"], [], True
    if command == "spectrum":
        output = str(out / "s.spectrum.h5")
        return ["spectrum", path, "-o", output, "--json", "--quiet"], [output], True
    if command == "fit":
        plot = str(out / "fit.png")
        return ["fit", path, "--bootstrap", "20", "--quiet", "--json", "--plot", plot], [plot], True
    output = str(out / "g.gradcov.h5")
    return (
        ["gradcov", path, "-o", output, "--examples", "16", "--directions", "2", "--quiet", "--json"],
        [output],
        True,
    )


def run_case(
    server: Server,
    command: str,
    kind: str,
    name: str,
    path: str,
    out: Path,
    *,
    expect: str | None = None,
    timeout: float = 120.0,
    memory: int = 1 << 30,
) -> Case:
    """Run ``command`` on ``path`` and judge it (outputs are cleared from ``out`` first)."""
    argv, outputs, json_out = argv_for(command, path, out)
    for output in outputs:
        if os.path.exists(output):
            os.remove(output)
    inputs = {path: sha256(path)}
    outcome = server.run(argv, timeout=timeout, memory=memory)
    problems = judge(
        outcome, inputs=inputs, outputs=outputs, timeout=timeout, expect=expect, json_out=json_out
    )
    lines = outcome["stderr"].strip().splitlines()
    return Case(
        command,
        kind,
        name,
        outcome["rc"],
        round(outcome["seconds"], 2),
        round(outcome["rss_extra_mib"], 1),
        problems,
        lines[-1][:300] if lines else "",
    )


def summarize(cases: list[Case]) -> dict:
    """Figures by class: cases, exit 0, exit 2, failures, slowest, largest extra memory."""
    table: dict[str, Counter] = defaultdict(Counter)
    worst: dict[str, dict] = defaultdict(lambda: {"seconds": 0.0, "rss_extra_mib": 0.0})
    for case in cases:
        row = table[case.kind]
        row["cases"] += 1
        row[f"exit {case.rc}"] += 1
        row["failures"] += bool(case.problems)
        worst[case.kind]["seconds"] = max(worst[case.kind]["seconds"], case.seconds)
        worst[case.kind]["rss_extra_mib"] = max(worst[case.kind]["rss_extra_mib"], case.rss_extra_mib)
    return {kind: {**dict(row), **worst[kind]} for kind, row in sorted(table.items())}


def fuzz(workdir: Path, models: list[str], cases: int, seed: int, commands=COMMANDS, log=print) -> list[Case]:
    """The long run: every crafted file of every model through every command, then ``cases`` byte-level
    mutations (a quarter aimed at the file's structure) through ``info`` and, one in four, the rest."""
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    import hostile_files as hf

    results: list[Case] = []
    out = workdir / "out"
    out.mkdir(parents=True, exist_ok=True)
    corpus = hf.build_corpus(workdir / "corpus", models)
    rng = random.Random(seed)
    with Server() as server:
        for model, name, kind, path in corpus:
            expect = "accept" if name == "original" else hf.CRAFTED[name][1]
            expect = None if expect == "either" else expect
            for command in commands:
                case = run_case(
                    server,
                    command,
                    kind,
                    f"{model}-{name}",
                    str(path),
                    out,
                    expect=expect if command == "info" else None,
                )
                results.append(case)
                if case.problems:
                    log(f"FAIL {command} {model}-{name}: {case.problems} {case.message}")
        sources = [path for _, name, _, path in corpus if name == "original"]
        offsets = {path: hf.metadata_offsets(path) for path in sources}
        mutated = workdir / "mutated.h5"
        for i in range(cases):
            src = rng.choice(sources)
            data = src.read_bytes()
            if rng.random() < 0.25:
                kind, damaged = hf.metadata_mutation(data, offsets[src], rng)
            else:
                kind, damaged = hf.byte_mutation(data, rng)
            mutated.write_bytes(damaged)
            chosen = ["info"] + ([rng.choice(commands[1:])] if rng.random() < 0.25 else [])
            for command in chosen:
                case = run_case(server, command, f"bytes: {kind}", f"{src.stem}-{i}", str(mutated), out)
                results.append(case)
                if case.problems:
                    keep = workdir / f"failure-{i}-{command}.h5"
                    keep.write_bytes(damaged)
                    log(f"FAIL {command} {kind} #{i} (kept as {keep}): {case.problems} {case.message}")
            if (i + 1) % 100 == 0:
                log(f"{i + 1} of {cases} byte-level cases")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fuzz curvlab's commands with hostile files (issue 15).")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--models", default="mlp,simple_cnn,resnet8,transformer_shallow")
    parser.add_argument("--cases", type=int, default=2000, help="byte-level mutations (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", type=Path, default=None, help="write the figures and failures as JSON")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep the corpus here (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    if args.serve:
        return _serve()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        start = time.monotonic()
        cases = fuzz(
            workdir, args.models.split(","), args.cases, args.seed, log=lambda s: print(s, flush=True)
        )
        figures = summarize(cases)
        failures = [asdict(c) for c in cases if c.problems]
        print(f"{len(cases)} runs in {time.monotonic() - start:.0f} s, {len(failures)} failures")
        print(
            f"{'class':<24} {'cases':>6} {'exit 0':>7} {'exit 2':>7} {'fail':>5} {'max s':>6} {'max MiB':>8}"
        )
        for kind, row in figures.items():
            print(
                f"{kind:<24} {row['cases']:>6} {row.get('exit 0', 0):>7} {row.get('exit 2', 0):>7} "
                f"{row['failures']:>5} {row['seconds']:>6.1f} {row['rss_extra_mib']:>8.0f}"
            )
        if args.report:
            args.report.write_text(
                json.dumps(
                    {"figures": figures, "failures": failures, "cases": [asdict(c) for c in cases]}, indent=1
                )
            )
        return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
