"""Checkpoint format version 2 (docs/format.md): N-d convolutions, ``NormAffine`` blocks factors and
the coverage group, written with plain h5py; version-1 files still read; every new defect is a
one-line error naming file, step and layer."""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import pytest

import curvlab.io.checkpoint as ck
from curvlab.errors import CheckpointError
from curvlab.io.checkpoint import LayerFactors, Step
from curvlab.io.info import describe_checkpoint, format_summary

REPO = Path(__file__).resolve().parents[1]
rng = np.random.default_rng(0)


def psd(n: int) -> np.ndarray:
    x = rng.standard_normal((n + 2, n))
    return x.T @ x


def blocks(c: int, k: int) -> np.ndarray:
    x = rng.standard_normal((c, k + 1, k))
    return x.transpose(0, 2, 1) @ x


COVERAGE = {"covered_parameters": 90, "total_parameters": 100,
            "skipped": [
                {"name": "pos", "parameters": 8, "reason": "Model uses this Parameter in its own forward"},
                {"name": "rnn.bias", "parameters": 2, "reason": "GRU: a recurrent layer"},
            ]}


def write_v2(path: Path, *, version: int = 2, coverage: bool = True) -> dict[str, tuple]:
    """A version-2 file written with plain h5py, as docs/format.md describes it."""
    layers = {
        "conv1": ("Conv1d", (4, 2, 3), True, psd(7), psd(4)),
        "conv3": ("Conv3d", (2, 1, 2, 1, 2), False, psd(4), np.diag(psd(2)).copy()),
        "norm": ("NormAffine", (2, 3), True, blocks(6, 2), np.ones(1)),
        "rms": ("NormAffine", (5,), False, blocks(5, 1).astype(np.float32), np.ones(1)),
    }
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "curvlab.kfac"
        f.attrs["format_version"] = version
        g = f.create_group("steps/7")
        g.attrs.update({"step": 7, "fisher_type": "exact", "num_examples": 3})
        for name, (module_type, shape, bias, a, s) in layers.items():
            lg = g.create_group(f"factors/{name}")
            lg.attrs["module_type"] = module_type
            lg.attrs["weight_shape"] = np.asarray(shape)
            lg.attrs["has_bias"] = bias
            lg["A"], lg["S"] = a, s
        if coverage:
            cg = g.create_group("coverage")
            cg.attrs["covered_parameters"] = COVERAGE["covered_parameters"]
            cg.attrs["total_parameters"] = COVERAGE["total_parameters"]
            cg["skipped_name"] = [s["name"] for s in COVERAGE["skipped"]]
            cg["skipped_parameters"] = [s["parameters"] for s in COVERAGE["skipped"]]
            cg["skipped_reason"] = [s["reason"] for s in COVERAGE["skipped"]]
        f.flush()
        g.attrs["complete"] = True
    return layers


def test_plain_version_2_file_loads(tmp_path):
    path = tmp_path / "v2.h5"
    layers = write_v2(path)
    loaded = ck.load(path)
    assert loaded.format_version == 2
    step = loaded.steps[7]
    for name, (module_type, shape, bias, a, s) in layers.items():
        got = step.factors[name]
        assert (got.module_type, got.weight_shape, got.has_bias) == (module_type, shape, bias)
        np.testing.assert_array_equal(got.A, a)
        np.testing.assert_array_equal(got.S, s)
    assert step.factors["norm"].A_kind == "blocks" and step.factors["conv3"].S_kind == "diagonal"
    assert step.coverage == COVERAGE
    summary = describe_checkpoint(str(path))
    assert summary["steps"][0]["coverage"] == COVERAGE
    assert summary["steps"][0]["num_parameters_with_factors"] == 4 * 6 + 4 + 2 * 4 + 2 * 6 + 5
    text = format_summary(summary)
    assert "coverage 90.0 % of 100 trainable parameters, 2 skipped:" in text
    assert "    rnn.bias (2): GRU: a recurrent layer" in text and "6x2x2 blocks" in text


def test_version_1_file_still_reads_and_an_append_upgrades_it(tmp_path):
    path = tmp_path / "v1.h5"
    with h5py.File(path, "w") as f:  # version 1 as written by plain h5py before version 2 existed
        f.attrs["format"] = "curvlab.kfac"
        f.attrs["format_version"] = 1
        g = f.create_group("steps/0")
        g.attrs.update({"step": 0, "fisher_type": "mc", "num_examples": 1, "complete": True})
        lg = g.create_group("factors/fc")
        lg.attrs.update({"module_type": "Linear", "weight_shape": np.array([2, 3]), "has_bias": False})
        lg["A"], lg["S"] = psd(3), psd(2)
    loaded = ck.load(path)
    assert loaded.format_version == 1 and loaded.steps[0].coverage is None
    norm = LayerFactors("NormAffine", (3,), True, blocks(3, 2), np.ones(1))
    ck.append_step(path, Step(1, "mc", 4, {"ln": norm}, coverage={"covered_parameters": 6,
                                                                  "total_parameters": 6, "skipped": []}))
    again = ck.load(path)
    assert again.format_version == 2 and list(again.steps) == [0, 1]
    np.testing.assert_array_equal(again.steps[0].factors["fc"].A, loaded.steps[0].factors["fc"].A)
    assert again.steps[1].coverage == {"covered_parameters": 6, "total_parameters": 6, "skipped": []}


def _mutate(path: Path, fn) -> None:
    with h5py.File(path, "r+") as f:
        fn(f["steps/7"])


def _replace(group: str, name: str, value):
    def fn(g):
        del g[group][name]
        g[group][name] = value

    return fn


DEFECTS = [
    ("block_shape", _replace("factors/norm", "A", np.ones((6, 2, 3))),
     "layer norm: A has shape (6, 2, 3) but"),
    ("block_count", _replace("factors/norm", "A", blocks(5, 2)), "needs 6 blocks of 2 x 2"),
    ("block_asymmetric", _replace("factors/norm", "A", np.array([[[1.0, 0.5], [0.0, 1.0]]] * 6)),
     "layer norm: A is not symmetric: block 0"),
    ("block_indefinite", _replace("factors/norm", "A", np.array([[[1.0, 2.0], [2.0, 1.0]]] * 6)),
     "layer norm: A is not positive semi-definite: block 0"),
    ("block_negative", _replace("factors/rms", "A", -np.ones((5, 1, 1))), "layer rms: A is not positive"),
    ("block_nan", _replace("factors/rms", "A", np.full((5, 1, 1), np.nan)), "non-finite"),
    ("norm_S_size", _replace("factors/norm", "S", np.ones(2)), "layer norm: S has size 2 but"),
    ("conv1d_rank", lambda g: g["factors/conv1"].attrs.__setitem__("weight_shape", np.array([4, 2])),
     "Conv1d needs 3 entries"),
    ("coverage_sum", lambda g: g["coverage"].attrs.__setitem__("total_parameters", 99),
     "step 7: coverage does not add up"),
    ("coverage_lengths", _replace("coverage", "skipped_parameters", [8]), "differ in length"),
    ("coverage_count", _replace("coverage", "skipped_parameters", [8, 0]), "is not a positive integer"),
    ("coverage_missing", lambda g: g["coverage"].attrs.__delitem__("covered_parameters"),
     "coverage: missing attribute covered_parameters"),
    ("coverage_not_strings", _replace("coverage", "skipped_reason", [1, 2]),
     "skipped_reason must be a 1-D string"),
]


@pytest.mark.parametrize(("case", "mutate", "message"), DEFECTS, ids=[d[0] for d in DEFECTS])
def test_defects_are_one_line_errors(tmp_path, case, mutate, message):
    path = tmp_path / "bad.h5"
    write_v2(path)
    _mutate(path, mutate)
    with pytest.raises(CheckpointError, match=re.escape(message)) as err:
        ck.load(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_version_2_types_in_a_version_1_file_are_refused(tmp_path):
    path = tmp_path / "old.h5"
    write_v2(path, version=1, coverage=False)
    with pytest.raises(CheckpointError, match="layer conv1: module_type Conv1d needs format_version 2"):
        ck.load(path)


def test_writer_validates_coverage_before_writing(tmp_path):
    path = tmp_path / "x.h5"
    bad = {"covered_parameters": 3, "total_parameters": 2, "skipped": []}
    with pytest.raises(CheckpointError, match="coverage does not add up"):
        ck.save(path, Step(0, "mc", 1, {}, coverage=bad))
    assert not path.exists()


def test_docs_example_holds_a_norm_block_and_coverage(tmp_path, monkeypatch):
    text = (REPO / "docs" / "format.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    writer = next(b for b in code if "h5py.File" in b)
    monkeypatch.chdir(tmp_path)
    exec(compile(writer, "docs/format.md", "exec"), {})
    step = ck.load("example.h5").steps[200]
    assert step.factors["ln"].A_kind == "blocks" and step.factors["ln"].A.shape == (16, 2, 2)
    assert step.coverage["covered_parameters"] + sum(s["parameters"] for s in step.coverage["skipped"]) == (
        step.coverage["total_parameters"])
