"""curvlab: curvature analysis of neural networks (Zhang et al. 2019, appendix).

K-FAC factor capture (:func:`collect_factors`), the HDF5 factor checkpoint (:func:`save_factors`,
:func:`load`), and the per-layer math they share (:mod:`curvlab.layers`).
"""

__version__ = "0.1.0"

from curvlab.checkpoint import load  # noqa: E402
from curvlab.factors import FactorSet, collect_factors, save_factors  # noqa: E402

__all__ = ["FactorSet", "collect_factors", "load", "save_factors", "__version__"]
