"""curvlab: curvature analysis of neural networks (Zhang et al. 2019, appendix).

The Python API mirrors the commands (docs/api.md, :mod:`curvlab.api`): :func:`build_model` (a registry
model or your own factory), :func:`collect_factors` and :func:`save_factors` (``curvlab factors``),
:func:`load` and the checkpoint format, :func:`spectrum`, :func:`fit`, :func:`gradcov`, :func:`predict`,
:func:`train`, and the optimizer :class:`KFAC` with the command line's defaults.
K-FAC and EKFAC as linear operators: :class:`KFACOperator`, :class:`EKFACOperator` (docs/operators.md).

The top-level names are imported lazily, so ``import curvlab`` (and ``import curvlab.io.checkpoint``,
h5py and numpy only) does not pay for importing torch. ``curvlab.spectrum``, ``curvlab.gradcov`` and
``curvlab.train`` are also the deprecated module paths of curvlab 0.1 (:mod:`curvlab._moved`); once such
a module is imported it takes the function's place as the package attribute, and it is callable: a
call goes to the function, so ``curvlab.spectrum(...)`` works in every import order.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "build_model": "curvlab.api",
    "collect_factors": "curvlab.capture.factors",
    "save_factors": "curvlab.capture.factors",
    "FactorSet": "curvlab.capture.factors",
    "load": "curvlab.io.checkpoint",
    "spectrum": "curvlab.api",
    "fit": "curvlab.api",
    "gradcov": "curvlab.api",
    "predict": "curvlab.api",
    "train": "curvlab.api",
    "KFAC": "curvlab.optim.kfac",
    "TrainConfig": "curvlab.optim.config",
    "KFACOperator": "curvlab.analysis.operators",
    "EKFACOperator": "curvlab.analysis.operators",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'curvlab' has no attribute {name!r}")
