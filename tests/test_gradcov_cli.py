"""``curvlab gradcov`` end to end on real checkpoints written by ``curvlab factors``."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import h5py
import matplotlib.image
import numpy as np
import pytest

from curvlab.commands import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("gradcov") / "x.h5"
    args = ["factors", "--model", "mlp", "--model-arg", "widths=12", "--examples", "96", "--quiet"]
    assert main([*args, "--fisher", "exact", "-o", str(path)]) == 0
    return path


def _run(*args):
    command = [sys.executable, "-m", "curvlab", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_gradcov_json_file_and_plot(checkpoint, tmp_path, capsys):
    before = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    out, plot = tmp_path / "g.h5", tmp_path / "g.png"
    argv = ["gradcov", str(checkpoint), "--examples", "64", "--quiet", "-o", str(out), "--plot", str(plot)]
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == before
    for key in ("num_directions", "spearman", "median_abs_log10_ratio", "layers", "fvp_vs_exact_max_rel_err"):
        assert key in summary
    assert summary["num_directions"] == 12 * 65 + 10 * 13
    assert summary["fvp_vs_exact_max_rel_err"] < 1e-8  # two routes to the same float64 numbers
    assert [layer["name"] for layer in summary["layers"]] == ["hidden.0", "fc"]
    with h5py.File(out) as f:
        assert f.attrs["format"] == "curvlab.gradcov"
        g = f["layers/fc"]
        assert g["variance"].shape == g["curvature"].shape == g["kfac_eigenvalue"].shape == (10, 13)
        i, j = g["selected_i"][:], g["selected_j"][:]
        curvature = g["curvature"][:]
        # relative 1e-8, except in the numerical null space (below 1e-12 of the largest value)
        np.testing.assert_allclose(
            g["selected_fvp_curvature"][:], curvature[i, j], rtol=1e-8, atol=1e-12 * curvature.max()
        )
    image = matplotlib.image.imread(plot)
    assert image.ndim == 3 and image.shape[0] > 200 and image.std() > 0.05


def test_gradcov_fvp_route_and_mc(checkpoint, tmp_path, capsys):
    out = str(tmp_path / "f.h5")
    assert main(["gradcov", str(checkpoint), "--examples", "32", "--quiet", "--curvature", "fvp",
                 "--directions", "3", "-o", out, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["curvature_route"] == "fvp" and summary["num_directions"] == 6
    assert main(["gradcov", str(checkpoint), "--examples", "32", "--quiet", "--curvature", "mc",
                 "-o", out, "--json"]) == 0
    assert "fvp_vs_mc_max_rel_err" in json.loads(capsys.readouterr().out)


def _one_line_error(run, *fragments):
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("curvlab: error:") and "Traceback" not in run.stderr
    for fragment in fragments:
        assert fragment in lines[-1]


def test_gradcov_errors(checkpoint, tmp_path):
    no_weights = tmp_path / "nw.h5"
    with h5py.File(checkpoint) as src, h5py.File(no_weights, "w") as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        src.copy(src["steps"], dst, "steps")
        src.copy(src["model"], dst, "model")
        del dst["steps/0/weights"]
    _one_line_error(_run("gradcov", str(no_weights), "-o", str(tmp_path / "o.h5")), "nw.h5", "weights")
    _one_line_error(_run("gradcov", str(checkpoint), "--step", "3", "-o", str(tmp_path / "o.h5")), "step 3")
    _one_line_error(_run("gradcov", str(checkpoint), "-o", str(checkpoint)), "refusing")
    _one_line_error(
        _run("gradcov", str(checkpoint), "--layers", "conv*", "-o", str(tmp_path / "o.h5")), "conv*"
    )
    bad = tmp_path / "bad.h5"
    bad.write_text("nope")
    _one_line_error(_run("gradcov", str(bad)), "bad.h5")
