"""The module paths of curvlab 0.1, before the regrouping into subpackages, kept for one release.

``import curvlab.checkpoint`` (and every other old path listed in :data:`OLD_PATHS`) still works: it
warns once with a :class:`DeprecationWarning` that names the new path and gives the new module
itself, so attributes, ``isinstance`` checks and monkeypatching behave exactly as with the new path.
Where one old module was split into several, the old name forwards every attribute to the module
that now defines it. The old paths will be removed in curvlab 0.3.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from typing import Any

#: old path -> the module(s) that hold its names now (the first is named in the warning)
OLD_PATHS: dict[str, tuple[str, ...]] = {
    "curvlab.layers": ("curvlab.capture.layers",),
    "curvlab.loss": ("curvlab.capture.loss",),
    "curvlab.factors": ("curvlab.capture.factors",),
    "curvlab.checkpoint": (
        "curvlab.io.checkpoint",
        "curvlab.io.checkpoint.format",
        "curvlab.io.checkpoint.reader",
        "curvlab.io.checkpoint.writer",
    ),
    "curvlab.atomic": ("curvlab.io.atomic",),
    "curvlab.data": (
        "curvlab.io.data",
        "curvlab.io.data.dataset",
        "curvlab.io.data.images",
        "curvlab.io.data.cifar10",
        "curvlab.io.data.text",
    ),
    "curvlab.restore": ("curvlab.io.restore",),
    "curvlab.info": ("curvlab.io.info",),
    "curvlab.spectrum": (
        "curvlab.analysis.spectrum",
        "curvlab.analysis.spectrum.engine",
        "curvlab.analysis.spectrum.sharing",
        "curvlab.analysis.spectrum.kronecker",
        "curvlab.analysis.spectrum.files",
        "curvlab.analysis.spectrum.summary",
    ),
    "curvlab.powerlaw": (
        "curvlab.analysis.powerlaw",
        "curvlab.analysis.powerlaw.estimator",
        "curvlab.analysis.powerlaw.models",
        "curvlab.analysis.powerlaw.result",
        "curvlab.analysis.powerlaw.window",
        "curvlab.analysis.powerlaw.compare",
        "curvlab.analysis.powerlaw.fit",
    ),
    "curvlab.gradcov": ("curvlab.analysis.gradcov", "curvlab.analysis.gradcov_run"),
    "curvlab.curvature": ("curvlab.analysis.curvature",),
    "curvlab.kfac": ("curvlab.optim.kfac",),
    "curvlab.train": (
        "curvlab.optim.train",
        "curvlab.optim.config",
        "curvlab.optim.schedules",
        "curvlab.optim.batches",
        "curvlab.optim.optimizers",
        "curvlab.optim.runfolder",
    ),
    "curvlab.cli": (
        "curvlab.commands",
        "curvlab.commands.common",
        "curvlab.commands.factors",
        "curvlab.commands.info",
        "curvlab.commands.spectrum",
        "curvlab.commands.gradcov",
        "curvlab.commands.fit",
        "curvlab.commands.nqm",
        "curvlab.commands.train",
    ),
}


#: old paths that are also names of the Python API (curvlab.api): the old module, once imported, is
#: the package's attribute of that name, so it forwards calls to the function
CALLABLE: dict[str, str] = {
    "curvlab.spectrum": "spectrum",
    "curvlab.gradcov": "gradcov",
    "curvlab.train": "train",
}


class _Forwarding(types.ModuleType):
    """An old module split into several: attribute access looks the name up in each new module."""

    __targets__: tuple[str, ...] = ()

    def __getattr__(self, name: str) -> Any:
        for target in self.__targets__:
            module = importlib.import_module(target)
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")

    def __dir__(self) -> list[str]:
        names: set[str] = set()
        for target in self.__targets__:
            names.update(dir(importlib.import_module(target)))
        return sorted(names)


class _CallableForwarding(_Forwarding):
    """A forwarding old module that is also a function of the API: ``curvlab.spectrum(...)`` after
    ``import curvlab.spectrum`` calls :func:`curvlab.api.spectrum` (Python binds an imported submodule
    as the package's attribute, hiding the function of the same name)."""

    __api__: str = ""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module("curvlab.api"), self.__api__)(*args, **kwargs)


def moved(old: str) -> None:
    """Called by the module at the old path ``old``: warn, then make the old name the new module."""
    targets = OLD_PATHS[old]
    warnings.warn(
        f"{old} moved to {targets[0]}; the old path will be removed in curvlab 0.3",
        DeprecationWarning,
        stacklevel=3,
    )
    if len(targets) == 1:
        sys.modules[old] = importlib.import_module(targets[0])
        return
    module = sys.modules[old]
    module.__class__ = _CallableForwarding if old in CALLABLE else _Forwarding
    module.__targets__ = targets  # type: ignore[attr-defined]
    if old in CALLABLE:
        module.__api__ = CALLABLE[old]  # type: ignore[attr-defined]
