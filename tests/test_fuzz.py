"""The fuzz suite of issue 15, bounded for ``make test`` (``make fuzz`` is the long run).

Every case runs a real command (``curvlab.commands.main``) in a child of the fork server of
:mod:`fuzz_runner`, with 60 s and 1 GiB of address space beyond what the interpreter and torch map;
:func:`fuzz_runner.judge` asserts the rules: exit 0 or 2, one ``curvlab:`` line per message and exactly
one error line on exit 2, no traceback, within time and memory, the input unchanged (sha256), no
output and no temp file left by a failing command, strict JSON from ``--json``. The files:

* every crafted file of :mod:`hostile_files` (structure-aware: attributes, configs, shapes, dtypes,
  values, links, chunking and storage, heaps) through ``info``, with its expected outcome, and a
  selection through ``spectrum``, ``fit`` and ``gradcov``;
* byte-level damage to a real checkpoint drawn by Hypothesis (bit flips, zeroed runs, truncation,
  appended bytes, half of them aimed at the file's structure), through ``info``;
* the hostile data files through ``factors --data``.
"""

from __future__ import annotations

from pathlib import Path

import hostile_files as hf
import pytest
from fuzz_runner import Server, judge, run_case, sha256
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

#: Crafted files that also go through spectrum, fit and gradcov in `make test` (all of them in `make fuzz`).
ALL_COMMANDS = (
    "link_external_factor",
    "storage_external_devzero",
    "shape_huge_declared",
    "heap_zero_free_space",
    "value_1e308",
    "attr_empty_fisher",
    "config_data_path",
    "weight_nan",
    "norm_huge_channels",
    "shape_other_model",
)
MEMORY = 1 << 30  # "under 1 GB for a file under 1 MB"
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def server():
    with Server() as s:
        yield s


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("fuzz")
    src = hf.real_checkpoint(folder / "mlp.h5", "mlp")
    outside = hf.make_outside(folder / "outside")
    files = {"original": src}
    for name, (_, _, build) in hf.CRAFTED.items():
        files[name] = folder / f"{name}.h5"
        build(src, files[name], outside)
    out = folder / "out"
    out.mkdir()
    return {"src": src, "files": files, "out": out, "folder": folder, "offsets": hf.metadata_offsets(src)}


def test_every_crafted_file_through_info(server, corpus):
    failures = []
    for name, path in corpus["files"].items():
        expect = "accept" if name == "original" else hf.CRAFTED[name][1]
        expect = None if expect == "either" else expect
        case = run_case(
            server,
            "info",
            "crafted",
            name,
            str(path),
            corpus["out"],
            expect=expect,
            timeout=TIMEOUT,
            memory=MEMORY,
        )
        if case.problems:
            failures.append((name, case.problems, case.message))
    assert not failures, failures


@pytest.mark.parametrize("command", ["spectrum", "fit", "gradcov"])
def test_crafted_files_through_the_other_commands(server, corpus, command):
    failures = []
    for name in ALL_COMMANDS:
        case = run_case(
            server,
            command,
            "crafted",
            name,
            str(corpus["files"][name]),
            corpus["out"],
            timeout=TIMEOUT,
            memory=MEMORY,
        )
        # refused as info refuses them; gradcov also refuses what only it reads (weights, data)
        expect = "refuse" if command == "gradcov" else hf.CRAFTED[name][1]
        if case.problems or case.rc != {"refuse": 2, "accept": 0}[expect]:
            failures.append((name, case.rc, case.problems, case.message))
    assert not failures, failures


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    kind=st.sampled_from(["flip", "zero", "truncate", "append"]),
    structural=st.booleans(),
    position=st.floats(0.0, 1.0, exclude_max=True),
    length=st.sampled_from([1, 2, 8, 16, 64, 162, 512]),
    bit=st.integers(0, 7),
)
def test_byte_level_damage_through_info(server, corpus, kind, structural, position, length, bit):
    data = bytearray(corpus["src"].read_bytes())
    offsets = corpus["offsets"]
    i = offsets[int(position * len(offsets))] if structural else int(position * len(data))
    if kind == "flip":
        for j in range(i, min(i + length, len(data)), max(1, length // 4)):
            data[j] ^= 1 << bit
    elif kind == "zero":
        data[i : i + length] = bytes(len(data[i : i + length]))
    elif kind == "truncate":
        del data[i:]
    else:
        data += bytes([bit]) * length
    path = corpus["folder"] / "damaged.h5"
    path.write_bytes(bytes(data))
    before = sha256(path)
    outcome = server.run(["info", str(path), "--json"], timeout=TIMEOUT, memory=MEMORY)
    assert not judge(outcome, inputs={str(path): before}, outputs=[], timeout=TIMEOUT, json_out=True), outcome


def test_hostile_data_files_are_refused(server, corpus, tmp_path):
    failures = []
    for name, (spec, build) in hf.DATA_FILES.items():
        path = tmp_path / name
        build(path)
        output = str(tmp_path / "x.h5")
        argv = [
            "factors",
            "--model",
            "mlp",
            "--data",
            spec.replace("PATH", str(path)),
            "-o",
            output,
            "--quiet",
        ]
        inputs = {str(path): sha256(path)} if path.is_file() else {}
        outcome = server.run(argv, timeout=TIMEOUT, memory=MEMORY)
        problems = judge(outcome, inputs=inputs, outputs=[output], timeout=TIMEOUT, expect="refuse")
        if problems:
            failures.append((name, problems, outcome["stderr"][-300:]))
    assert not failures, failures


def test_paths_that_are_not_files(server, corpus):
    for name, path in hf.not_regular(Path(corpus["folder"]) / "special").items():
        outcome = server.run(["info", path], timeout=20.0, memory=MEMORY)
        assert not judge(outcome, inputs={}, outputs=[], timeout=20.0, expect="refuse"), (name, outcome)
