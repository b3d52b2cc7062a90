"""The ``factors`` and ``info`` commands end to end, on real files, in-process and as subprocesses."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from curvlab.commands import main
from curvlab.io.checkpoint import load

SMALL_MLP = ["--model", "mlp", "--model-arg", "widths=16", "--examples", "64", "--quiet"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "curvlab", *args], capture_output=True, text=True, timeout=300
    )


def test_factors_then_info_json(tmp_path, capsys):
    out = tmp_path / "x.h5"
    assert main(["factors", *SMALL_MLP, "--fisher", "exact", "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format_version"] == 2
    (step,) = info["steps"]
    assert step["step"] == 0 and step["complete"] is True
    assert step["fisher_type"] == "exact" and step["num_examples"] == 64
    names = [layer["name"] for layer in step["layers"]]
    assert len(names) == 2
    first = step["layers"][0]
    assert first["module_type"] == "Linear"
    assert first["A_shape"] == [65, 65] and first["S_shape"] == [16, 16]
    assert first["A_kind"] == first["S_kind"] == "dense"
    assert first["A"]["symmetry_error"] < 1e-12
    ckpt = load(str(out))
    assert ckpt.model_name == "mlp" and ckpt.model_config["args"]["widths"] == [16]
    assert ckpt.steps[0].weights  # weights saved so later commands need nothing else


def test_info_table(tmp_path, capsys):
    out = tmp_path / "x.h5"
    main(["factors", *SMALL_MLP, "--fisher", "empirical", "-o", str(out)])
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "step 0: fisher=empirical, examples=64" in text and "Linear" in text


def test_resnet8_on_digits_subprocess(tmp_path):
    out = tmp_path / "r.h5"
    run = _run("factors", "--model", "resnet8", "--data", "digits", "--examples", "48", "-o", str(out))
    assert run.returncode == 0, run.stderr
    info = json.loads(_run("info", str(out), "--json").stdout)
    layers = info["steps"][0]["layers"]
    conv = [layer for layer in layers if layer["module_type"] == "Conv2d"]
    assert len(conv) >= 7 and layers[-1]["module_type"] == "Linear"
    assert all(layer["A_shape"][0] == layer["A_shape"][1] for layer in layers)


def test_factors_from_weights_reproduces_the_factors(tmp_path, capsys):
    """``--weights`` rebuilds the model from the checkpoint: the exact factors come out identical."""
    first = tmp_path / "a.h5"
    second = tmp_path / "b.h5"
    main(["factors", *SMALL_MLP, "--fisher", "exact", "--seed", "3", "-o", str(first)])
    before = _digest(first)
    args = ["factors", "--weights", str(first), "--examples", "64", "--fisher", "exact", "--quiet"]
    assert main([*args, "--seed", "9", "-o", str(second)]) == 0
    assert _digest(first) == before  # the input is never modified
    a, b = load(str(first)).steps[0], load(str(second)).steps[0]
    for name in a.factors:
        np.testing.assert_array_equal(a.factors[name].A, b.factors[name].A)
        np.testing.assert_array_equal(a.factors[name].S, b.factors[name].S)


def test_append_adds_a_step(tmp_path, capsys):
    source = tmp_path / "x.h5"
    out = tmp_path / "y.h5"
    main(["factors", *SMALL_MLP, "-o", str(source)])
    main(["factors", *SMALL_MLP, "-o", str(out)])
    args = ["factors", "--weights", str(source), "--examples", "32", "--quiet", "--append", "-o", str(out)]
    assert main([*args, "--as-step", "10"]) == 0
    assert sorted(load(str(out)).steps) == [0, 10]
    assert load(str(out)).steps[10].num_examples == 32
    # the same step again is refused, and the file keeps both steps
    assert main([*args, "--as-step", "10"]) == 2
    assert "step 10" in capsys.readouterr().err
    assert sorted(load(str(out)).steps) == [0, 10]


def _assert_one_line_error(run: subprocess.CompletedProcess, *fragments: str) -> None:
    assert run.returncode == 2, (run.stdout, run.stderr)
    lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("curvlab: error:")]
    # progress bars may come first; the error is exactly one line, and it is the last
    assert len(errors) == 1 and lines[-1] == errors[0], run.stderr
    assert "Traceback" not in run.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_info_on_bad_files(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not hdf5\n")
    _assert_one_line_error(_run("info", str(text)), "notes.txt")
    _assert_one_line_error(_run("info", str(tmp_path / "missing.h5")), "missing.h5")
    good = tmp_path / "good.h5"
    main(["factors", *SMALL_MLP, "-o", str(good)])
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    before = _digest(truncated)
    _assert_one_line_error(_run("info", str(truncated)), "truncated.h5")
    assert _digest(truncated) == before


def test_info_on_hand_written_wrong_file(tmp_path):
    """A plain-h5py file with a factor whose size disagrees with its weight shape."""
    path = tmp_path / "wrong.h5"
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "curvlab.kfac"
        f.attrs["format_version"] = 1
        step = f.create_group("steps/5")
        step.attrs.update({"step": 5, "fisher_type": "mc", "num_examples": 3})
        layer = step.create_group("factors/fc")
        layer.attrs.update({"module_type": "Linear", "weight_shape": [4, 3], "has_bias": True})
        layer["A"] = np.eye(3)  # should be 4 = 3 inputs + bias
        layer["S"] = np.eye(4)
        step.attrs["complete"] = True
    _assert_one_line_error(_run("info", str(path)), "wrong.h5", "step 5", "fc")


def test_factors_bad_options(tmp_path):
    out = str(tmp_path / "o.h5")
    _assert_one_line_error(
        _run("factors", "--model", "mlp", "--model-arg", "nonsense=3", "--examples", "8", "-o", out),
        "nonsense",
    )
    _assert_one_line_error(
        _run("factors", "--model", "mlp", "--layers", "conv*", "--examples", "8", "-o", out), "conv*"
    )
    _assert_one_line_error(
        _run("factors", "--model", "mlp", "--examples", "8", "-o", str(tmp_path / "no" / "o.h5")), "o.h5"
    )
    _assert_one_line_error(_run("factors", "--model", "mlp", "--data", "npz:/nope.npz", "-o", out), "nope")
    assert not Path(out).exists()


def test_factors_refuses_to_overwrite_its_weights_input(tmp_path):
    ckpt = tmp_path / "w.h5"
    main(["factors", *SMALL_MLP, "-o", str(ckpt)])
    before = _digest(ckpt)
    _assert_one_line_error(_run("factors", "--weights", str(ckpt), "-o", str(ckpt)), "w.h5")
    _assert_one_line_error(_run("factors", "--weights", str(ckpt), "--step", "7", "-o", "z.h5"), "step 7")
    assert _digest(ckpt) == before


@pytest.mark.parametrize("argv", [["--version"], ["info", "--help"], ["factors", "--help"]])
def test_help_and_version(argv):
    run = _run(*argv)
    assert run.returncode == 0 and run.stdout


def test_device_cuda_without_gpu_is_a_one_line_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    run = _run("factors", *SMALL_MLP, "--device", "cuda", "-o", str(tmp_path / "o.h5"))
    _assert_one_line_error(run, "--device cuda")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["resnet8", "simple_cnn"])
def test_full_digits_capture_end_to_end(tmp_path, model):
    """The whole digits training split, every Fisher type; the small version is above (48 examples)."""
    for fisher in ("empirical", "mc", "exact"):
        out = tmp_path / f"{model}-{fisher}.h5"
        run = _run("factors", "--model", model, "--fisher", fisher, "-o", str(out))
        assert run.returncode == 0, run.stderr
        info = json.loads(_run("info", str(out), "--json").stdout)
        (step,) = info["steps"]
        assert step["num_examples"] == 1438 and step["fisher_type"] == fisher
        for layer in step["layers"]:
            assert layer["A"]["diag_min"] >= 0 and layer["S"]["diag_min"] >= 0
            assert layer["A"]["symmetry_error"] == 0 and layer["S"]["symmetry_error"] == 0
