"""The Python API (curvlab/api.py, docs/api.md; issue 13, item 2).

* docs/api.md's examples run, in order, in an empty folder (a block whose first line is ``# NAME.py``
  is written to that file);
* each result's ``.to_json()`` is the command's ``--json`` for the same input (less the keys naming
  the files the command wrote);
* ``curvlab.spectrum``, ``curvlab.gradcov`` and ``curvlab.train`` are the API functions in every
  import order, although the deprecated modules of those names exist;
* ``import curvlab`` imports no torch; ``KFAC(model)`` and ``TrainConfig`` take the command's defaults.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

import curvlab
from curvlab.commands import main

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"
CNN = f"{Path(__file__).parent / 'own_models' / 'cnn.py'}:build"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_doc_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = _blocks()
    assert len(blocks) >= 5
    namespace: dict = {"__name__": "docs_api"}
    for k, block in enumerate(blocks):
        first = block.splitlines()[0]
        if re.fullmatch(r"# \w+\.py", first):
            (tmp_path / first[2:]).write_text(block)
            continue
        exec(compile(block, f"{DOC}, python block {k + 1}", "exec"), namespace)  # noqa: S102
    assert (tmp_path / "x.h5").exists() and (tmp_path / "run" / "ckpt.h5").exists()


def _same(a, b, path="") -> None:
    """Equal JSON values; floats to 1e-12 relative (the same float64 arithmetic in the same order)."""
    if isinstance(a, float) or isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-300) or (a != a and b != b), (path, a, b)
    elif isinstance(a, dict):
        assert set(a) == set(b), (path, sorted(set(a) ^ set(b)))
        for key in a:
            _same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for k, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{path}[{k}]")
    else:
        assert a == b, (path, a, b)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("api") / "x.h5")
    assert main(["factors", "--model", CNN, "--model-arg", "width=2", "--examples", "24", "--fisher", "exact",
                 "-o", path, "--quiet"]) == 0
    return path


def _cli(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_spectrum_and_fit_are_the_commands(checkpoint, tmp_path, capsys):
    cli = _cli(capsys, ["spectrum", checkpoint, "--json", "--quiet", "-o", str(tmp_path / "s.h5")])
    api = curvlab.spectrum(checkpoint).to_json()
    for key in ("output", "eigenvectors"):  # where the command wrote, and that it wrote eigenvectors
        cli.pop(key), api.pop(key)
    _same(cli, api)
    from curvlab.io.checkpoint import load

    in_memory = curvlab.spectrum(dict(load(checkpoint).steps[0].factors)).to_json()
    assert in_memory["source"] is None
    _same(in_memory["steps"][0]["layers"], api["steps"][0]["layers"])

    cli = _cli(capsys, ["fit", checkpoint, "--json", "--bootstrap", "50", "--per-factor", "--quiet"])
    _same(cli, curvlab.fit(checkpoint, bootstrap=50, per_factor=True).to_json())
    from_spectrum = curvlab.fit(curvlab.spectrum(checkpoint), bootstrap=50).to_json()
    cli.pop("factors")
    _same(cli, from_spectrum)


def test_gradcov_is_the_command(checkpoint, tmp_path, capsys):
    cli = _cli(capsys, ["gradcov", checkpoint, "--model", CNN, "--model-arg", "width=2", "--examples", "24",
                        "--directions", "2", "--json", "--quiet", "-o", str(tmp_path / "g.h5")])
    for key in ("output", "step", "data", "skipped_layers"):
        cli.pop(key)
    from curvlab.io.checkpoint import load
    from curvlab.io.data import iterate_batches, load_dataset
    from curvlab.io.restore import rebuild_model

    model, _ = rebuild_model(checkpoint, model=CNN, model_args={"width": 2})
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    batches = list(iterate_batches(load_dataset("digits", limit=24), 128))
    _same(cli, curvlab.gradcov(model, batches, checkpoint, directions=2).to_json())
    factors = dict(load(checkpoint).steps[0].factors)
    _same(cli, curvlab.gradcov(model, batches, factors, directions=2).to_json())
    # the model given is left as it was (a float64 copy did the work)
    after = model.state_dict()
    assert all(v.dtype == weights[k].dtype and bool((v == weights[k]).all()) for k, v in after.items())


def test_build_model_records_its_config(tmp_path):
    import warnings

    import torch

    from curvlab.io.checkpoint import load

    model = curvlab.build_model("resnet8", (1, 8, 8), 10)
    factors = curvlab.collect_factors(model.eval(), [(torch.randn(4, 1, 8, 8), torch.arange(4))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        curvlab.save_factors(str(tmp_path / "r.h5"), factors, model=model)
    config = load(str(tmp_path / "r.h5")).model_config
    assert config["name"] == "resnet8" and config["input_shape"] == [1, 8, 8] and config["num_classes"] == 10
    # a module curvlab did not build: saved, and one line says what is missing
    with pytest.warns(UserWarning, match="no model config recorded: this Sequential was not built by"):
        curvlab.save_factors(str(tmp_path / "s.h5"), factors, model=torch.nn.Sequential())
    # a factory model built without its input shape records what it knows, and says what it does not
    (tmp_path / "lin.py").write_text(
        "from torch import nn\ndef build(n=4):\n    return nn.Sequential(nn.Linear(n, 3))\n")
    own = curvlab.build_model(f"{tmp_path / 'lin.py'}:build", n=4)
    factors = curvlab.collect_factors(own, [(torch.randn(5, 4), torch.arange(5) % 3)])
    with pytest.warns(UserWarning, match="model config recorded without input_shape and num_classes"):
        curvlab.save_factors(str(tmp_path / "t.h5"), factors, model=own)
    config = load(str(tmp_path / "t.h5")).model_config
    assert config["factory"].endswith("lin.py:build") and config["args"] == {"n": 4}


def test_kfac_and_train_config_have_the_commands_defaults():
    import torch

    from curvlab.optim.config import DEFAULT_LR

    opt = curvlab.KFAC(torch.nn.Linear(3, 2))
    assert opt.lr == DEFAULT_LR["kfac"] == 0.05 and opt.damping == 0.01
    opt.close()
    config = curvlab.TrainConfig(model="transformer_shallow", steps=10).resolved()
    assert (config.optimizer, config.data, config.lr, config.batch_size) == ("kfac", "pystdlib", 0.05, 128)
    assert curvlab.TrainConfig(model="mlp", steps=1, optimizer="adam").resolved().lr == 1e-3
    assert curvlab.TrainConfig(model=CNN, steps=1).resolved().data == "digits"


def _fresh(code: str) -> str:
    run = subprocess.run([sys.executable, "-W", "ignore::DeprecationWarning", "-c", code],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_import_curvlab_imports_no_torch():
    assert _fresh("import sys, curvlab; curvlab.__all__; print('torch' in sys.modules)").strip() == "False"


@pytest.mark.parametrize("name", ["spectrum", "gradcov", "train"])
def test_api_function_wins_in_every_import_order(name):
    code = f"""
import importlib, inspect, sys, types
import curvlab
first = curvlab.{name}
assert inspect.isfunction(first) and first.__module__ == "curvlab.api", first
old = importlib.import_module("curvlab.{name}")   # the deprecated module path, imported after
now = curvlab.{name}
assert now is old and isinstance(now, types.ModuleType) and callable(now)
from curvlab import {name} as again
assert callable(again)
print("ok")
"""
    assert _fresh(code).strip() == "ok"
    code = f"""
import importlib, inspect
old = importlib.import_module("curvlab.{name}")   # the deprecated module path, imported first
import curvlab
assert callable(curvlab.{name}) and curvlab.{name} is old
from curvlab import {name} as f
assert callable(f)
print("ok")
"""
    assert _fresh(code).strip() == "ok"


def test_the_old_module_forwards_calls(checkpoint):
    code = f"""
import json, importlib
import curvlab
importlib.import_module("curvlab.spectrum")
assert not callable(getattr(curvlab.spectrum, "__wrapped__", None))
a = curvlab.spectrum({checkpoint!r}).to_json()                 # the module, called: the API function
b = curvlab.api.spectrum({checkpoint!r}).to_json()
assert json.dumps(a) == json.dumps(b)
new = importlib.import_module("curvlab.analysis.spectrum")
assert curvlab.spectrum.compute_spectrum is new.compute_spectrum
print("ok")
"""
    assert _fresh(code).strip() == "ok"
