"""The HDF5 factor checkpoint (docs/format.md): round trips, third-party files, every defect, crashes."""

from __future__ import annotations

import json
import os
import re
import runpy
import select
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from curvlab.errors import CheckpointError, CurvlabError
from curvlab.io import checkpoint as ck
from curvlab.io.checkpoint import (
    MODULE_TYPES,
    Checkpoint,
    CheckpointReader,
    IncompleteStepWarning,
    LayerFactors,
    Step,
)

REPO = Path(__file__).resolve().parents[1]
F32, F64 = np.float32, np.float64


# --------------------------------------------------------------------------------------------------
# Helpers


def psd(n: int, dtype=F64, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    """An exactly symmetric positive semi-definite n x n matrix (a sample second moment)."""
    x = np.random.default_rng(seed).standard_normal((n + 3, n))
    m = x.T @ x / (n + 3) * scale
    return ((m + m.T) / 2).astype(dtype)


def diag(n: int, dtype=F64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(n).astype(dtype) + 0.1


def assert_layer_equal(got: LayerFactors, want: LayerFactors) -> None:
    assert got.module_type == want.module_type
    assert got.weight_shape == tuple(want.weight_shape)
    assert got.has_bias is bool(want.has_bias)
    for name in "AS":
        g, w = getattr(got, name), getattr(want, name)
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


def assert_step_equal(got: Step, want: Step) -> None:
    assert (got.step, got.fisher_type, got.num_examples) == (
        want.step,
        want.fisher_type,
        want.num_examples,
    )
    assert list(got.factors) == list(want.factors)
    for name in want.factors:
        assert_layer_equal(got.factors[name], want.factors[name])
    assert set(got.attrs) == set(want.attrs)
    for key, value in want.attrs.items():
        np.testing.assert_array_equal(got.attrs[key], value)
        assert type(got.attrs[key]) is (np.ndarray if isinstance(value, list) else type(value))
    if want.weights is None:
        assert got.weights is None
    else:
        assert list(got.weights) == list(want.weights)
        for name, w in want.weights.items():
            assert got.weights[name].dtype == w.dtype
            np.testing.assert_array_equal(got.weights[name], w)


def make_step(number: int = 0, *, seed: int = 0, weights: bool = True) -> Step:
    """A step with every module type, dense and diagonal factors, float32 and float64."""
    factors = {
        "layers.2.fc": LayerFactors("Linear", (3, 4), True, psd(5, F64, seed), psd(3, F32, seed)),
        "layers.10.conv": LayerFactors(
            "Conv2d", (4, 2, 3, 3), False, psd(18, F32, seed + 1), diag(4, F64, seed)
        ),
        "embed": LayerFactors("Embedding", (6, 2), False, diag(6, F32, seed), psd(2, F64, seed)),
        "head": LayerFactors("TiedEmbedding", (6, 2), True, psd(3, F64, seed), diag(6, F64, seed)),
    }
    w = None
    if weights:
        rng = np.random.default_rng(seed)
        w = {
            "layers.2.fc.weight": rng.standard_normal((3, 4)).astype(F32),
            "layers.2.fc.bias": rng.standard_normal(3),
            "bn.num_batches_tracked": np.array(7, dtype=np.int64),
        }
    attrs = {"ema_decay": 0.95, "damping": 1e-3, "mc_samples": 2, "dtype": "float64",
             "ema": True, "lrs": [0.1, 0.01]}
    return Step(number, "mc", 128 + number, factors, w, attrs)


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def snapshot(path: Path) -> tuple[bytes, int, int]:
    st_ = path.stat()
    return path.read_bytes(), st_.st_mtime_ns, st_.st_mode


def plain_layer(parent, name, module_type, weight_shape, has_bias, a, s) -> None:
    """A layer group written with plain h5py, following docs/format.md."""
    g = parent.create_group(name)
    g.attrs["module_type"] = module_type
    g.attrs["weight_shape"] = np.asarray(weight_shape, dtype=np.int64)
    g.attrs["has_bias"] = has_bias
    g.create_dataset("A", data=a)
    g.create_dataset("S", data=s)


PLAIN_LAYERS = {
    "fc": ("Linear", (3, 4), True, psd(5, F64), psd(3, F64, 1)),
    "conv": ("Conv2d", (4, 2, 3, 3), False, psd(18, F32), diag(4, F32)),
    "emb": ("Embedding", (6, 2), False, diag(6), psd(2, F32)),
    "head": ("TiedEmbedding", (6, 2), True, psd(3), diag(6)),
}


def write_plain(path: Path, steps=(0, 200), complete=(True, True)) -> None:
    """A valid checkpoint written without curvlab's writer, exactly as docs/format.md says."""
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "curvlab.kfac"
        f.attrs["format_version"] = 1
        model = f.create_group("model")
        model.attrs["name"] = "tiny"
        model.attrs["config"] = json.dumps({"width": 3, "tied": True})
        f.create_group("steps")
        for number, done in zip(steps, complete, strict=True):
            g = f.create_group(f"steps/{number}")
            g.attrs["step"] = number
            g.attrs["fisher_type"] = "empirical"
            g.attrs["num_examples"] = 64
            g.attrs["damping"] = 0.001
            fg = g.create_group("factors")
            for name, spec in PLAIN_LAYERS.items():
                plain_layer(fg, name, *spec)
            g["weights/fc.weight"] = np.arange(12, dtype=F32).reshape(3, 4)
            f.flush()
            if done is not None:
                g.attrs["complete"] = done


# --------------------------------------------------------------------------------------------------
# Sizes


@pytest.mark.parametrize(
    ("module_type", "shape", "bias", "sizes"),
    [
        ("Linear", (10, 7), False, (7, 10)),
        ("Linear", (10, 7), True, (8, 10)),
        ("Conv2d", (16, 3, 5, 4), False, (60, 16)),
        ("Conv2d", (16, 3, 5, 4), True, (61, 16)),
        ("Embedding", (1000, 32), False, (1000, 32)),
        ("TiedEmbedding", (1000, 32), False, (32, 1000)),
        ("TiedEmbedding", (1000, 32), True, (33, 1000)),
        ("Conv1d", (16, 3, 5), True, (16, 16)),
        ("Conv3d", (16, 3, 5, 4, 2), False, (120, 16)),
        ("NormAffine", (4, 6), True, (24, 1)),
    ],
)
def test_expected_factor_sizes(module_type, shape, bias, sizes):
    assert ck.expected_factor_sizes(module_type, shape, bias) == sizes


@pytest.mark.parametrize(
    ("module_type", "shape", "bias", "problem"),
    [
        ("Conv4d", (2, 2), False, "unknown module_type"),
        ("Conv3d", (2, 2), False, "needs 5 entries"),
        ("Linear", (2, 2, 1), False, "needs 2 entries"),
        ("Conv2d", (2, 2), False, "needs 4 entries"),
        ("Linear", (0, 2), False, "entries must be >= 1"),
        ("Embedding", (5, 2), True, "cannot have has_bias"),
    ],
)
def test_expected_factor_sizes_rejects(module_type, shape, bias, problem):
    with pytest.raises(CheckpointError, match=problem):
        ck.expected_factor_sizes(module_type, shape, bias)


# --------------------------------------------------------------------------------------------------
# Round trips through curvlab's writer


def test_round_trip_all_features(tmp_path):
    path = tmp_path / "ckpt.h5"
    steps = [make_step(0, seed=0), make_step(200, seed=1, weights=False), make_step(50, seed=2)]
    ck.save(path, steps, model_name="tiny", model_config={"width": 3, "nested": {"a": [1, 2]}})
    assert os.listdir(tmp_path) == ["ckpt.h5"]

    loaded = ck.load(path)
    assert isinstance(loaded, Checkpoint)
    assert loaded.path == str(path) and loaded.format_version == ck.FORMAT_VERSION == 2
    assert loaded.model_name == "tiny"
    assert loaded.model_config == {"width": 3, "nested": {"a": [1, 2]}}
    assert list(loaded.steps) == [0, 50, 200]
    for want in steps:
        assert_step_equal(loaded.steps[want.step], want)
    fc = loaded.steps[0].factors["layers.2.fc"]
    assert (fc.A_kind, fc.S_kind) == ("dense", "dense")
    emb = loaded.steps[0].factors["embed"]
    assert (emb.A_kind, emb.S_kind) == ("diagonal", "dense")


def test_load_filters(tmp_path):
    path = tmp_path / "ckpt.h5"
    steps = [make_step(n, seed=n) for n in (0, 100, 200)]
    ck.save(path, steps)

    assert list(ck.load(path, steps="latest").steps) == [200]
    assert list(ck.load(path, steps=100).steps) == [100]
    assert list(ck.load(path, steps=np.int64(100)).steps) == [100]
    assert list(ck.load(path, steps=[200, 0]).steps) == [0, 200]

    one = ck.load(path, steps=0, layers="layers.*")
    assert list(one.steps[0].factors) == ["layers.2.fc", "layers.10.conv"]
    two = ck.load(path, steps=0, layers=["embed", "h?ad"])
    assert list(two.steps[0].factors) == ["embed", "head"]
    assert_step_equal(ck.load(path, steps=[100], layers=["*"]).steps[100], steps[1])

    no_weights = ck.load(path, weights=False)
    assert all(s.weights is None for s in no_weights.steps.values())


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"steps": 150}, "no complete step 150"),
        ({"steps": [0, 7]}, "no complete step 7"),
        ({"steps": "first"}, "expected None, 'latest'"),
        ({"layers": "nope*"}, "pattern 'nope\\*' matches no layer"),
    ],
)
def test_load_filter_errors(tmp_path, kwargs, problem):
    path = tmp_path / "ckpt.h5"
    ck.save(path, [make_step(0), make_step(200)])
    with pytest.raises(CheckpointError, match=problem) as err:
        ck.load(path, **kwargs)
    assert str(path) in str(err.value)


def test_latest_of_empty_checkpoint(tmp_path):
    path = tmp_path / "empty.h5"
    ck.save(path, [])
    assert ck.load(path).steps == {}
    with pytest.raises(CheckpointError, match="no complete step"):
        ck.load(path, steps="latest")


def test_reader_api(tmp_path):
    path = tmp_path / "ckpt.h5"
    step = make_step(300)
    ck.save(path, [step, make_step(5, weights=False)], model_name="tiny")
    with CheckpointReader(path) as reader:
        assert reader.path == str(path) and reader.format_version == 2
        assert (reader.model_name, reader.model_config) == ("tiny", None)
        assert reader.step_numbers() == [5, 300] and reader.incomplete_steps() == []
        attrs = reader.step_attrs(300)
        np.testing.assert_array_equal(attrs.pop("lrs"), [0.1, 0.01])
        assert attrs == {"fisher_type": "mc", "num_examples": 428, "ema_decay": 0.95,
                         "damping": 1e-3, "mc_samples": 2, "dtype": "float64", "ema": True}
        # creation order, not alphabetical order ("layers.10" after "layers.2")
        assert reader.layer_names(300) == ["layers.2.fc", "layers.10.conv", "embed", "head"]
        assert reader.layer_meta(300, "layers.10.conv") == ("Conv2d", (4, 2, 3, 3), False)
        assert_layer_equal(reader.read_factors(300, "head"), step.factors["head"])
        assert list(reader.read_weights(300)) == list(step.weights)
        assert reader.read_weights(5) == {}
        kinds = {(n, w): reader.factor_kind(300, n, w) for n in reader.layer_names(300) for w in "AS"}
        assert kinds == {("layers.2.fc", "A"): "dense", ("layers.2.fc", "S"): "dense",
                         ("layers.10.conv", "A"): "dense", ("layers.10.conv", "S"): "diagonal",
                         ("embed", "A"): "diagonal", ("embed", "S"): "dense",
                         ("head", "A"): "dense", ("head", "S"): "diagonal"}
        assert reader.factor_kind(300, "nope", "A") == "dense"  # not validated: read_factors reports it
        with pytest.raises(CheckpointError, match="layer nope: no such layer"):
            reader.read_factors(300, "nope")
        with pytest.raises(CheckpointError, match="no complete step 6"):
            reader.layer_names(6)


def test_empty_weights_round_trip_as_empty_dict(tmp_path):
    path = tmp_path / "ckpt.h5"
    ck.save(path, Step(1, "exact", 10, {}, weights={}))
    assert ck.load(path).steps[1].weights == {}


def test_big_endian_and_chunked_compressed_data_load(tmp_path):
    path = tmp_path / "ckpt.h5"
    write_plain(path, steps=(0,), complete=(True,))
    a = psd(5, F64)
    with h5py.File(path, "r+") as f:
        lg = f["steps/0/factors/fc"]
        del lg["A"], lg["S"]
        lg.create_dataset("A", data=a.astype(">f8"))
        lg.create_dataset("S", data=psd(3, F32), chunks=(1, 3), compression="gzip")
    got = ck.load(path).steps[0].factors["fc"]
    assert got.A.dtype == np.dtype(F64) and got.A.dtype.isnative
    np.testing.assert_array_equal(got.A, a)
    np.testing.assert_array_equal(got.S, psd(3, F32))


# --------------------------------------------------------------------------------------------------
# Files written with plain h5py, following docs/format.md


def test_plain_h5py_file_loads(tmp_path):
    path = tmp_path / "third_party.h5"
    write_plain(path)
    loaded = ck.load(path)
    assert loaded.model_name == "tiny" and loaded.model_config == {"width": 3, "tied": True}
    assert list(loaded.steps) == [0, 200]
    step = loaded.steps[200]
    assert (step.fisher_type, step.num_examples, step.attrs) == ("empirical", 64, {"damping": 1e-3})
    assert sorted(step.factors) == sorted(PLAIN_LAYERS)
    for name, (module_type, shape, bias, a, s) in PLAIN_LAYERS.items():
        assert_layer_equal(step.factors[name], LayerFactors(module_type, shape, bias, a, s))
    np.testing.assert_array_equal(step.weights["fc.weight"], np.arange(12, dtype=F32).reshape(3, 4))


def test_docs_example_runs_and_loads(tmp_path, monkeypatch):
    """The plain-h5py example in docs/format.md writes a file that loads: the docs are enough."""
    text = (REPO / "docs" / "format.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    writer = next(b for b in blocks if "h5py.File" in b)
    reader = next(b for b in blocks if "from curvlab.io.checkpoint import load" in b)
    monkeypatch.chdir(tmp_path)
    exec(compile(writer, "docs/format.md", "exec"), {})
    exec(compile(reader, "docs/format.md", "exec"), {})
    loaded = ck.load("example.h5")
    fc = loaded.steps[200].factors["fc"]
    assert (fc.module_type, fc.weight_shape, fc.A.shape, fc.S_kind) == (
        "Linear",
        (16, 8),
        (9, 9),
        "dense",
    )
    assert loaded.steps[200].factors["embed"].A_kind == "diagonal"
    assert loaded.steps[200].attrs == {"ema_decay": 0.95}


def _set(obj_path, key, value):
    def mutate(f):
        (f[obj_path] if obj_path else f).attrs[key] = value

    return mutate


def _del(obj_path, key):
    def mutate(f):
        del (f[obj_path] if obj_path else f).attrs[key]

    return mutate


def _replace(layer, name, data):
    def mutate(f):
        lg = f[f"steps/200/factors/{layer}"]
        del lg[name]
        lg[name] = data

    return mutate


def _delete(obj_path):
    def mutate(f):
        del f[obj_path]

    return mutate


def _move(src, dst):
    def mutate(f):
        f.move(src, dst)

    return mutate


def _asymmetric(dtype, rel):
    x = psd(5, dtype)
    x[0, 1] += rel * np.abs(np.diagonal(x)).max()
    return x


def _negative_diagonal():
    x = psd(5)
    x[2, 2] = -0.1 * np.abs(np.diagonal(x)).max()
    return x


def _cauchy_schwarz():
    x = np.eye(5)
    x[0, 1] = x[1, 0] = 2.0
    return x


def _with(value_at, base):
    x = base.copy()
    x[value_at] = np.nan if value_at == (1, 1) else np.inf
    return x


def _layer_is_dataset(f):
    del f["steps/200/factors/fc"]
    f["steps/200/factors/fc"] = np.eye(2)


def _a_is_group(f):
    del f["steps/200/factors/fc/A"]
    f.create_group("steps/200/factors/fc/A")


def _weights_are_strings(f):
    f["steps/200/weights/names"] = np.array([b"a", b"b"])


ROOT, STEP, FC = "", "steps/200", "steps/200/factors/fc"
S200 = "step 200"

# (id, mutation, expected problem, step named, layer named)
DEFECTS = [
    ("no_format", _del(ROOT, "format"), "format is missing", None, None),
    ("wrong_format", _set(ROOT, "format", "other.tool"), "format is 'other.tool'", None, None),
    ("no_version", _del(ROOT, "format_version"), "missing attribute format_version", None, None),
    ("newer_version", _set(ROOT, "format_version", 3), "written by a newer curvlab", None, None),
    ("version_zero", _set(ROOT, "format_version", 0), "format_version 0 is not valid", None, None),
    ("version_str", _set(ROOT, "format_version", "1"), "not an integer", None, None),
    ("no_steps", _delete("steps"), "missing /steps group", None, None),
    ("bad_json", _set("model", "config", "{width: 3"), "config is not valid JSON", None, None),
    ("json_list", _set("model", "config", "[1, 2]"), "not a JSON object", None, None),
    ("model_name_int", _set("model", "name", 3), "name is 3, not a string", None, None),
    ("name_not_decimal", _move(STEP, "steps/two"), "'two' is not a step number", "two", None),
    ("name_leading_zero", _move(STEP, "steps/0200"), "'0200' is not a step number", "0200", None),
    ("name_negative", _move(STEP, "steps/-200"), "'-200' is not a step number", "-200", None),
    ("step_disagrees", _set(STEP, "step", 100), "step attribute 100 disagrees", S200, None),
    ("step_missing", _del(STEP, "step"), "missing attribute step", S200, None),
    ("step_float", _set(STEP, "step", 200.0), "attribute step is 200.0", S200, None),
    ("complete_str", _set(STEP, "complete", "yes"), "complete is 'yes', not a bool", S200, None),
    ("no_fisher_type", _del(STEP, "fisher_type"), "missing attribute fisher_type", S200, None),
    ("fisher_type_int", _set(STEP, "fisher_type", 1), "fisher_type is 1, not a string", S200, None),
    ("no_num_examples", _del(STEP, "num_examples"), "missing attribute num_examples", S200, None),
    ("num_examples_neg", _set(STEP, "num_examples", -1), "num_examples -1 is negative", S200, None),
    ("no_factors", _delete(f"{STEP}/factors"), "missing factors group", S200, None),
    ("weights_strings", _weights_are_strings, "weight names is not a numeric", S200, None),
    ("layer_is_dataset", _layer_is_dataset, "is not a group", S200, "fc"),
    ("no_A", _delete(f"{FC}/A"), "missing factor A", S200, "fc"),
    ("no_S", _delete(f"{FC}/S"), "missing factor S", S200, "fc"),
    ("A_is_group", _a_is_group, "A is not a dataset", S200, "fc"),
    ("no_module_type", _del(FC, "module_type"), "missing attribute module_type", S200, "fc"),
    ("bad_module_type", _set(FC, "module_type", "Conv4d"), "unknown module_type", S200, "fc"),
    ("v2_type_in_v1", _set(FC, "module_type", "Conv1d"), "needs format_version 2", S200, "fc"),
    ("no_weight_shape", _del(FC, "weight_shape"), "missing attribute weight_shape", S200, "fc"),
    ("weight_shape_rank", _set(FC, "weight_shape", [3, 4, 1]), "needs 2 entries", S200, "fc"),
    ("weight_shape_zero", _set(FC, "weight_shape", [0, 4]), "entries must be >= 1", S200, "fc"),
    ("weight_shape_float", _set(FC, "weight_shape", [3.0, 4.0]), "integer array", S200, "fc"),
    ("weight_shape_scalar", _set(FC, "weight_shape", 12), "integer array", S200, "fc"),
    ("no_has_bias", _del(FC, "has_bias"), "missing attribute has_bias", S200, "fc"),
    ("has_bias_str", _set(FC, "has_bias", "no"), "has_bias is 'no', not a bool", S200, "fc"),
    ("embedding_bias", _set("steps/200/factors/emb", "has_bias", True), "cannot have has_bias",
     S200, "emb"),
    ("A_rank_3", _replace("fc", "A", np.ones((5, 5, 1))), "A has rank 3", S200, "fc"),
    ("A_rank_0", _replace("fc", "A", 1.0), "A has rank 0", S200, "fc"),
    ("S_not_square", _replace("fc", "S", np.eye(3)[:, :2]), "S is not square: shape (3, 2)",
     S200, "fc"),
    ("A_size_dense", _replace("fc", "A", np.eye(4)), "A has size 4 but Linear", S200, "fc"),
    ("A_size_no_bias", _set(FC, "has_bias", False), "A has size 5 but Linear", S200, "fc"),
    ("S_size_diag", _replace("conv", "S", np.ones(5)), "S has size 5 but Conv2d", S200, "conv"),
    ("shape_vs_factor", _set(FC, "weight_shape", [4, 3]), "A has size 5", S200, "fc"),
    ("A_int", _replace("fc", "A", np.eye(5, dtype=np.int64)), "A has integer dtype int64",
     S200, "fc"),
    ("A_bool", _replace("fc", "A", np.eye(5, dtype=bool)), "A has bool dtype", S200, "fc"),
    ("A_complex", _replace("fc", "A", np.eye(5, dtype=complex)), "A has complex dtype complex128",
     S200, "fc"),
    ("A_float16", _replace("fc", "A", np.eye(5, dtype=np.float16)), "dtype float16", S200, "fc"),
    ("A_nan", _replace("fc", "A", _with((1, 1), psd(5))), "A has non-finite values", S200, "fc"),
    ("A_inf_offdiag", _replace("fc", "A", _with((0, 3), psd(5))), "A has non-finite", S200, "fc"),
    ("S_diag_inf", _replace("conv", "S", np.array([1, np.inf, 1, 1], F32)), "S has non-finite",
     S200, "conv"),
    ("A_asym_f32", _replace("fc", "A", _asymmetric(F32, 1e-2)), "A is not symmetric", S200, "fc"),
    ("A_asym_f64", _replace("fc", "A", _asymmetric(F64, 5e-4)), "A is not symmetric", S200, "fc"),
    ("A_neg_diag", _replace("fc", "A", _negative_diagonal()), "A is not positive semi-definite",
     S200, "fc"),
    ("A_cauchy_schwarz", _replace("fc", "A", _cauchy_schwarz()), "A is not positive semi-definite",
     S200, "fc"),
    ("S_diag_negative", _replace("conv", "S", np.array([1, -0.5, 1, 1], F32)),
     "S is not positive semi-definite: diagonal factor has negative entry", S200, "conv"),
]


@pytest.mark.parametrize(
    ("mutate", "problem", "step", "layer"),
    [pytest.param(*d[1:], id=d[0]) for d in DEFECTS],
)
def test_plain_file_defect_is_one_line_error(tmp_path, mutate, problem, step, layer):
    path = tmp_path / "defect.h5"
    write_plain(path)
    with h5py.File(path, "r+") as f:
        mutate(f)
    with pytest.raises(CheckpointError) as err:
        ck.load(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert problem in message
    if step is not None:
        step_text = step if step.startswith("step ") else f"step {step}"
        assert f": {step_text}: " in message
    if layer is not None:
        assert f": layer {layer}: " in message
    assert isinstance(err.value, CurvlabError)


def _tiny_negative_diagonal(f):
    x = psd(5)
    x[4, :] = x[:, 4] = 0.0
    x[4, 4] = -1e-8 * np.abs(np.diagonal(x)).max()
    _replace("fc", "A", x)(f)


ACCEPTED = [
    ("asym_f32_within_tol", _replace("fc", "A", _asymmetric(F32, 5e-4))),
    ("asym_f64_within_tol", _replace("fc", "A", _asymmetric(F64, 5e-5))),
    ("tiny_negative_diagonal", _tiny_negative_diagonal),
    ("zero_factor", _replace("fc", "S", np.zeros((3, 3)))),
    ("int_bools", lambda f: (f[STEP].attrs.__setitem__("complete", np.int8(1)),
                             f[FC].attrs.__setitem__("has_bias", 1))),
    ("int32_numbers", lambda f: (f[STEP].attrs.__setitem__("step", np.int32(200)),
                                 f.attrs.__setitem__("format_version", np.uint8(1)))),
    ("bytes_strings", lambda f: (f[STEP].attrs.__setitem__("fisher_type", np.bytes_(b"empirical")),
                                 f.attrs.__setitem__("format", np.bytes_(b"curvlab.kfac")))),
    ("unknown_members_ignored", lambda f: (f[FC].create_dataset("A_inv", data=[1.0]),
                                           f[STEP].create_group("future"))),
    ("no_model_group", _delete("model")),
    ("no_weights_group", _delete(f"{STEP}/weights")),
]


@pytest.mark.parametrize("mutate", [pytest.param(m, id=i) for i, m in ACCEPTED])
def test_plain_file_variants_that_are_valid(tmp_path, mutate):
    path = tmp_path / "variant.h5"
    write_plain(path)
    with h5py.File(path, "r+") as f:
        mutate(f)
    loaded = ck.load(path)
    assert list(loaded.steps) == [0, 200]
    assert loaded.steps[200].fisher_type == "empirical"
    assert loaded.steps[200].factors["fc"].has_bias is True


# --------------------------------------------------------------------------------------------------
# Files that are not checkpoints at all


def _text(path: Path) -> None:
    path.write_text("step,loss\n0,2.3\n")


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _truncated(path: Path) -> None:
    ck.save(path, [make_step(0), make_step(1)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _bad_signature(path: Path) -> None:
    ck.save(path, [make_step(0)])
    data = bytearray(path.read_bytes())
    data[:8] = b"\0" * 8
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (_text, "not a readable HDF5 file"),
        (_empty, "not a readable HDF5 file"),
        (_truncated, "truncated"),
        (_bad_signature, "not a readable HDF5 file"),
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "is a folder"),
    ],
    ids=["text", "empty", "truncated_half", "bad_signature", "missing", "folder"],
)
def test_not_a_checkpoint(tmp_path, make, problem):
    path = tmp_path / "ckpt.h5"
    make(path)
    for attempt in (ck.load, CheckpointReader):
        with pytest.raises(CheckpointError) as err:
            attempt(path)
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"{path}: ") and problem in message


def test_h5_file_of_another_tool(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["data"] = np.ones(3)
    with pytest.raises(CheckpointError, match="not a curvlab checkpoint: root attribute format"):
        ck.load(path)


# --------------------------------------------------------------------------------------------------
# Incomplete steps, and readers that never write


def test_incomplete_steps_are_skipped_with_a_warning(tmp_path):
    path = tmp_path / "ckpt.h5"
    write_plain(path, steps=(0, 100, 200, 300), complete=(True, False, None, True))
    with h5py.File(path, "r+") as f:  # an incomplete step may be half written: never looked at
        del f["steps/100/factors/fc/A"]
    with pytest.warns(IncompleteStepWarning) as record:
        loaded = ck.load(path)
    assert list(loaded.steps) == [0, 300]
    messages = [str(w.message) for w in record if w.category is IncompleteStepWarning]
    assert len(messages) == 1  # one warning per file, however many steps (issue 15)
    assert messages[0].startswith(f"{path}: 2 incomplete steps skipped (100, 200; attribute complete")

    with pytest.warns(IncompleteStepWarning) as record:
        assert list(ck.load(path, steps="latest").steps) == [300]
    with pytest.warns(IncompleteStepWarning) as record, CheckpointReader(path) as reader:
        assert reader.step_numbers() == [0, 300]
        assert reader.step_numbers() == [0, 300]  # one warning per file, not per call
        assert reader.incomplete_steps() == [100, 200]
    assert len([w for w in record if w.category is IncompleteStepWarning]) == 1
    with pytest.warns(IncompleteStepWarning), pytest.raises(CheckpointError, match="step 100"):
        ck.load(path, steps=100)


def test_readers_do_not_modify_the_file(tmp_path):
    path = tmp_path / "ckpt.h5"
    write_plain(path, steps=(0, 100, 200), complete=(True, False, True))
    before = snapshot(path)
    time.sleep(0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IncompleteStepWarning)
        ck.load(path)
        ck.load(path, steps="latest", layers="f*", weights=False)
        with CheckpointReader(path) as reader:
            for n in reader.step_numbers():
                reader.step_attrs(n)
                for name in reader.layer_names(n):
                    reader.layer_meta(n, name)
                    reader.read_factors(n, name)
                reader.read_weights(n)
        with pytest.raises(CheckpointError):
            ck.load(path, steps=7)
    assert snapshot(path) == before
    assert os.listdir(tmp_path) == ["ckpt.h5"]


# --------------------------------------------------------------------------------------------------
# Writers: validation first, atomic replacement


def test_save_leaves_no_temp_files_and_replaces_atomically(tmp_path):
    path = tmp_path / "ckpt.h5"
    ck.save(path, make_step(0))
    ck.save(str(path), [make_step(1)])  # replaces the whole file
    assert list(ck.load(path).steps) == [1]
    assert os.listdir(tmp_path) == ["ckpt.h5"]


def _not_square(step: Step) -> Step:
    step.factors["layers.2.fc"].A = step.factors["layers.2.fc"].A[:, :4]
    return step


def _bad_attr(step: Step) -> Step:
    step.attrs["callback"] = print
    return step


def _reserved_attr(step: Step) -> Step:
    step.attrs["complete"] = False
    return step


def _slash_name(step: Step) -> Step:
    step.factors["a/b"] = step.factors.pop("embed")
    return step


def _bad_number(step: Step) -> Step:
    step.step = -3
    return step


def _big_attr(step: Step) -> Step:
    step.attrs["history"] = np.zeros(4096)
    return step


def _object_weight(step: Step) -> Step:
    step.weights["x"] = np.array([None])
    return step


@pytest.mark.parametrize(
    ("spoil", "problem"),
    [
        (_not_square, "step 9: layer layers.2.fc: A is not square: shape (5, 4)"),
        (_bad_attr, "step 9: step attribute 'callback' has a value of type builtin_function"),
        (_reserved_attr, "step 9: bad extra step attribute name 'complete'"),
        (_slash_name, "step 9: bad layer name 'a/b'"),
        (_bad_number, "step number -3 is not a non-negative integer"),
        (_object_weight, "step 9: weight x has dtype object"),
        (_big_attr, "step 9: step attribute 'history' is an array of 32768 bytes"),
    ],
    ids=["not_square", "bad_attr", "reserved_attr", "slash_name", "bad_number", "object_weight",
         "big_attr"],
)
def test_invalid_step_leaves_previous_file_untouched(tmp_path, spoil, problem):
    path = tmp_path / "ckpt.h5"
    ck.save(path, [make_step(0)])
    before = snapshot(path)
    for write in (ck.save, ck.append_step):
        with pytest.raises(CheckpointError) as err:
            write(path, spoil(make_step(9)))
        assert str(err.value).startswith(f"{path}: {problem}")
        assert snapshot(path) == before
        assert os.listdir(tmp_path) == ["ckpt.h5"]


def test_save_rejects_duplicate_steps_and_bad_config(tmp_path):
    path = tmp_path / "ckpt.h5"
    with pytest.raises(CheckpointError, match="step 3 is given twice"):
        ck.save(path, [make_step(3), make_step(3)])
    with pytest.raises(CheckpointError, match="model_config cannot be written as JSON"):
        ck.save(path, [make_step(3)], model_config={"f": object()})
    with pytest.raises(CheckpointError, match="cannot write: folder .*/no/such does not exist"):
        ck.save(tmp_path / "no" / "such" / "folder.h5", [make_step(3)])
    assert os.listdir(tmp_path) == []


def test_validate_layer_in_memory():
    good = LayerFactors("Conv2d", (4, 2, 3, 3), True, psd(19), diag(4))
    ck.validate_layer(good)
    bad = LayerFactors("Conv2d", (4, 2, 3, 3), False, psd(19), diag(4))
    with pytest.raises(CheckpointError) as err:
        ck.validate_layer(bad, path="run/ckpt.h5", step=200, layer="layers.0.conv1")
    assert str(err.value) == (
        "run/ckpt.h5: step 200: layer layers.0.conv1: A has size 19 but Conv2d with "
        "weight_shape (4, 2, 3, 3) and has_bias=False needs 18"
    )
    with pytest.raises(CheckpointError, match="^A has size 19"):
        ck.validate_layer(bad)
    with pytest.raises(CheckpointError, match="layer fc: S is a list, not a numpy array"):
        ck.validate_layer(LayerFactors("Linear", (1, 1), False, np.ones(1), [1.0]), layer="fc")


def test_append_step(tmp_path):
    path = tmp_path / "run" / "ckpt.h5"
    path.parent.mkdir()
    first, second = make_step(0, seed=0), make_step(100, seed=1)
    ck.append_step(path, first, model_name="tiny", model_config={"w": 3})  # creates the file
    os.chmod(path, 0o640)
    ck.append_step(path, second, model_name="tiny", model_config={"w": 3})
    assert os.stat(path).st_mode & 0o777 == 0o640
    assert os.listdir(path.parent) == ["ckpt.h5"]
    loaded = ck.load(path)
    assert (loaded.model_name, loaded.model_config) == ("tiny", {"w": 3})
    assert_step_equal(loaded.steps[0], first)
    assert_step_equal(loaded.steps[100], second)

    before = snapshot(path)
    with pytest.raises(CheckpointError, match="step 100: already holds a complete step"):
        ck.append_step(path, make_step(100, seed=5))
    with pytest.raises(CheckpointError, match="model name 'other' differs"):
        ck.append_step(path, make_step(200), model_name="other")
    with pytest.raises(CheckpointError, match="model_config differs"):
        ck.append_step(path, make_step(200), model_config={"w": 4})
    assert snapshot(path) == before

    replacement = make_step(100, seed=5, weights=False)
    ck.append_step(path, replacement, replace=True)
    loaded = ck.load(path)
    assert_step_equal(loaded.steps[100], replacement)
    assert_step_equal(loaded.steps[0], first)


def test_writers_follow_a_symlink(tmp_path):
    real = tmp_path / "real.h5"
    link = tmp_path / "link.h5"
    ck.save(real, make_step(0))
    link.symlink_to(real)
    ck.append_step(link, make_step(1))
    assert link.is_symlink() and list(ck.load(real).steps) == [0, 1]
    ck.save(link, make_step(2))
    assert link.is_symlink() and list(ck.load(real).steps) == [2]
    assert sorted(os.listdir(tmp_path)) == ["link.h5", "real.h5"]


def test_append_replaces_an_incomplete_step_and_adds_model(tmp_path):
    path = tmp_path / "ckpt.h5"
    write_plain(path, steps=(0, 200), complete=(True, False))
    with h5py.File(path, "r+") as f:
        del f["model"]
    new = make_step(200)
    ck.append_step(path, new, model_name="tiny")
    loaded = ck.load(path)  # no warning: the incomplete step was replaced
    assert list(loaded.steps) == [0, 200] and loaded.model_name == "tiny"
    assert_step_equal(loaded.steps[200], new)


def test_append_to_something_else_fails_cleanly(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("not hdf5")
    with pytest.raises(CheckpointError, match="not a readable HDF5 file"):
        ck.append_step(path, make_step(0))
    assert path.read_text() == "not hdf5" and os.listdir(tmp_path) == ["notes.h5"]


# --------------------------------------------------------------------------------------------------
# Hypothesis: random valid factor sets round-trip exactly


@st.composite
def layer_factors(draw) -> LayerFactors:
    module_type = draw(st.sampled_from(MODULE_TYPES))
    dims = draw(st.lists(st.integers(1, 4), min_size=5, max_size=5))
    rank = {"Conv1d": 3, "Conv2d": 4, "Conv3d": 5, "NormAffine": draw(st.integers(1, 3))}.get(module_type, 2)
    shape = tuple(dims[:rank])
    has_bias = module_type != "Embedding" and draw(st.booleans())
    size_a, size_s = ck.expected_factor_sizes(module_type, shape, has_bias)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if module_type == "NormAffine":  # exact per-channel blocks (C, k, k) and S = [1]
        k = 2 if has_bias else 1
        x = rng.standard_normal((size_a, k + 1, k))
        blocks = (x.transpose(0, 2, 1) @ x).astype(draw(st.sampled_from([F32, F64])))
        blocks = (blocks + blocks.transpose(0, 2, 1)) / 2
        return LayerFactors(module_type, shape, has_bias, blocks, np.ones(1))

    def factor(n: int) -> np.ndarray:
        dtype = draw(st.sampled_from([F32, F64]))
        scale = 10.0 ** draw(st.integers(-20, 20))
        kind = draw(st.sampled_from(["dense", "diagonal", "zero", "rank1"]))
        if kind == "diagonal":
            return (rng.random(n) * scale).astype(dtype)
        x = rng.standard_normal((1 if kind == "rank1" else n + 2, n)) * (kind != "zero")
        m = x.T @ x * scale
        return ((m + m.T) / 2).astype(dtype)

    return LayerFactors(module_type, shape, has_bias, factor(size_a), factor(size_s))


names = st.text(st.sampled_from("abc.0123_"), min_size=1, max_size=6).filter(lambda s: s != ".")
steps_strategy = st.lists(
    st.builds(
        Step,
        step=st.integers(0, 10**12),
        fisher_type=st.sampled_from(["empirical", "mc", "exact"]),
        num_examples=st.integers(0, 2**40),
        factors=st.dictionaries(names, layer_factors(), max_size=3),
        weights=st.none() | st.dictionaries(names, st.just(np.arange(3.0)), max_size=2),
        attrs=st.dictionaries(
            st.sampled_from(["ema_decay", "damping", "seed", "note"]),
            st.floats(allow_nan=False, allow_infinity=False)  # non-finite extras are refused (issue 15)
            | st.integers(-(2**63), 2**63 - 1)
            | st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\0"),
                      max_size=5),
            max_size=3,
        ),
    ),
    max_size=3,
    unique_by=lambda s: s.step,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=steps_strategy, config=st.none() | st.dictionaries(names, st.integers(), max_size=2))
def test_random_valid_checkpoints_round_trip_exactly(steps, config):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "ckpt.h5")
        ck.save(path, steps, model_config=config)
        loaded = ck.load(path)
        assert list(loaded.steps) == sorted(s.step for s in steps)
        assert loaded.model_config == config
        for step in steps:
            assert_step_equal(loaded.steps[step.step], step)
        assert os.listdir(folder) == ["ckpt.h5"]


# --------------------------------------------------------------------------------------------------
# SIGKILL during append_step: the file always holds the old steps, or the old steps plus the new one

CHILD = r'''
import os, signal, sys

import numpy as np


def big_step(ck, n=2000):
    """About 100 MB of float64 factors: writing them takes a noticeable time."""
    rng = np.random.default_rng(1234)

    def dense():
        r = rng.uniform(-1.0, 1.0, size=(n, n))
        x = (r + r.T) * 0.5
        x[np.diag_indices(n)] = n  # diagonally dominant, hence positive definite
        return x

    factors = {
        "fc1": ck.LayerFactors("Linear", (n, n - 1), True, dense(), dense()),
        "fc2": ck.LayerFactors("Linear", (n, n), False, dense(), np.full(n, 2.0)),
    }
    return ck.Step(300, "mc", 1000, factors, {"fc2.weight": np.ones((4, 4))}, {"mc_samples": 1})


def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def after(fn):
    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        die()
        return out
    return wrapped


def install(mode, ck):
    import h5py
    import shutil

    if mode == "before_copy":
        shutil.copyfile = die
    elif mode == "after_copy":
        shutil.copyfile = after(shutil.copyfile)
    elif mode == "mid_write":  # after the third factor dataset of the new step
        original, calls = h5py.Group.create_dataset, []

        def create_dataset(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            calls.append(1)
            if len(calls) == 3:
                die()
            return out
        h5py.Group.create_dataset = create_dataset
    elif mode == "before_complete":
        from curvlab.io.checkpoint import writer
        writer._mark_complete = die
    elif mode == "before_fsync":
        os.fsync = die
    elif mode == "before_replace":
        os.replace = die
    elif mode == "after_replace":
        os.replace = after(os.replace)


if __name__ == "__main__":
    repo, path, mode = sys.argv[1:4]
    # Import curvlab.io.checkpoint (and curvlab.errors) without running curvlab/__init__.py, which
    # imports torch: that would add about a second to each of the many children of these tests.
    import types
    package = types.ModuleType("curvlab")
    package.__path__ = [os.path.join(repo, "curvlab")]
    sys.modules["curvlab"] = package
    from curvlab.io import checkpoint as ck

    step = big_step(ck)
    install(mode, ck)
    print("ready", flush=True)
    ck.append_step(path, step)
    print("done", flush=True)
'''

KILL_OLD = ["before_copy", "after_copy", "mid_write", "before_complete", "before_fsync",
            "before_replace"]
KILL_NEW = ["after_replace"]


@pytest.fixture(scope="module")
def crash_setup(tmp_path_factory):
    """The child script, the step it appends, and a checkpoint holding two complete steps."""
    folder = tmp_path_factory.mktemp("crash")
    script = folder / "child.py"
    script.write_text(CHILD)
    new_step = runpy.run_path(str(script), run_name="child")["big_step"](ck)
    base = folder / "base.h5"
    ck.save(base, [make_step(0, seed=0), make_step(100, seed=1)], model_name="tiny")
    return script, new_step, base, ck.load(base)


def run_child(
    script: Path, path: Path, mode: str, delay: float | None
) -> tuple[int, float, int]:
    """Start the child, kill it ``delay`` s after it reports ready (None: never).

    Returns its exit status, the seconds from "ready" to its end, and its pid.
    """
    proc = subprocess.Popen(
        [sys.executable, str(script), str(REPO), str(path), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "child did not start within 60 s"
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        start = time.monotonic()
        if delay is not None:
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
        rc = proc.wait(timeout=60)
        return rc, time.monotonic() - start, proc.pid
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


def check_after_crash(path: Path, base: Path, old: Checkpoint, new_step: Step, pid: int) -> bool:
    """Old steps intact (bytes identical if the append did not land); True if the new step is in."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", IncompleteStepWarning)  # never a half-written step
        loaded = ck.load(path)
    assert set(loaded.steps) in ({0, 100}, {0, 100, 300})
    for number, step in old.steps.items():
        assert_step_equal(loaded.steps[number], step)
    appended = 300 in loaded.steps
    if appended:
        assert_step_equal(loaded.steps[300], new_step)
    else:
        assert path.read_bytes() == base.read_bytes()
    for name in temp_files(path.parent):  # a stale temp file is recognisable by name and pid
        assert re.fullmatch(rf"\.{re.escape(path.name)}\.tmp-{pid}-[0-9a-f]{{8}}", name), name
    return appended


def fresh_copy(base: Path, folder: Path) -> Path:
    folder.mkdir()
    path = folder / "ckpt.h5"
    path.write_bytes(base.read_bytes())
    return path


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
@pytest.mark.parametrize("mode", KILL_OLD + KILL_NEW)
def test_sigkill_at_deterministic_points(tmp_path, crash_setup, mode):
    script, new_step, base, old = crash_setup
    path = fresh_copy(base, tmp_path / mode)
    rc, _, pid = run_child(script, path, mode, delay=None)
    assert rc == -signal.SIGKILL
    appended = check_after_crash(path, base, old, new_step, pid)
    assert appended == (mode in KILL_NEW)
    assert len(temp_files(path.parent)) == (0 if mode in ("before_copy", "after_replace") else 1)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_sigkill_at_wall_clock_delays(tmp_path, crash_setup):
    script, new_step, base, old = crash_setup
    path = fresh_copy(base, tmp_path / "baseline")
    rc, duration, pid = run_child(script, path, "none", delay=None)  # one append's duration here
    assert rc == 0 and check_after_crash(path, base, old, new_step, pid)
    assert temp_files(path.parent) == []

    outcomes = []
    for i, fraction in enumerate([0.0, 0.1, 0.25, 0.45, 0.65, 0.85, 1.0]):
        path = fresh_copy(base, tmp_path / f"kill{i}")
        rc, _, pid = run_child(script, path, "none", delay=fraction * duration)
        appended = check_after_crash(path, base, old, new_step, pid)
        outcomes.append((rc, appended))
    killed = [appended for rc, appended in outcomes if rc == -signal.SIGKILL]
    assert len(killed) >= 3, outcomes  # most kills land while the append is running
    assert not killed[0], outcomes  # killed at once: the old file, byte for byte
