"""The command line imports torch only when a command runs: ``--help``, ``--version`` and ``info`` never do.

Each case runs ``python -m curvlab ...`` in a fresh interpreter through a tiny wrapper that reports, on
its last stderr line, the exit status and whether ``torch`` ended up in ``sys.modules``. The option
choices the parsers need live in :mod:`curvlab.choices` (torch-free) and must stay equal to the
library's own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from curvlab import choices, launch
from curvlab.io import checkpoint as ck

WRAPPER = """\
import json, runpy, sys
sys.argv = ["curvlab", *json.loads(sys.argv[1])]
code = 0
try:
    runpy.run_module("curvlab", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
print(json.dumps({"torch": "torch" in sys.modules, "code": code}), file=sys.stderr)
"""

COMMANDS = ("factors", "info", "spectrum", "gradcov", "fit", "nqm", "train")


def _curvlab(*args: str) -> tuple[dict, subprocess.CompletedProcess]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    out = subprocess.run(
        [sys.executable, "-c", WRAPPER, json.dumps(list(args))],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stderr.strip().splitlines()[-1])
    return report, out


@pytest.mark.parametrize(
    "args",
    [("--help",), ("--version",), *[(c, "--help") for c in COMMANDS], ("nqm", "steps", "--help"),
     ("nqm", "figure", "--help")],
    ids=" ".join,
)
def test_help_and_version_do_not_import_torch(args):
    report, out = _curvlab(*args)
    assert report == {"torch": False, "code": 0}
    assert out.stdout.startswith("usage: curvlab") or out.stdout.startswith("curvlab ")


def _small_checkpoint(path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 5))
    a = x.T @ x / 7
    s = np.diag(rng.random(3) + 0.1)
    layer = ck.LayerFactors("Linear", (3, 4), True, a, s)
    ck.save(str(path), [ck.Step(0, "mc", 7, {"fc": layer}), ck.Step(5, "mc", 7, {"fc": layer})],
            model_name="mlp")


def test_info_does_not_import_torch(tmp_path):
    path = tmp_path / "ckpt.h5"
    _small_checkpoint(path)
    report, out = _curvlab("info", str(path))
    assert report == {"torch": False, "code": 0}
    assert "fc" in out.stdout and "Linear" in out.stdout
    assert f"{path}: curvlab.kfac v2" in out.stdout  # the format's name, not a module path
    report, out = _curvlab("info", str(path), "--json", "--step", "5")
    assert report == {"torch": False, "code": 0}
    assert [s["step"] for s in json.loads(out.stdout.splitlines()[0])["steps"]] == [5]


def test_info_errors_do_not_import_torch(tmp_path):
    path = tmp_path / "ckpt.h5"
    _small_checkpoint(path)
    report, out = _curvlab("info", str(path), "--step", "3")
    assert report == {"torch": False, "code": 2}
    assert "curvlab: error:" in out.stderr and "step 3: no such step" in out.stderr
    report, out = _curvlab("info", str(tmp_path / "missing.h5"))
    assert report["torch"] is False and report["code"] == 2
    assert "curvlab: error:" in out.stderr


def test_model_names_are_the_registry():
    from curvlab.models import available_models

    assert list(choices.MODEL_NAMES) == available_models()


def test_the_library_uses_the_light_choices():
    from curvlab import device, distributed
    from curvlab.capture import loss
    from curvlab.io import data
    from curvlab.optim import train

    assert device.DEVICE_CHOICES is choices.DEVICE_CHOICES
    assert loss.FISHER_TYPES is choices.FISHER_TYPES
    assert data.DATA_SOURCES is choices.DATA_SOURCES
    assert train.OPTIMIZERS is choices.OPTIMIZERS and train.SCHEDULES is choices.SCHEDULES
    assert distributed.launched is launch.launched


def test_data_source_names_agree():
    from curvlab.io.data import SOURCE_FORMS

    assert choices.DATA_SOURCE_NAMES == tuple(form.partition(":")[0] for form in SOURCE_FORMS)
