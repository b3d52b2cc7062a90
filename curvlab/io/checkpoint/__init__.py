"""K-FAC factor checkpoints: the HDF5 format, version 2 (read, write, append steps, validate).

Everything that writes or reads Kronecker factors goes through this package; ``docs/format.md``
documents the layout, attribute types, validation rules and crash-safety mechanism field by field.
A layer's factors are ``A = E[a a^T]`` (input side) and ``S = E[g g^T]`` (output side), so that its
Fisher block is ``F ~= S (x) A`` (:class:`LayerFactors`). Three modules, imported in this order:

* :mod:`curvlab.io.checkpoint.format` — what a valid file is: the layout, the data classes
  (:class:`LayerFactors`, :class:`Step`, :class:`Checkpoint`), the factor sizes a layer implies
  (:func:`expected_factor_sizes`) and the validation rules (:func:`validate_layer`, tolerances).
* :mod:`curvlab.io.checkpoint.reader` — :class:`CheckpointReader` (lazy, one layer at a time) and
  :func:`load`: read-only, incomplete steps skipped with an :class:`IncompleteStepWarning`.
* :mod:`curvlab.io.checkpoint.writer` — :func:`save` and :func:`append_step`: a temporary file in the
  target folder, fsynced and renamed onto the target, so a crash leaves the old file or the new one.

Imports only h5py and numpy (no torch). No pickle anywhere.
"""

from curvlab.io.checkpoint.format import (
    FORMAT,
    FORMAT_VERSION,
    MAX_ATTR_BYTES,  # noqa: F401 (public constant, not in __all__)
    MODULE_TYPES,
    RESERVED_STEP_ATTRS,  # noqa: F401 (public constant, not in __all__)
    SYMMETRY_TOL,  # noqa: F401 (public constant, not in __all__)
    Checkpoint,
    LayerFactors,
    Step,
    expected_factor_sizes,
    validate_layer,
)
from curvlab.io.checkpoint.reader import (
    CheckpointReader,
    IncompleteStepWarning,
    _open_read_only,  # noqa: F401 (curvlab.analysis.spectrum uses it)
    load,
)
from curvlab.io.checkpoint.writer import append_step, save

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MODULE_TYPES",
    "Checkpoint",
    "CheckpointReader",
    "IncompleteStepWarning",
    "LayerFactors",
    "Step",
    "append_step",
    "expected_factor_sizes",
    "load",
    "save",
    "validate_layer",
]

