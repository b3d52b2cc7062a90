"""``curvlab train``: schedules, the four optimizers, checkpoints, metrics, resume after a crash."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from curvlab.commands import main
from curvlab.io.checkpoint import CheckpointReader, load, writer
from curvlab.optim.train import BatchOrder, TrainConfig, learning_rate, read_config, save_steps, train


@pytest.fixture(autouse=True)
def _one_thread():
    """The tensors here are tiny: with other processes on the CPU, OpenMP's thread hand-offs cost more
    than the arithmetic (10x on the 2-core CI machine), so these tests run torch on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SMALL = {"model": "mlp", "model_args": {"widths": [16]}, "data": "digits", "examples": 256,
         "batch_size": 32, "factor_examples": 64}


def _config(**kwargs) -> TrainConfig:
    return TrainConfig(**{**SMALL, "optimizer": "kfac", "steps": 12, "save_every": 4, **kwargs})


def _metrics(run) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def _final_weights(run) -> dict[str, np.ndarray]:
    with CheckpointReader(os.path.join(run, "ckpt.h5")) as reader:
        return reader.read_weights(reader.step_numbers()[-1])


def test_schedule_values():
    """Seed F.3: ``α(t) = α0 − (1−γ) α0 t / T_decay`` for ``t ≤ T_decay``, then ``γ α0``."""
    constant = _config(lr=0.3, schedule="constant").resolved()
    assert [learning_rate(constant, t) for t in (0, 5, 100)] == [0.3, 0.3, 0.3]
    decay = _config(lr=0.2, schedule="linear-decay", decay_steps=10, final_lr_factor=0.1).resolved()
    values = [learning_rate(decay, t) for t in (0, 5, 10, 11, 50)]
    np.testing.assert_allclose(values, [0.2, 0.2 - 0.9 * 0.2 * 0.5, 0.02, 0.02, 0.02], rtol=1e-15)
    default = _config(lr=1.0, schedule="linear-decay", steps=4).resolved()  # T_decay = steps, γ = 0.01
    np.testing.assert_allclose([learning_rate(default, t) for t in range(5)],
                               [1.0, 0.7525, 0.505, 0.2575, 0.01], rtol=1e-14)


def test_save_steps_and_batch_order():
    assert save_steps(_config(steps=10, save_every=4, save_steps=[3, 99])) == [0, 3, 4, 8, 10]
    assert save_steps(_config(steps=5, save_every=None)) == [0, 5]
    order = BatchOrder(10, 3, seed=1)
    epoch0 = torch.cat([order.indices(t) for t in range(3)])
    assert len(set(epoch0.tolist())) == 9  # three full batches per epoch, no repeats
    assert torch.equal(BatchOrder(10, 3, seed=1).indices(4), order.indices(4))
    assert not torch.equal(order.indices(0), order.indices(3))  # a new permutation each epoch


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.1), ("momentum", 0.05), ("adam", 1e-2), ("kfac", 0.05)])
def test_every_optimizer_reduces_the_loss_on_digits(tmp_path, optimizer, lr):
    run = str(tmp_path / optimizer)
    summary = train(_config(optimizer=optimizer, lr=lr, steps=40, save_every=20), run, progress=False)
    losses = [m["loss"] for m in _metrics(run)]
    assert len(losses) == 40 and all(np.isfinite(losses))
    assert np.mean(losses[-8:]) < 0.5 * np.mean(losses[:4]), losses
    assert summary["saved_steps"] == [0, 20, 40]
    ckpt = load(os.path.join(run, "ckpt.h5"))
    step = ckpt.steps[40]
    assert set(step.factors) == {"hidden.0", "fc"} and step.weights
    if optimizer == "kfac":
        # running averages: the 64 factor-set examples at step 0, then one 32-example batch per step
        assert step.attrs["source"] == "kfac-running-average" and step.num_examples == 64 + 40 * 32
    else:
        assert step.attrs["source"] == "factor-set" and step.num_examples == 64


def test_checkpoint_config_and_metrics_are_readable(tmp_path, capsys):
    run = str(tmp_path / "run")
    args = ["train", "--model", "mlp", "--model-arg", "widths=16", "--examples", "256", "--batch-size", "32",
            "--optimizer", "momentum", "--steps", "6", "--save-every", "3", "--factor-examples", "64",
            "--schedule", "linear-decay", "--lr", "0.1", "--quiet", "-o", run]
    assert main(args) == 0
    assert "steps [0, 3, 6]" in capsys.readouterr().out
    assert main(["info", os.path.join(run, "ckpt.h5"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [s["step"] for s in info["steps"]] == [0, 3, 6] and all(s["complete"] for s in info["steps"])
    assert info["model"]["name"] == "mlp"
    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([m["lr"] for m in metrics], [0.1 * (1 - 0.99 * t / 6) for t in range(6)])
    assert all(m["time"] >= 0 for m in metrics)
    config = read_config(run)
    assert config.optimizer == "momentum" and config.decay_steps == 6 and config.model_args == {"widths": 16}
    assert sorted(f for f in os.listdir(run) if f.endswith(".pt")) == ["state-6.pt"]


def _interrupt_at(monkeypatch, step: int):
    """Make the append of checkpoint step ``step`` die before it is marked complete."""
    real = writer._mark_complete

    def dying(group):
        if int(group.attrs["step"]) == step:
            raise KeyboardInterrupt("killed while saving")
        real(group)

    monkeypatch.setattr(writer, "_mark_complete", dying)


@pytest.mark.parametrize("optimizer", ["kfac", "adam"])
def test_resume_after_a_crash_mid_save_equals_the_uninterrupted_run(tmp_path, monkeypatch, optimizer):
    config = _config(optimizer=optimizer, lr=0.05 if optimizer == "kfac" else 3e-3, schedule="linear-decay",
                     inverse_update_every=3)
    whole, broken = str(tmp_path / "whole"), str(tmp_path / "broken")
    train(config, whole, progress=False)
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 8)
        with pytest.raises(KeyboardInterrupt):
            train(config, broken, progress=False)
    assert load(os.path.join(broken, "ckpt.h5")).steps.keys() == {0, 4}  # step 8 never became complete
    with open(os.path.join(broken, "metrics.jsonl"), "a", encoding="utf-8") as handle:
        handle.write('{"step": 9, "loss": 0.5}\n{"ste')  # what a kill after step 8, mid-write, leaves
    summary = train(config, broken, resume=True, progress=False)
    assert summary["resumed_from"] == 4
    a, b = load(os.path.join(whole, "ckpt.h5")), load(os.path.join(broken, "ckpt.h5"))
    assert a.steps.keys() == b.steps.keys() == {0, 4, 8, 12}
    for step in (8, 12):
        for key, value in a.steps[step].weights.items():
            np.testing.assert_array_equal(b.steps[step].weights[key], value, err_msg=key)
        for name, f in a.steps[step].factors.items():
            np.testing.assert_array_equal(b.steps[step].factors[name].S, f.S)
    assert [m["loss"] for m in _metrics(whole)] == [m["loss"] for m in _metrics(broken)]


DRIVER = """
import os, signal, sys
from curvlab.io.checkpoint import writer
real_mark = writer._mark_complete
def mark(group):
    if int(group.attrs["step"]) == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
    real_mark(group)
writer._mark_complete = mark
from curvlab.commands import main
main(sys.argv[2:])
"""


def test_sigkill_mid_save_leaves_completed_steps_readable_and_resume_matches(tmp_path, capsys):
    """A process SIGKILLed while appending step 8 leaves every completed step readable (and its temp
    copy behind); ``--resume`` cleans up and reproduces the uninterrupted run exactly."""
    args = ["train", "--model", "mlp", "--model-arg", "widths=16", "--examples", "256", "--batch-size", "32",
            "--optimizer", "kfac", "--steps", "12", "--save-every", "4", "--factor-examples", "64", "--quiet"]
    whole, broken = str(tmp_path / "whole"), str(tmp_path / "broken")
    assert main([*args, "-o", whole]) == 0
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER))
    # one thread, like this process (see _one_thread), so the two runs do identical arithmetic
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, str(driver), "8", *args, "-o", broken],
                            capture_output=True, text=True, timeout=120, env=env)
    assert killed.returncode == -9, killed.stderr
    capsys.readouterr()
    assert main(["info", os.path.join(broken, "ckpt.h5"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [s["step"] for s in info["steps"]] == [0, 4]
    assert any(name.startswith(".ckpt.h5.tmp-") for name in os.listdir(broken))  # the dead writer's copy
    assert main(["train", "--resume", "--quiet", "-o", broken]) == 0  # every option from config.json
    assert "resumed from step 4" in capsys.readouterr().out
    assert not any(".tmp-" in name for name in os.listdir(broken))
    for key, value in _final_weights(whole).items():
        np.testing.assert_array_equal(_final_weights(broken)[key], value, err_msg=key)
    assert [m["step"] for m in _metrics(broken)] == list(range(1, 13))


def test_label_smoothing_and_data_order_of_the_first_step(tmp_path):
    """Step 1's logged loss is the smoothed cross-entropy of the initial model on batch 0 of the order."""
    from curvlab.io.data import load_dataset
    from curvlab.models import build_model

    model_args = {"widths": [4, 4, 4], "blocks": 1, "label_smoothing": 0.2}
    config = TrainConfig(model="resnet32", model_args=model_args, data="digits", examples=64,
                         optimizer="sgd", steps=1, batch_size=16, factor_examples=16, lr=0.01)
    run = str(tmp_path / "ls")
    train(config, run, progress=False)
    data = load_dataset("digits", limit=64)
    torch.manual_seed(0)
    model = build_model("resnet32", data.input_shape, data.num_classes, config.model_args)
    model.train()
    index = BatchOrder(64, 16, 0).indices(0)
    with torch.no_grad():
        expected = F.cross_entropy(model(data.x[index]), data.y[index], label_smoothing=0.2)
    assert model.label_smoothing == 0.2
    assert _metrics(run)[0]["loss"] == pytest.approx(float(expected), rel=1e-5)


def test_kfac_trains_the_tied_transformer_on_text(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(["the cat sat on the mat and the dog sat on the log"] * 200), encoding="utf-8")
    run = str(tmp_path / "lm")
    args = {"d_model": 16, "d_ff": 32, "heads": 2, "layers": 1, "seq_len": 8, "vocab": 16}
    summary = train(TrainConfig(model="transformer_shallow", model_args=args, data=f"text:{corpus}",
                                optimizer="kfac", steps=30, batch_size=16, save_every=15, lr=0.05,
                                factor_examples=32, damping=1e-2), run, progress=False)
    losses = [m["loss"] for m in _metrics(run)]
    assert all(np.isfinite(losses)) and np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3]), losses
    step = load(os.path.join(run, "ckpt.h5")).steps[30]
    tied = step.factors["pre_softmax"]
    assert tied.module_type == "TiedEmbedding" and tied.S.ndim == 1 and tied.A.ndim == 2
    assert "embedding" not in step.factors and summary["saved_steps"] == [0, 15, 30]


def _error_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("curvlab: error:") and "\n" not in err, err
    return err


def test_user_errors_are_one_line(tmp_path, capsys):
    run = str(tmp_path / "run")
    base = ["train", "--model", "mlp", "--model-arg", "widths=8", "--examples", "64", "--batch-size", "16",
            "--steps", "2", "--factor-examples", "16", "--quiet"]
    assert "--steps is required" in _error_line(capsys, ["train", "--model", "mlp", "-o", run])
    assert main([*base, "-o", run]) == 0
    capsys.readouterr()
    assert "holds a run already" in _error_line(capsys, [*base, "-o", run])
    assert "started with" in _error_line(capsys, [*base, "--lr", "0.5", "--resume", "-o", run])
    assert "exceeds" in _error_line(capsys, [*base, "--batch-size", "100", "-o", str(tmp_path / "b")])
    assert "does not exist" in _error_line(capsys, [*base, "-o", str(tmp_path / "no" / "run")])
    assert "damping" in _error_line(capsys, [*base, "--damping", "0", "-o", str(tmp_path / "d")])
    assert "unknown" in _error_line(capsys, [*base, "--model-arg", "depth=3", "-o", str(tmp_path / "m")])
    os.remove(os.path.join(run, "state-2.pt"))
    assert main([*base, "--steps", "4", "--resume", "-o", run]) == 2
    assert "state-2.pt: missing" in capsys.readouterr().err
