"""Errors that reach the user as one line.

Every error a user can cause (a bad file, a wrong option, a data set in the wrong layout) is raised as a
:class:`CurvlabError` whose message names what is wrong and where: file, step, layer. The command line
prints ``curvlab: error: <message>`` on stderr and exits with status 2, without a traceback.
"""

from __future__ import annotations


class CurvlabError(Exception):
    """A user-facing error: its message is one line naming the file, step and layer at fault."""


class CheckpointError(CurvlabError):
    """A checkpoint (or derived HDF5 file) that cannot be read or fails validation."""


class DataError(CurvlabError):
    """A data source that is missing, truncated or in the wrong layout."""


class NonFiniteOutputError(DataError):
    """A model whose outputs hold NaN or infinite values (a diverged training run, or bad weights)."""


class ModelError(CurvlabError):
    """An unknown model name or a bad ``--model-arg``."""


class LayerError(CurvlabError):
    """A model whose layers factor capture cannot handle as asked: batch norm in training mode (its
    batch statistics couple the examples), no layer with factors at all, or ``--strict`` coverage."""


def where(path: object = None, step: object = None, layer: object = None) -> str:
    """The ``file: step S: layer L:`` prefix of an error message (parts that are None are left out)."""
    parts = []
    if path is not None:
        parts.append(str(path))
    if step is not None:
        parts.append(f"step {step}")
    if layer is not None:
        parts.append(f"layer {layer}")
    return ": ".join(parts)


class OptionError(CurvlabError, ValueError):
    """A bad option value (e.g. a ``--layers`` glob that matches nothing, an unknown device)."""
