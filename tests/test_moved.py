"""The module paths of curvlab 0.1 (curvlab/_moved.py): each warns once and gives the new module."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import types
import warnings

import pytest

from curvlab._moved import OLD_PATHS, _Forwarding


def _fresh_python(code: str) -> str:
    """Run ``code`` in a new interpreter (where no old path has been imported yet); its stdout."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_each_old_path_warns_at_its_first_import():
    # a fresh interpreter, where none of the old paths has been imported yet
    code = (
        "import importlib, json, warnings\n"
        "from curvlab._moved import OLD_PATHS\n"
        "out = {}\n"
        "for old in OLD_PATHS:\n"
        "    with warnings.catch_warnings(record=True) as seen:\n"
        "        warnings.simplefilter('always')\n"
        "        importlib.import_module(old)\n"
        "    out[old] = [str(w.message) for w in seen if w.category is DeprecationWarning]\n"
        "print(json.dumps(out))\n"
    )
    seen = json.loads(_fresh_python(code))
    for old, targets in OLD_PATHS.items():
        assert seen[old] == [f"{old} moved to {targets[0]}; the old path will be removed in curvlab 0.3"]


@pytest.mark.parametrize("old", sorted(OLD_PATHS))
def test_old_path_gives_the_same_objects(old):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = importlib.import_module(old)
    new = [importlib.import_module(name) for name in OLD_PATHS[old]]
    if len(new) == 1:
        assert module is new[0]
        return
    for target in new:
        for name in dir(target):
            assert getattr(module, name) is getattr(target, name) or name.startswith("__")


def test_forwarding_module_looks_in_each_target():
    module = types.ModuleType("old")
    module.__class__ = _Forwarding
    module.__targets__ = ("json", "math")
    assert module.dumps is importlib.import_module("json").dumps
    assert module.sqrt is importlib.import_module("math").sqrt
    with pytest.raises(AttributeError, match="has no attribute 'nosuch'"):
        module.nosuch  # noqa: B018


def test_public_names_come_from_the_new_paths():
    # a fresh interpreter: an old path imported earlier in this process would not warn again
    code = (
        "import warnings\n"
        "warnings.simplefilter('error', DeprecationWarning)\n"
        "import curvlab\n"
        "for name in curvlab.__all__:\n"
        "    getattr(curvlab, name)\n"
    )
    _fresh_python(code)
