"""Own models and data through the command line (issue 13, item 1; docs/models.md "Own models").

Model files outside the package (tests/own_models/: a CNN with eval-mode BatchNorm and a residual
block, a 1-D conv net with its signal data factory, a Transformer with nn.MultiheadAttention,
LayerNorm and a tied head with its token data factory) go through factors, info, spectrum, fit,
gradcov, factors --weights and train --resume. And the rule that a recorded factory is never run: a
hostile checkpoint or run folder that records ``shutil:rmtree`` or a file that would leave a marker
when executed is refused with one line naming it, and nothing runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from curvlab.commands import main
from curvlab.io import checkpoint as ck

HERE = Path(__file__).parent / "own_models"
CNN = f"{HERE / 'cnn.py'}:build"
CONV1D = f"{HERE / 'conv1d.py'}:build"
SIGNALS = f"{HERE / 'conv1d.py'}:signals"
LM = f"{HERE / 'transformer.py'}:build"
TOKENS = f"{HERE / 'transformer.py'}:tokens"


def _json(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def _error(capsys, argv: list[str]) -> str:
    """The command fails with exit status 2 and one stderr line; that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("curvlab: error: "), err
    assert "Traceback" not in err
    return err


def test_cnn_through_every_command(tmp_path, capsys):
    x = str(tmp_path / "cnn.h5")
    made = _json(capsys, ["factors", "--model", CNN, "--model-arg", "width=3", "--examples", "24",
                          "--fisher", "exact", "-o", x, "--json", "--quiet"])
    assert made["model"] == CNN and made["data"] == "digits" and made["num_examples"] == 24
    # the eval-mode BatchNorm's (γ, β) is a NormAffine entry: 3 channel blocks of 2 × 2, S = [1]
    assert [(layer["name"], layer["module_type"]) for layer in made["layers"]] == [
        ("stem", "Conv2d"), ("block.conv1", "Conv2d"), ("block.bn1", "NormAffine"), ("block.conv2", "Conv2d"),
        ("head", "Linear")]
    assert made["layers"][2]["A_shape"] == [3, 2, 2] and made["layers"][2]["S_shape"] == [1]
    assert made["coverage"]["covered_parameters"] == made["coverage"]["total_parameters"]
    config = ck.load(x).model_config
    assert config["factory"] == CNN and config["args"] == {"width": 3}
    assert config["factory_file"] == str(HERE / "cnn.py") and config["input_shape"] == [1, 8, 8]
    assert config["num_classes"] == 10 and config["data"] == "digits" and len(config["factory_sha256"]) == 64
    info = _json(capsys, ["info", x, "--json"])
    assert info["model"]["name"] == CNN and info["model"]["config"]["factory"] == CNN
    spectrum = _json(capsys, ["spectrum", x, "--json", "--quiet"])
    assert spectrum["steps"][0]["num_eigenvalues"] == sum(  # a blocks A (C, k, k) has C·k eigenvalues
        layer["A_shape"][0] * (layer["A_shape"][1] if len(layer["A_shape"]) == 3 else 1) * layer["S_shape"][0]
        for layer in made["layers"])
    fitted = _json(capsys, ["fit", x, "--json", "--bootstrap", "0", "--quiet"])
    assert fitted["num_layers"] == 5 and np.isfinite(fitted["exponent"])
    cov = _json(capsys, ["gradcov", x, "--model", CNN, "--model-arg", "width=3", "--examples", "24", "--json",
                         "--quiet", "--directions", "2"])
    assert cov["curvature_route"] == "exact" and cov["num_examples"] == 24
    # the jvp curvature of the selected directions agrees with the exact all-direction route
    assert cov["fvp_vs_exact_max_rel_err"] < 1e-8
    # --weights rebuilds the model with the named factory: the same exact factors again
    again = str(tmp_path / "again.h5")
    assert main(["factors", "--weights", x, "--model", CNN, "--model-arg", "width=3", "--examples", "24",
                 "--fisher", "exact", "-o", again, "--quiet"]) == 0
    first, second = ck.load(x).steps[0].factors, ck.load(again).steps[0].factors
    for name, layer in first.items():
        np.testing.assert_array_equal(layer.A, second[name].A)
        np.testing.assert_array_equal(layer.S, second[name].S)


def test_conv1d_with_its_data_factory_trains_and_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--model", CONV1D, "--model-arg", "channels=3", "--data", SIGNALS, "--batch-size", "32",
              "--factor-examples", "32", "--optimizer", "kfac", "--save-every", "2", "-o", str(run),
              "--quiet"]
    first = _json(capsys, ["train", *common, "--steps", "2", "--json"])
    assert first["saved_steps"] == [0, 2] and first["model"] == CONV1D and first["data"] == SIGNALS
    # resume: the factory must be named again, with its arguments
    err = _error(capsys, ["train", "-o", str(run), "--resume", "--steps", "4", "--quiet"])
    assert f"records the factory {CONV1D} (--model)" in err and "--model-arg channels=3" in err
    err = _error(capsys, ["train", "-o", str(run), "--resume", "--steps", "4", "--model", CONV1D, "--quiet"])
    assert "--model-arg channels=3" in err
    err = _error(capsys, ["train", "-o", str(run), "--resume", "--steps", "4", "--model", CONV1D,
                          "--model-arg", "channels=3", "--quiet"])
    assert f"records the factory {SIGNALS} (--data)" in err
    resumed = _json(capsys, ["train", *common, "--steps", "4", "--resume", "--json"])
    assert resumed["resumed_from"] == 2 and resumed["saved_steps"] == [0, 2, 4]
    # an uninterrupted run of 4 steps ends with the same weights
    straight = tmp_path / "straight"
    whole = [*common[:-3], "-o", str(straight), "--quiet", "--steps", "4"]
    assert main(["train", *whole]) == 0
    a, b = ck.load(str(run / "ckpt.h5")).steps[4].weights, ck.load(str(straight / "ckpt.h5")).steps[4].weights
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    # the run's checkpoint drives gradcov with the factories named (data too: recorded, not loaded)
    capsys.readouterr()
    ckpt = str(run / "ckpt.h5")
    err = _error(capsys, ["gradcov", ckpt, "--model", CONV1D, "--model-arg", "channels=3", "--quiet"])
    assert f"records the factory {SIGNALS} (--data)" in err and f"--data {SIGNALS}" in err
    cov = _json(capsys, ["gradcov", ckpt, "--model", CONV1D, "--model-arg", "channels=3", "--data", SIGNALS,
                         "--examples", "64", "--json", "--quiet", "--directions", "1"])
    assert cov["curvature_route"] == "exact" and cov["num_examples"] == 64


def test_transformer_with_multihead_attention(tmp_path, capsys):
    x = str(tmp_path / "lm.h5")
    made = _json(capsys, ["factors", "--model", LM, "--data", TOKENS, "--fisher", "mc", "-o", x, "--json",
                          "--quiet"])
    names = {layer["name"]: layer["module_type"] for layer in made["layers"]}
    assert names["pre_softmax"] == "TiedEmbedding"  # the head tied to the embedding: one entry (eq. 16)
    assert names["ff.0"] == names["ff.2"] == "Linear"
    config = ck.load(x).model_config
    assert config["input_shape"] == [9] and config["num_classes"] == 12 and config["data"] == TOKENS
    cov = _json(capsys, ["gradcov", x, "--model", LM, "--data", TOKENS, "--examples", "16", "--json",
                         "--quiet", "--directions", "1"])
    assert cov["curvature_route"] == "mc"  # 12 classes x 9 label locations > 100
    assert _json(capsys, ["fit", x, "--json", "--bootstrap", "0", "--quiet"])["num_layers"] == len(names)


def test_factory_errors_are_one_line(tmp_path, capsys):
    gone = f"{tmp_path / 'gone.py'}:build"
    err = _error(capsys, ["factors", "--model", gone, "-o", str(tmp_path / "x.h5")])
    assert "gone.py does not exist" in err
    broken = tmp_path / "broken.py"
    broken.write_text("def build(input_shape, num_classes):\n    raise ValueError('no such width')\n")
    err = _error(capsys, ["factors", "--model", f"{broken}:build", "-o", str(tmp_path / "x.h5")])
    assert "the factory raised ValueError: no such width" in err and f"{broken}:2" in err
    err = _error(capsys, ["factors", "--model", CNN, "--model-arg", "depth=3", "-o", str(tmp_path / "x.h5")])
    assert "depth" in err and "its parameters: input_shape, num_classes, width" in err
    notmodel = tmp_path / "notmodel.py"
    notmodel.write_text("def build():\n    return 3\n")
    err = _error(capsys, ["factors", "--model", f"{notmodel}:build", "-o", str(tmp_path / "x.h5")])
    assert "returned an object of type int, not a torch.nn.Module" in err
    # the model does not fit the data: the forward pass fails before any work
    err = _error(capsys, ["factors", "--model", CNN, "--data", SIGNALS, "-o", str(tmp_path / "x.h5")])
    assert f"--model {CNN} on --data {SIGNALS}: the forward pass on inputs of shape (2, 1, 32) raised" in err
    assert not (tmp_path / "x.h5").exists()


def _checkpoint_recording(path: Path, config: dict, name: str | None = None) -> None:
    """A checkpoint (plain h5py writer) whose /model records ``config``, with the weights of an mlp."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 5))
    layer = ck.LayerFactors("Linear", (3, 4), True, a @ a.T, np.eye(3))
    weights = {"fc.weight": np.zeros((3, 4), np.float32), "fc.bias": np.zeros(3, np.float32)}
    ck.save(str(path), [ck.Step(0, "mc", 8, {"fc": layer}, weights=weights)], model_name=name,
            model_config=config)


@pytest.fixture
def evil(tmp_path) -> tuple[Path, Path]:
    """A factory file that, if it were ever executed, would leave a marker file."""
    marker = tmp_path / "marker"
    code = f"open({str(marker)!r}, 'w').write('ran')\ndef build(**kw):\n    open({str(marker)!r}, 'w')\n"
    (tmp_path / "evil.py").write_text(code)
    return tmp_path / "evil.py", marker


def test_recorded_rmtree_is_never_called(tmp_path, capsys):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    x = tmp_path / "hostile.h5"
    _checkpoint_recording(x, {"factory": "shutil:rmtree", "args": {"path": str(victim)},
                              "input_shape": [4], "num_classes": 3})
    err = _error(capsys, ["gradcov", str(x), "--quiet"])
    assert "records the factory shutil:rmtree" in err and f"--model-arg path={victim}" in err
    err = _error(capsys, ["factors", "--weights", str(x), "-o", str(tmp_path / "y.h5"), "--quiet"])
    assert "records the factory shutil:rmtree" in err
    assert (victim / "precious").read_text() == "keep me"


def test_recorded_factory_file_is_never_executed(tmp_path, capsys, evil):
    evil_file, marker = evil
    spec = f"{evil_file}:build"
    x = tmp_path / "hostile.h5"
    _checkpoint_recording(x, {"factory": spec, "args": {}, "input_shape": [4], "num_classes": 3})
    assert spec in _error(capsys, ["gradcov", str(x), "--quiet"])
    assert spec in _error(capsys, ["factors", "--weights", str(x), "-o", str(tmp_path / "y.h5"), "--quiet"])
    # a spec in /model's name alone (no factory key in the config) is not run either
    y = tmp_path / "named.h5"
    _checkpoint_recording(y, {}, name=spec)
    assert spec in _error(capsys, ["gradcov", str(y), "--quiet"])
    assert spec in _error(capsys, ["factors", "--weights", str(y), "-o", str(tmp_path / "z.h5"), "--quiet"])
    # a recorded data factory: a registry model rebuilds, but the data is not loaded from the record
    z = tmp_path / "data.h5"
    _checkpoint_recording(z, {"name": "mlp", "input_shape": [1, 2, 2], "num_classes": 3,
                              "args": {"widths": []}, "data": f"{evil_file}:data"})
    err = _error(capsys, ["gradcov", str(z), "--quiet"])
    assert f"records the factory {evil_file}:data (--data)" in err
    assert not marker.exists()


def test_hostile_run_folder_is_not_resumed_with_its_factory(tmp_path, capsys, evil):
    evil_file, marker = evil
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train": {
        "model": f"{evil_file}:build", "steps": 4, "data": "digits", "optimizer": "sgd"}}))
    err = _error(capsys, ["train", "-o", str(run), "--resume", "--quiet"])
    assert f"records the factory {evil_file}:build (--model)" in err
    (run / "config.json").write_text(json.dumps({"train": {
        "model": "mlp", "steps": 4, "data": f"{evil_file}:data", "optimizer": "sgd"}}))
    err = _error(capsys, ["train", "-o", str(run), "--resume", "--quiet"])
    assert f"records the factory {evil_file}:data (--data)" in err
    assert not marker.exists()


def test_changed_factory_file_warns_and_missing_one_fails(tmp_path, capsys):
    mine = tmp_path / "mine.py"
    shutil.copy(HERE / "cnn.py", mine)
    spec = f"{mine}:build"
    x = str(tmp_path / "x.h5")
    assert main(["factors", "--model", spec, "--model-arg", "width=2", "--examples", "16", "-o", x,
                 "--quiet"]) == 0
    mine.write_text(mine.read_text() + "\n# edited after the checkpoint was written\n")
    capsys.readouterr()
    assert main(["gradcov", x, "--model", spec, "--model-arg", "width=2", "--examples", "16", "--quiet",
                 "--directions", "0", "-o", str(tmp_path / "g.h5")]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("curvlab: warning: ")
    assert f"{mine} has changed since it was recorded" in err
    # other arguments than recorded: a warning, and the weights decide (here they do not fit)
    assert main(["gradcov", x, "--model", spec, "--model-arg", "width=3", "--quiet"]) == 2
    arguments, changed, error = capsys.readouterr().err.splitlines()
    assert arguments.startswith("curvlab: warning: ")
    assert '{"width": 2} there, with {"width": 3} now' in arguments
    assert changed.startswith("curvlab: warning: ") and "has changed" in changed
    assert error.startswith("curvlab: error: ") and "does not fit the model's (3, 1, 3, 3)" in error
    mine.unlink()
    err = _error(capsys, ["gradcov", x, "--model", spec, "--model-arg", "width=2", "--quiet"])
    assert f"file {mine} does not exist" in err


def test_factory_arguments_are_json(tmp_path):
    from curvlab.usercode import parse_factory_args

    args = parse_factory_args(["a=3", "b=0.5", "c=true", "d=[64, 32]", 'e={"p": 1}', "f=gelu", 'g="7"',
                               "h=NaN", "i=Infinity", "j="])
    assert args == {"a": 3, "b": 0.5, "c": True, "d": [64, 32], "e": {"p": 1}, "f": "gelu", "g": "7",
                    "h": "NaN", "i": "Infinity", "j": ""}


def test_module_spec(tmp_path, capsys, monkeypatch):
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    shutil.copy(HERE / "cnn.py", package / "nets.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    x = str(tmp_path / "x.h5")
    made = _json(capsys, ["factors", "--model", "mypkg.nets:build", "--model-arg", "width=2", "--examples",
                          "8", "-o", x, "--json", "--quiet"])
    assert made["model"] == "mypkg.nets:build"
    config = ck.load(x).model_config
    assert config["factory_file"] == str(package / "nets.py")
    with h5py.File(x, "r") as f:
        assert f["model"].attrs["name"] == "mypkg.nets:build"


def test_factory_named_for_a_registry_checkpoint(tmp_path, capsys):
    """A registry model's record has no factory to compare with: the weights alone decide."""
    x = str(tmp_path / "mlp.h5")
    assert main(["factors", "--model", "mlp", "--model-arg", "widths=4", "--examples", "16", "-o", x,
                 "--quiet"]) == 0
    err = _error(capsys, ["gradcov", x, "--model", CNN, "--quiet"])
    assert "weights do not fit the model" in err and "called with arguments" not in err
