"""curvlab: curvature analysis of neural networks (Zhang et al. 2019, appendix).

K-FAC factor capture (:func:`collect_factors`), the HDF5 factor checkpoint (:func:`save_factors`,
:func:`load`), the per-layer math they share (:mod:`curvlab.capture.layers`), and K-FAC / EKFAC as
linear operators (:class:`KFACOperator`, :class:`EKFACOperator`, docs/operators.md).

The top-level names are imported lazily, so ``import curvlab.io.checkpoint`` (h5py and numpy only) does
not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "collect_factors": "curvlab.capture.factors",
    "save_factors": "curvlab.capture.factors",
    "FactorSet": "curvlab.capture.factors",
    "load": "curvlab.io.checkpoint",
    "KFACOperator": "curvlab.analysis.operators",
    "EKFACOperator": "curvlab.analysis.operators",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'curvlab' has no attribute {name!r}")
