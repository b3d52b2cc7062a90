"""``--loss``, ``--ignore-index`` and ``--label-smoothing`` on the command line: recorded with the step,
used by gradcov, kept by ``train --resume``; wrong heads and labels are one line, exit status 2."""

from __future__ import annotations

import json
import os

import h5py
import pytest

from curvlab.commands import main
from curvlab.io.checkpoint import CheckpointReader

BASE = ["--model", "mlp", "--model-arg", "widths=8", "--examples", "48", "--quiet"]


def _error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("curvlab: error:") and "\n" not in err and "Traceback" not in err, err
    return err


def _step_attrs(path, step=None):
    with CheckpointReader(path) as reader:
        return reader.step_attrs(step if step is not None else reader.step_numbers()[-1])


@pytest.fixture(scope="module")
def smoothed(tmp_path_factory):
    path = tmp_path_factory.mktemp("loss") / "f.h5"
    assert main(["factors", *BASE, "--fisher", "empirical", "--label-smoothing", "0.1", "--ignore-index",
                 "-100", "-o", str(path)]) == 0
    return path


def test_factors_record_the_loss_and_gradcov_uses_it(smoothed, tmp_path, capsys):
    attrs = _step_attrs(smoothed)
    assert attrs["loss"] == "cross-entropy"
    assert (attrs["loss_label_smoothing"], attrs["loss_ignore_index"]) == (0.1, -100)
    capsys.readouterr()
    assert main(["gradcov", str(smoothed), "--examples", "32", "--quiet", "-o", str(tmp_path / "g.h5"),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["loss"] == "cross-entropy"
    assert summary["loss_options"] == {"ignore_index": -100, "label_smoothing": 0.1}
    with h5py.File(tmp_path / "g.h5") as f:
        assert f.attrs["loss"] == "cross-entropy" and f.attrs["loss_label_smoothing"] == 0.1
    # the same options again are fine; others disagree with the factors
    assert main(["gradcov", str(smoothed), "--examples", "32", "--quiet", "--curvature", "fvp",
                 "--label-smoothing", "0.1", "-o", str(tmp_path / "h.h5")]) == 0
    err = _error(capsys, ["gradcov", str(smoothed), "--examples", "32", "--quiet", "--loss", "bce",
                          "-o", str(tmp_path / "x.h5")])
    assert "the factors were made with loss cross-entropy (ignore_index=-100, label_smoothing=0.1)" in err
    assert not os.path.exists(tmp_path / "x.h5")


def test_a_file_without_a_loss_record_is_cross_entropy_unless_told(tmp_path, capsys):
    path = tmp_path / "old.h5"
    assert main(["factors", *BASE, "--fisher", "exact", "-o", str(path)]) == 0
    with h5py.File(path, "r+") as f:  # as written before the loss was recorded
        for step in f["steps"].values():
            del step.attrs["loss"]
    capsys.readouterr()
    argv = ["gradcov", str(path), "--examples", "32", "--quiet", "--curvature", "fvp", "--json"]
    assert main([*argv, "-o", str(tmp_path / "a.h5")]) == 0
    assert json.loads(capsys.readouterr().out)["loss_options"] == {}
    assert main([*argv, "--label-smoothing", "0.2", "-o", str(tmp_path / "b.h5")]) == 0
    assert json.loads(capsys.readouterr().out)["loss_options"] == {"label_smoothing": 0.2}


def test_wrong_loss_options_heads_and_labels_are_one_line(tmp_path, capsys):
    out = str(tmp_path / "o.h5")
    err = _error(capsys, ["factors", *BASE, "--loss", "mse", "-o", out])
    assert "digits: batch 0: mse targets of shape (48,) do not fit outputs (48, 10)" in err
    err = _error(capsys, ["factors", *BASE, "--loss", "bce", "--ignore-index", "-100", "-o", out])
    assert "--ignore-index is an option of cross-entropy, not of bce" in err
    assert "label_smoothing must be in [0, 1], got 1.5" in _error(
        capsys, ["factors", *BASE, "--label-smoothing", "1.5", "-o", out])
    assert not os.path.exists(out)
    err = _error(capsys, ["train", *BASE, "--steps", "1", "--loss", "mse", "--label-smoothing", "0.1",
                          "-o", str(tmp_path / "run")])
    assert "--label-smoothing is an option of cross-entropy, not of mse" in err


def test_train_records_the_loss_and_resume_keeps_it(tmp_path, capsys):
    run = str(tmp_path / "run")
    argv = ["train", *BASE, "--batch-size", "16", "--factor-examples", "16", "--label-smoothing", "0.05",
            "--ignore-index", "-100", "-o", run]
    assert main([*argv, "--steps", "2"]) == 0
    with open(os.path.join(run, "config.json")) as f:
        stored = json.load(f)["train"]
    assert (stored["loss"], stored["ignore_index"], stored["label_smoothing"]) == ("cross-entropy", -100,
                                                                                     0.05)
    attrs = _step_attrs(os.path.join(run, "ckpt.h5"), 2)
    assert attrs["loss"] == "cross-entropy"
    assert (attrs["loss_ignore_index"], attrs["loss_label_smoothing"]) == (-100, 0.05)
    err = _error(capsys, ["train", "--loss", "mse", "--resume", "-o", run])
    assert "--resume with loss='mse' but the run was started with 'cross-entropy'" in err
    assert main(["train", "--steps", "3", "--resume", "--quiet", "-o", run]) == 0
    assert _step_attrs(os.path.join(run, "ckpt.h5"), 3)["loss_label_smoothing"] == 0.05
    # factors --weights takes the loss the step records
    out = tmp_path / "w.h5"
    assert main(["factors", "--weights", os.path.join(run, "ckpt.h5"), "--examples", "32", "--quiet",
                 "-o", str(out)]) == 0
    attrs = _step_attrs(out)
    assert (attrs["loss_ignore_index"], attrs["loss_label_smoothing"]) == (-100, 0.05)
