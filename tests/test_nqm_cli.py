"""``curvlab nqm steps`` and ``curvlab nqm figure`` end to end (in-process and as subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from curvlab.commands import main
from curvlab.nqm.analysis import Grid, paper_decay_grid, steps_to_target
from curvlab.nqm.problem import default_problem


def _run(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "curvlab", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _assert_one_line_error(code: int, stderr: str, *fragments: str) -> None:
    assert code == 2, stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("curvlab: error:"), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _main_error(capsys, args: list[str]) -> tuple[int, str]:
    """Run ``main`` in-process; parser errors exit through SystemExit(2), handler errors return 2."""
    try:
        code = main(args)
    except SystemExit as exc:
        code = int(exc.code)
    return code, capsys.readouterr().err


def test_steps_json_matches_the_library(capsys):
    args = ["nqm", "steps", "--target", "0.01", "--batch-sizes", "4,2^6,2^10..2^12", "--mode", "binned",
            "--json", "--quiet"]
    assert main(args) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["batch_size"] for r in records] == [4, 64, 1024, 2048, 4096]
    assert all(set(r) == {"batch_size", "steps", "lr"} for r in records)
    lib = steps_to_target(default_problem(mode="binned"), 0.01, [4, 64, 1024, 2048, 4096],
                          Grid("sgd", np.geomspace(1e-5, 10**0.5, 100)))
    assert [r["steps"] for r in records] == lib.steps.tolist()
    assert [r["lr"] for r in records] == lib.lr.tolist()


def test_steps_tuned_momentum_and_ema(capsys):
    base = ["nqm", "steps", "--target", "0.02", "--batch-sizes", "16,4096", "--mode", "binned", "--quiet"]
    assert main([*base, "--momentum", "tuned", "--lr-grid", "30", "--decay-grid", "6", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    grid = Grid("momentum", np.geomspace(1e-8, 10, 30), paper_decay_grid(6))
    lib = steps_to_target(default_problem(mode="binned"), 0.02, [16, 4096], grid)
    assert [r["steps"] for r in records] == lib.steps.tolist()
    assert [r["momentum"] for r in records] == lib.decay.tolist()
    assert records[1]["effective_lr"] == pytest.approx(records[1]["lr"] / (1 - records[1]["momentum"]))
    assert main([*base, "--ema", "0.9", "--precond", "0.5", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert all(r["ema_decay"] == 0.9 and r["steps"] > 0 for r in records)
    assert main([*base, "--momentum", "0.9"]) == 0
    text = capsys.readouterr().out
    assert "binned mode" in text and "momentum 0.9" in text and "effective lr" in text


def test_steps_reports_never(capsys):
    args = ["nqm", "steps", "--target", "1e-9", "--batch-sizes", "4", "--mode", "binned", "--quiet"]
    assert main(args) == 0
    assert "never reaches" in capsys.readouterr().out
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"batch_size": 4, "steps": None, "lr": None}]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["steps", "--batch-sizes", "4"], "--target is required"),
        (["steps", "--target", "-1", "--batch-sizes", "4"], "--target"),
        (["steps", "--target", "abc", "--batch-sizes", "4"], "must be a number"),
        (["steps", "--target", "0.01"], "--batch-sizes is required"),
        (["steps", "--target", "0.01", "--batch-sizes", "4,0"], "'0'"),
        (["steps", "--target", "0.01", "--batch-sizes", "2^3..2^1"], "2^3..2^1"),
        (["steps", "--target", "0.01", "--batch-sizes", "4", "--momentum", "1.5"], "--momentum"),
        (["steps", "--target", "0.01", "--batch-sizes", "4", "--momentum", "tuned", "--ema", "0.9"],
         "combined"),
        (["steps", "--target", "0.01", "--batch-sizes", "4", "--mode", "fast"], "--mode"),
        (["steps", "--target", "0.01", "--batch-sizes", "4", "--precond", "2"], "--precond"),
        (["steps", "--target", "0.01", "--batch-sizes", "4", "--lr-grid", "0"], "--lr-grid"),
        (["steps", "--target", "0.01", "--batch-sizes", "4", "--lr-min", "1", "--lr-max", "0.1"], "--lr-max"),
        (["figure", "12", "--out", "x"], "unknown figure"),
        (["figure", "11"], "--out"),
        (["figure"], "N"),
        ([], "ACTION"),
    ],
)
def test_invalid_arguments_one_line_exit_2(capsys, args, fragment):
    _assert_one_line_error(*_main_error(capsys, ["nqm", *args]), fragment)


def test_invalid_argument_as_a_subprocess():
    run = _run("nqm", "steps", "--target", "0.01", "--batch-sizes", "4,x")
    _assert_one_line_error(run.returncode, run.stderr, "--batch-sizes")
    assert run.stdout == ""


def test_figure_11_and_13_write_png_and_json(tmp_path, capsys):
    run = _run("nqm", "figure", "11", "--out", str(tmp_path / "figs"))
    assert run.returncode == 0, run.stderr
    assert "[nqm figure 11]" in run.stderr and "wrote" in run.stdout
    data = json.loads((tmp_path / "figs" / "fig11.json").read_text())
    assert data["figure"] == "11" and data["mode"].startswith("analytic") and len(data["momentum"]) == 4
    assert Image.open(tmp_path / "figs" / "fig11.png").size[0] > 300
    assert main(["nqm", "figure", "fig13", "--out", str(tmp_path), "--mode", "binned"]) == 0
    assert "[nqm figure 13]" in capsys.readouterr().err  # progress on stderr
    data = json.loads((tmp_path / "fig13.json").read_text())
    assert data["mode"] == "binned" and data["problem"]["d"] == 10_000
    assert data["batch_sizes"][0] == 4 and data["batch_sizes"][-1] == 2**20
    assert len(data["steps"]) == len(data["thresholds"]) == 5
    Image.open(tmp_path / "fig13.png").verify()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig13.json", "fig13.png", "figs"]  # no temp files


def test_figure_json(tmp_path, capsys):
    out = tmp_path / "figs"
    assert main(["nqm", "figure", "11", "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary == {"out": str(out), "figures": [{"figure": "11", "png": str(out / "fig11.png"),
                                                     "json": str(out / "fig11.json"), "mode": "closed forms",
                                                     "d": None}]}
    assert captured.err == ""  # --json keeps stderr for errors and warnings
    Image.open(out / "fig11.png").verify()


def test_figure_into_unwritable_place(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = _main_error(capsys, ["nqm", "figure", "11", "--out", str(blocker / "sub")])
    _assert_one_line_error(code, err, "cannot create")


@pytest.mark.slow
def test_figure_14_and_15_binned(tmp_path):
    assert main(["nqm", "figure", "14", "--out", str(tmp_path), "--mode", "binned", "--quiet"]) == 0
    for name in ("14a", "14b", "14c"):
        data = json.loads((tmp_path / f"fig{name}.json").read_text())
        assert data["mode"] == "binned" and len(data["optimal_lr"]) == 4
        assert ("dashed" in data) == (name != "14a")
        Image.open(tmp_path / f"fig{name}.png").verify()
    assert main(["nqm", "figure", "15", "--out", str(tmp_path), "--quiet"]) == 0
    data = json.loads((tmp_path / "fig15.json").read_text())
    assert data["mode"] == "binned" and 0.8 <= data["loglog_slope_b_le_64"] <= 1.25


@pytest.mark.slow
def test_figure_13_exact(tmp_path):
    assert main(["nqm", "figure", "13", "--out", str(tmp_path), "--quiet"]) == 0
    assert json.loads((tmp_path / "fig13.json").read_text())["mode"] == "exact"
