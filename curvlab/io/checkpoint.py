"""K-FAC factor checkpoints: the HDF5 format, version 1 (read, write, append steps, validate).

Everything that writes or reads Kronecker factors goes through this module. The layout, attribute
types, validation rules and crash-safety mechanism are documented field by field in
``docs/format.md``; the short version::

    /                               attrs: format = "curvlab.kfac", format_version = 1
    /model                          (optional) attrs: name (str), config (JSON string)
    /steps/<step>                   attrs: step, complete (written last), fisher_type, num_examples,
                                           optional extras (ema_decay, damping, mc_samples, ...)
    /steps/<step>/factors/<layer>   attrs: module_type, weight_shape, has_bias
        A                           input-side factor, dense (n, n) or diagonal (n,)
        S                           output-side factor, dense (m, m) or diagonal (m,)
    /steps/<step>/weights/<param>   (optional) model parameters at that step

Math (design.md, "Math conventions"): a layer ``s = W a`` with ``W`` of shape ``(m, n)`` has
``A = E[a a^T]`` (n x n, input side, ``a`` augmented by a trailing 1 when there is a bias) and
``S = E[g g^T]`` (m x m, output side, ``g = dL/ds`` of the per-example loss), so that the layer's
Fisher block is ``F ~= S (x) A`` for the row-major vec of ``W``. Both factors are symmetric positive
semi-definite; a diagonal factor (1-D dataset) stores only the diagonal of that matrix.

Files are never modified in place: :func:`save` and :func:`append_step` write a temporary file in
the target folder (``.<name>.tmp-<pid>-<random>``), fsync it and ``os.replace`` it onto the target,
so a crash at any moment leaves either the old file or the new one. Readers open files read-only.
No pickle anywhere.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np

from curvlab.errors import CheckpointError, where
from curvlab.io.atomic import commit, remove_quietly, temp_path

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

FORMAT = "curvlab.kfac"
FORMAT_VERSION = 1
MODULE_TYPES = ("Linear", "Conv2d", "Embedding", "TiedEmbedding")

#: Step attributes with a fixed meaning; everything else on a step group is an "extra".
RESERVED_STEP_ATTRS = ("step", "complete", "fisher_type", "num_examples")

# Tolerances of the symmetry and positive-semi-definiteness checks, relative to the factor's largest
# |diagonal entry| (by Cauchy-Schwarz, |X_ij| <= sqrt(X_ii X_jj) <= max|diag| for a PSD matrix, so
# this is the natural scale of every entry). A factor built as a sum of outer products is symmetric
# in exact arithmetic; in floating point, X^T X by a GEMM (not SYRK) rounds entry (i, j) and entry
# (j, i) differently, by some ulps of the precision the *products* ran in, growing roughly like the
# square root of the number of summed rows (examples x locations). The storage dtype does not say
# that precision: curvlab's own capture sums float32 products into float64 (docs/factors.md), and
# resnet8's conv1 on digits came out 1.5e-6 asymmetric (~12 float32 ulps) in a float64 dataset.
# float64: 1e-4 -- float64 sums of float32 products, ~60x above the measured 1.5e-6 and ~10x above
#          what the square-root growth predicts for a CIFAR-sized batch of locations.
# float32: 1e-3 -- float32 products *and* float32 sums or moving averages, 10x the float64 tolerance.
# Real defects (a transposed block, a wrong reshape, a one-sided update, another layer's data) are
# of order 1 and fail either. A writer that wants to be free of the tolerance symmetrises,
# (X + X^T) / 2, before saving.
SYMMETRY_TOL = {np.dtype(np.float32): 1e-3, np.dtype(np.float64): 1e-4}

#: Largest extra step attribute array, in bytes (HDF5 < 1.14 cannot write attributes over 64 KiB).
MAX_ATTR_BYTES = 16384

_STEP_NAME = re.compile(r"^(0|[1-9][0-9]*)$")
_BLOCK_ELEMENTS = 1 << 20  # rows per validation block = this / n: extra memory of ~8 MiB per check


class IncompleteStepWarning(UserWarning):
    """A step group whose ``complete`` attribute is missing or false: it is skipped on read."""


# --------------------------------------------------------------------------------------------------
# Data classes


def _kind(x: np.ndarray) -> str:
    return "diagonal" if np.ndim(x) == 1 else "dense"


@dataclass
class LayerFactors:
    """The two Kronecker factors of one layer, ``F ~= S (x) A`` (design.md, Math conventions).

    ``A`` is the input-side factor (size from :func:`expected_factor_sizes`), ``S`` the output-side
    one. Each is either dense (2-D, square, symmetric PSD) or diagonal (1-D, non-negative).
    ``weight_shape`` is the layer weight's PyTorch shape (for ``Embedding``: ``(V, d)``).
    """

    module_type: str
    weight_shape: tuple[int, ...]
    has_bias: bool
    A: np.ndarray
    S: np.ndarray

    @property
    def A_kind(self) -> str:  # noqa: N802 (the math name)
        """``"dense"`` for a 2-D ``A``, ``"diagonal"`` for a 1-D one."""
        return _kind(self.A)

    @property
    def S_kind(self) -> str:  # noqa: N802 (the math name)
        """``"dense"`` for a 2-D ``S``, ``"diagonal"`` for a 1-D one."""
        return _kind(self.S)


@dataclass
class Step:
    """The factors of every layer at one training step, and optionally the weights at that step.

    ``fisher_type`` is ``"empirical"``, ``"mc"`` or ``"exact"`` (design.md); ``num_examples`` the
    number of training examples the factors were estimated from; ``attrs`` optional extra step
    attributes (``ema_decay``, ``damping``, ``mc_samples``, ...): numbers, strings or numeric arrays.
    """

    step: int
    fisher_type: str
    num_examples: int
    factors: dict[str, LayerFactors]
    weights: dict[str, np.ndarray] | None = None
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Checkpoint:
    """A loaded checkpoint: complete steps only, in ascending step order."""

    path: str
    format_version: int
    model_name: str | None
    model_config: dict | None
    steps: dict[int, Step]


# --------------------------------------------------------------------------------------------------
# Errors


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _error(problem: str, path: object = None, step: object = None, layer: object = None):
    """A :class:`CheckpointError` whose one-line message is ``file: step S: layer L: problem``."""
    prefix = where(path, step, layer)
    return CheckpointError(_one_line(f"{prefix}: {problem}" if prefix else problem))


@contextmanager
def _h5_errors(path: object, step: object = None, layer: object = None) -> Iterator[None]:
    """Turn the exceptions h5py raises on damaged files into one-line :class:`CheckpointError`."""
    try:
        yield
    except CheckpointError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise _error(f"cannot read HDF5 data ({_one_line(str(exc))})", path, step, layer) from exc


# --------------------------------------------------------------------------------------------------
# Sizes and validation


def expected_factor_sizes(
    module_type: str, weight_shape: Sequence[int], has_bias: bool
) -> tuple[int, int]:
    """``(size of A, size of S)`` for a layer; ``b = 1`` if it has a bias, else 0.

    * ``Linear``, weight ``(m, n)`` (PyTorch's ``(out, in)``): A is ``n + b``, S is ``m``.
    * ``Conv2d``, weight ``(c_out, c_in, kh, kw)``: A is ``c_in*kh*kw + b``, S is ``c_out``.
    * ``Embedding``, weight ``(V, d)`` (``nn.Embedding``'s ``(num_embeddings, embedding_dim)``):
      A is ``V`` (input side, one-hot tokens), S is ``d``; no bias.
    * ``TiedEmbedding``, stored as the pre-softmax Linear with weight ``(V, d)``: A is ``d + b``,
      S is ``V``.

    Raises :class:`CheckpointError` (without a location) for an unknown module type, a weight shape
    of the wrong rank or with non-positive entries, or an ``Embedding`` with a bias.
    """
    if not isinstance(module_type, str) or module_type not in MODULE_TYPES:
        raise CheckpointError(
            f"unknown module_type {module_type!r} (expected one of {', '.join(MODULE_TYPES)})"
        )
    shape = _check_weight_shape(module_type, weight_shape)
    b = 1 if has_bias else 0
    if module_type == "Linear":
        return shape[1] + b, shape[0]
    if module_type == "Conv2d":
        return shape[1] * shape[2] * shape[3] + b, shape[0]
    if module_type == "Embedding":
        if has_bias:
            raise CheckpointError("module_type Embedding cannot have has_bias = true")
        return shape[0], shape[1]
    return shape[1] + b, shape[0]  # TiedEmbedding: the pre-softmax Linear (out = V, in = d)


def _check_weight_shape(module_type: str, weight_shape: object) -> tuple[int, ...]:
    """``weight_shape`` as a tuple of positive ints of the rank ``module_type`` needs."""
    rank = 4 if module_type == "Conv2d" else 2
    try:
        arr = np.asarray(weight_shape)
    except Exception as exc:  # noqa: BLE001 (anything unconvertible is a bad shape)
        raise CheckpointError(f"bad weight_shape {weight_shape!r}") from exc
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise CheckpointError(f"bad weight_shape {_fmt(weight_shape)}: not a 1-D integer array")
    if arr.shape[0] != rank:
        raise CheckpointError(
            f"bad weight_shape {_fmt(weight_shape)}: {module_type} needs {rank} entries"
        )
    if (arr < 1).any():
        raise CheckpointError(f"bad weight_shape {_fmt(weight_shape)}: entries must be >= 1")
    return tuple(int(v) for v in arr)


def _fmt(value: object) -> str:
    if isinstance(value, np.ndarray):
        return str(tuple(value.tolist()))
    return str(tuple(value)) if isinstance(value, (list, tuple)) else repr(value)


def _check_dtype(name: str, dtype: np.dtype) -> None:
    if dtype.kind == "f" and dtype.itemsize in (4, 8):
        return
    kinds = {"i": "integer ", "u": "integer ", "b": "bool ", "c": "complex ", "f": ""}
    what = kinds.get(dtype.kind, "non-numeric ")
    raise CheckpointError(f"{name} has {what}dtype {dtype.name} (must be float32 or float64)")


def _check_shape(name: str, shape: tuple[int, ...], size: int, meta: str) -> None:
    """Rank 1 or 2, square if 2-D, and of the size the layer metadata implies."""
    if len(shape) not in (1, 2):
        raise CheckpointError(
            f"{name} has rank {len(shape)} (must be 2 for dense or 1 for diagonal): shape {shape}"
        )
    if len(shape) == 2 and shape[0] != shape[1]:
        raise CheckpointError(f"{name} is not square: shape {shape}")
    if shape[0] != size:
        raise CheckpointError(f"{name} has size {shape[0]} but {meta} needs {size}")


def _row_blocks(n: int) -> Iterator[slice]:
    rows = max(1, _BLOCK_ELEMENTS // max(n, 1))
    for start in range(0, n, rows):
        yield slice(start, min(start + rows, n))


def _check_diagonal_values(name: str, d: np.ndarray, tol: float) -> None:
    """A diagonal factor: finite, and no entry below ``-tol * max|d|``."""
    if not np.isfinite(d).all():
        raise CheckpointError(f"{name} has non-finite values (NaN or inf)")
    scale = float(np.abs(d).max()) if d.size else 0.0
    i = int(np.argmin(d)) if d.size else 0
    if d.size and d[i] < -tol * scale:
        raise CheckpointError(
            f"{name} is not positive semi-definite: diagonal factor has negative entry "
            f"{name}[{i}] = {float(d[i]):.6g} (tolerance {tol:g} * max|entry| {scale:.6g})"
        )


def _check_dense_values(name: str, x: np.ndarray, tol: float) -> None:
    """A dense factor: finite, symmetric and not clearly indefinite, checked in row blocks.

    With ``c = max|diag(X)|``: ``|X - X^T| <= tol * c`` entrywise, ``X_ii >= -tol * c`` and
    ``|X_ij| <= sqrt(X_ii X_jj) + tol * c`` (every 2x2 principal minor of a PSD matrix is >= 0).
    """
    diag = np.diagonal(x)
    if not np.isfinite(diag).all():
        raise CheckpointError(f"{name} has non-finite values (NaN or inf)")
    scale = float(np.abs(diag).max()) if diag.size else 0.0
    atol = tol * scale
    i = int(np.argmin(diag))
    if diag[i] < -atol:
        raise CheckpointError(
            f"{name} is not positive semi-definite: diagonal entry {name}[{i},{i}] = "
            f"{float(diag[i]):.6g} < -{tol:g} * max|diag| ({scale:.6g})"
        )
    root = np.sqrt(np.maximum(diag, 0))
    for rows in _row_blocks(x.shape[0]):
        block = x[rows]
        if not np.isfinite(block).all():
            raise CheckpointError(f"{name} has non-finite values (NaN or inf)")
        asym = np.abs(block - x[:, rows].T)
        if asym.max() > atol:
            r, c = np.unravel_index(int(np.argmax(asym)), asym.shape)
            hint = ""
            if asym[r, c] <= 100 * atol:
                hint = " (rounding? symmetrise with (X + X^T) / 2 before saving)"
            raise CheckpointError(
                f"{name} is not symmetric: |{name}[{r + rows.start},{c}] - {name}[{c},"
                f"{r + rows.start}]| = {float(asym[r, c]):.3g} > {tol:g} * max|diag| ({scale:.6g})"
                + hint
            )
        excess = np.abs(block) - root[rows, None] * root[None, :]
        if excess.max() > atol:
            r, c = np.unravel_index(int(np.argmax(excess)), excess.shape)
            r += rows.start
            raise CheckpointError(
                f"{name} is not positive semi-definite: |{name}[{r},{c}]| = {float(x[r, c]):.6g} "
                f"exceeds sqrt({name}[{r},{r}] * {name}[{c},{c}]) = {float(root[r] * root[c]):.6g}"
            )


def _check_values(name: str, x: np.ndarray) -> None:
    tol = SYMMETRY_TOL[np.dtype(x.dtype.newbyteorder("="))]
    if x.ndim == 1:
        _check_diagonal_values(name, x, tol)
    else:
        _check_dense_values(name, x, tol)


def _layer_meta_text(module_type: str, weight_shape: tuple[int, ...], has_bias: bool) -> str:
    return f"{module_type} with weight_shape {weight_shape} and has_bias={has_bias}"


def _check_meta(module_type: object, weight_shape: object, has_bias: object) -> tuple[int, int]:
    if not isinstance(has_bias, (bool, np.bool_)):
        raise CheckpointError(f"has_bias is {has_bias!r}, not a bool")
    return expected_factor_sizes(module_type, weight_shape, bool(has_bias))  # type: ignore[arg-type]


def validate_layer(
    factors: LayerFactors, *, path: object = None, step: object = None, layer: object = None
) -> None:
    """Check one layer's factors; raise :class:`CheckpointError` naming file, step and layer.

    Checks: known ``module_type``; ``weight_shape`` of the right rank with positive entries;
    ``has_bias`` a bool (false for Embedding); ``A`` and ``S`` float32/float64 of rank 1 (diagonal)
    or 2 (dense, square) with the sizes of :func:`expected_factor_sizes`; finite; dense factors
    symmetric and not clearly indefinite, diagonal factors non-negative, both within
    :data:`SYMMETRY_TOL` relative to the largest |diagonal entry|.
    """
    try:
        size_a, size_s = _check_meta(factors.module_type, factors.weight_shape, factors.has_bias)
        meta = _layer_meta_text(
            factors.module_type, tuple(factors.weight_shape), bool(factors.has_bias)
        )
        for name, size in (("A", size_a), ("S", size_s)):
            x = getattr(factors, name)
            if not isinstance(x, np.ndarray):
                raise CheckpointError(f"{name} is a {type(x).__name__}, not a numpy array")
            _check_dtype(name, x.dtype)
            _check_shape(name, x.shape, size, meta)
            _check_values(name, x)
    except CheckpointError as exc:
        raise _error(str(exc), path, step, layer) from None


def _check_name(kind: str, name: object, path: object, step: object) -> None:
    """Layer and parameter names become HDF5 link names: non-empty, no '/', not '.'."""
    if not isinstance(name, str) or not name or "/" in name or name == ".":
        raise _error(f"bad {kind} name {name!r} (non-empty string without '/')", path, step)


def _check_attr_value(key: str, value: object) -> Any:
    """An extra step attribute as something HDF5 stores exactly: number, string or numeric array.

    Extras are small metadata: strings without NUL characters, numeric arrays up to
    :data:`MAX_ATTR_BYTES` (older HDF5 libraries cannot write larger attributes).
    """
    if isinstance(value, str):
        if "\0" in value:
            raise CheckpointError(f"step attribute {key!r} contains a NUL character")
        return value
    if isinstance(value, (bool, np.bool_)):
        return value
    if isinstance(value, (int, np.integer)):
        if not -(2**63) <= int(value) < 2**63:
            raise CheckpointError(f"step attribute {key!r} = {value} does not fit in int64")
        return np.int64(value)
    if isinstance(value, (float, np.floating)):
        return value
    if isinstance(value, (list, tuple, np.ndarray)):
        arr = np.asarray(value)
        if arr.dtype.kind in "biuf" and arr.ndim == 0:
            return arr[()]
        if arr.dtype.kind in "biuf" and arr.nbytes > MAX_ATTR_BYTES:
            raise CheckpointError(
                f"step attribute {key!r} is an array of {arr.nbytes} bytes (at most "
                f"{MAX_ATTR_BYTES}: extras are small metadata)"
            )
        if arr.dtype.kind in "biuf":
            return arr
    raise CheckpointError(
        f"step attribute {key!r} has a value of type {type(value).__name__} that cannot be stored"
        " (use a number, a string or a numeric array)"
    )


def _validate_step(step: Step, path: object) -> None:
    """Everything :func:`save` checks before it writes a byte."""
    if not isinstance(step, Step):
        raise _error(f"expected a Step, got {type(step).__name__}", path)
    n = step.step
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 0:
        raise _error(f"step number {n!r} is not a non-negative integer", path)
    if not isinstance(step.fisher_type, str) or not step.fisher_type:
        raise _error(f"fisher_type {step.fisher_type!r} is not a non-empty string", path, n)
    k = step.num_examples
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 0:
        raise _error(f"num_examples {k!r} is not a non-negative integer", path, n)
    for key, value in step.attrs.items():
        if not isinstance(key, str) or not key or key in RESERVED_STEP_ATTRS:
            raise _error(f"bad extra step attribute name {key!r}", path, n)
        try:
            _check_attr_value(key, value)
        except CheckpointError as exc:
            raise _error(str(exc), path, n) from None
    for name, factors in step.factors.items():
        _check_name("layer", name, path, n)
        if not isinstance(factors, LayerFactors):
            raise _error(f"expected LayerFactors, got {type(factors).__name__}", path, n, name)
        validate_layer(factors, path=path, step=n, layer=name)
    for name, w in (step.weights or {}).items():
        _check_name("parameter", name, path, n)
        if np.asarray(w).dtype.kind not in "biuf":
            raise _error(f"weight {name} has dtype {np.asarray(w).dtype} (not numeric)", path, n)


def _model_config_json(model_config: Mapping | None, path: object) -> str | None:
    if model_config is None:
        return None
    if not isinstance(model_config, Mapping):
        raise _error(f"model_config is a {type(model_config).__name__}, not a dict", path)
    try:
        return json.dumps(dict(model_config), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise _error(f"model_config cannot be written as JSON ({exc})", path) from None


# --------------------------------------------------------------------------------------------------
# Writing


def _mark_complete(group: h5py.Group) -> None:
    """Written after everything else in the step: a reader ignores steps without it."""
    group.file.flush()
    group.attrs["complete"] = np.bool_(True)


def _write_layer(parent: h5py.Group, name: str, factors: LayerFactors) -> None:
    g = parent.create_group(name)
    g.attrs["module_type"] = factors.module_type
    g.attrs["weight_shape"] = np.asarray(factors.weight_shape, dtype=np.int64)
    g.attrs["has_bias"] = np.bool_(factors.has_bias)
    g.create_dataset("A", data=factors.A)
    g.create_dataset("S", data=factors.S)


def _write_step(steps_group: h5py.Group, step: Step) -> None:
    """One ``/steps/<step>`` group; ``complete = True`` is the last thing written."""
    g = steps_group.create_group(str(int(step.step)), track_order=True)
    g.attrs["step"] = np.int64(step.step)
    g.attrs["fisher_type"] = step.fisher_type
    g.attrs["num_examples"] = np.int64(step.num_examples)
    for key, value in step.attrs.items():
        g.attrs[key] = _check_attr_value(key, value)
    fg = g.create_group("factors", track_order=True)
    for name, factors in step.factors.items():
        _write_layer(fg, name, factors)
    if step.weights is not None:
        wg = g.create_group("weights", track_order=True)
        for name, w in step.weights.items():
            wg.create_dataset(name, data=np.asarray(w))
    _mark_complete(g)


def _write_model(f: h5py.File, name: str | None, config_json: str | None) -> None:
    if name is None and config_json is None:
        return
    g = f.require_group("model")
    if name is not None:
        g.attrs["name"] = str(name)
    if config_json is not None:
        g.attrs["config"] = config_json


def _as_step_list(steps: Step | Sequence[Step]) -> list[Step]:
    return [steps] if isinstance(steps, Step) else list(steps)


def save(
    path: str | os.PathLike,
    steps: Step | Sequence[Step],
    *,
    model_name: str | None = None,
    model_config: Mapping | None = None,
) -> None:
    """Write a new checkpoint holding ``steps`` (replacing any file at ``path``), atomically.

    Everything is validated first (a failure leaves an existing file untouched); the file is then
    written to ``.<name>.tmp-<pid>-<random>`` in the same folder, fsynced and renamed onto
    ``path`` with ``os.replace``. The temp file is removed if anything fails.
    """
    path_s = os.fspath(path)
    step_list = _as_step_list(steps)
    seen: set[int] = set()
    for step in step_list:
        _validate_step(step, path_s)
        if int(step.step) in seen:
            raise _error(f"step {step.step} is given twice", path_s)
        seen.add(int(step.step))
    config_json = _model_config_json(model_config, path_s)
    target = os.path.realpath(path_s)  # through a symlink: replace the file it points to
    if not os.path.isdir(os.path.dirname(target)):
        raise _error(f"cannot write: folder {os.path.dirname(target)} does not exist", path_s)
    tmp = temp_path(target)
    try:
        with _write_errors(path_s):
            with h5py.File(tmp, "w-") as f:
                f.attrs["format"] = FORMAT
                f.attrs["format_version"] = np.int64(FORMAT_VERSION)
                _write_model(f, model_name, config_json)
                steps_group = f.create_group("steps", track_order=True)
                for step in sorted(step_list, key=lambda s: int(s.step)):
                    _write_step(steps_group, step)
            commit(tmp, target)
    except BaseException:
        remove_quietly(tmp)
        raise


@contextmanager
def _write_errors(path: str) -> Iterator[None]:
    try:
        yield
    except CheckpointError:
        raise
    except (OSError, RuntimeError, ValueError, TypeError) as exc:
        raise _error(f"cannot write checkpoint ({_one_line(str(exc))})", path) from exc


def append_step(
    path: str | os.PathLike,
    step: Step,
    *,
    replace: bool = False,
    model_name: str | None = None,
    model_config: Mapping | None = None,
) -> None:
    """Add one step to the checkpoint at ``path`` (created with :func:`save` if it is missing).

    Crash-safe by copy-and-rename: the file is copied to ``.<name>.tmp-<pid>-<random>`` in the same
    folder, the step is written into the copy (``complete`` last), the copy is fsynced and renamed
    onto ``path``, and the folder is fsynced. Killed at any moment, the file holds either the old
    steps or the old steps plus the new one. Cost: one full copy of the file per call.

    A complete step with the same number is an error unless ``replace=True``; an incomplete one is
    replaced. ``model_name`` / ``model_config`` are written if the file has none and must agree
    with what it has otherwise (one file holds one training run).
    """
    path_s = os.fspath(path)
    _validate_step(step, path_s)
    config_json = _model_config_json(model_config, path_s)
    if not os.path.exists(path_s):
        save(path_s, step, model_name=model_name, model_config=model_config)
        return
    with CheckpointReader(path_s) as reader:
        _check_model_agrees(reader, model_name, config_json)
        exists = reader._is_complete_step_quiet(int(step.step))
    if exists and not replace:
        raise _error(
            "already holds a complete step with this number (pass replace=True to overwrite it)",
            path_s,
            int(step.step),
        )
    target = os.path.realpath(path_s)  # through a symlink: update the file it points to
    tmp = temp_path(target)
    try:
        with _write_errors(path_s):
            shutil.copyfile(target, tmp)
            _copy_mode(target, tmp)
            with h5py.File(tmp, "r+") as f:
                steps_group = f["steps"]
                if str(int(step.step)) in steps_group:
                    del steps_group[str(int(step.step))]
                _write_model(f, model_name, config_json)
                _write_step(steps_group, step)
            commit(tmp, target)
    except BaseException:
        remove_quietly(tmp)
        raise


def _copy_mode(src: str, dst: str) -> None:
    try:
        shutil.copymode(src, dst)
    except OSError:
        pass


def _check_model_agrees(
    reader: CheckpointReader, model_name: str | None, config_json: str | None
) -> None:
    if model_name is not None and reader.model_name not in (None, model_name):
        raise _error(
            f"model name {model_name!r} differs from the file's {reader.model_name!r}",
            reader.path,
        )
    if config_json is not None and reader.model_config not in (None, json.loads(config_json)):
        raise _error("model_config differs from the config already in the file", reader.path)


# --------------------------------------------------------------------------------------------------
# Reading


def _scalar(value: object) -> object:
    """An attribute as a Python scalar (size-1 arrays unwrapped, bytes decoded)."""
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return value


def _attr_int(attrs: h5py.AttributeManager, key: str) -> int:
    if key not in attrs:
        raise CheckpointError(f"missing attribute {key}")
    value = _scalar(attrs[key])
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"attribute {key} is {value!r}, not an integer")
    return value


def _attr_str(attrs: h5py.AttributeManager, key: str) -> str:
    if key not in attrs:
        raise CheckpointError(f"missing attribute {key}")
    value = _scalar(attrs[key])
    if not isinstance(value, str):
        raise CheckpointError(f"attribute {key} is {value!r}, not a string")
    return value


def _attr_bool(attrs: h5py.AttributeManager, key: str) -> bool:
    """A bool attribute: h5py's bool enum, or an integer 0/1 from writers without one."""
    if key not in attrs:
        raise CheckpointError(f"missing attribute {key}")
    value = _scalar(attrs[key])
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise CheckpointError(f"attribute {key} is {value!r}, not a bool")


def _extra_value(value: object) -> Any:
    if isinstance(value, np.ndarray):
        return value
    return _scalar(value)


class CheckpointReader:
    """Lazy, layer-by-layer access to a checkpoint (peak memory: one layer's factors).

    Opens the file read-only (it is never modified) and checks that it is HDF5 and has the root
    attributes of format v1. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._file = _open_read_only(self.path)
        self._steps: tuple[list[int], list[int]] | None = None
        try:
            with _h5_errors(self.path):
                self.format_version = _check_root(self._file, self.path)
                self.model_name, self.model_config = _read_model(self._file, self.path)
                if "steps" not in self._file or not isinstance(self._file["steps"], h5py.Group):
                    raise _error("missing /steps group (not a curvlab checkpoint?)", self.path)
        except BaseException:
            self._file.close()
            raise

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file (idempotent)."""
        self._file.close()

    # --- steps -----------------------------------------------------------------------------------

    def _step_groups(self) -> Iterator[tuple[str, h5py.Group]]:
        steps = self._file["steps"]
        for name in steps:
            with _h5_errors(self.path, name):
                g = steps.get(name)
            if not isinstance(g, h5py.Group):
                raise _error("is not a group", self.path, name)
            yield name, g

    def _step_state(self, name: str, g: h5py.Group) -> bool:
        """True for a complete step; checks the group name and its ``step`` attribute."""
        if not _STEP_NAME.match(name):
            raise _error(
                f"step group name {name!r} is not a step number in decimal (like '0' or '200',"
                " no sign or leading zeros)",
                self.path,
                name,
            )
        try:
            with _h5_errors(self.path, name):
                complete = "complete" in g.attrs and _attr_bool(g.attrs, "complete")
                if complete:
                    number = _attr_int(g.attrs, "step")
                    if str(number) != name:
                        raise CheckpointError(
                            f"step attribute {number} disagrees with the group name {name!r}"
                        )
        except CheckpointError as exc:
            raise _error(str(exc), self.path, name) from None
        return complete

    def _scan(self) -> tuple[list[int], list[int]]:
        """(complete, incomplete) step numbers, ascending; warns once per incomplete step."""
        if self._steps is None:
            complete, incomplete = [], []
            for name, g in self._step_groups():
                if self._step_state(name, g):
                    complete.append(int(name))
                    continue
                incomplete.append(int(name))
                warnings.warn(
                    f"{where(self.path, name)}: incomplete step (attribute complete missing or"
                    " false: the writer probably died while writing it), skipped",
                    IncompleteStepWarning,
                    stacklevel=3,
                )
            self._steps = (sorted(complete), sorted(incomplete))
        return self._steps

    def step_numbers(self) -> list[int]:
        """Complete step numbers, ascending; each incomplete step gives one IncompleteStepWarning."""
        return list(self._scan()[0])

    def incomplete_steps(self) -> list[int]:
        """Numbers of the step groups skipped as incomplete (``complete`` missing or false)."""
        return list(self._scan()[1])

    def _is_complete_step_quiet(self, step: int) -> bool:
        g = self._file["steps"].get(str(step))
        return isinstance(g, h5py.Group) and self._step_state(str(step), g)

    def _group(self, step: int) -> h5py.Group:
        numbers = self.step_numbers()
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise _error(f"step {step!r} is not an integer", self.path)
        if int(step) not in numbers:
            listed = ", ".join(map(str, numbers)) or "none"
            raise _error(f"no complete step {step} (complete steps: {listed})", self.path)
        return self._file["steps"][str(int(step))]

    def step_attrs(self, step: int) -> dict[str, Any]:
        """``fisher_type``, ``num_examples`` and every extra attribute of a complete step."""
        g = self._group(step)
        try:
            with _h5_errors(self.path, step):
                out: dict[str, Any] = {
                    "fisher_type": _attr_str(g.attrs, "fisher_type"),
                    "num_examples": _attr_int(g.attrs, "num_examples"),
                }
                if out["num_examples"] < 0:
                    raise CheckpointError(f"num_examples {out['num_examples']} is negative")
                for key in g.attrs:
                    if key not in RESERVED_STEP_ATTRS:
                        out[key] = _extra_value(g.attrs[key])
        except CheckpointError as exc:
            raise _error(str(exc), self.path, step) from None
        return out

    # --- layers ----------------------------------------------------------------------------------

    def _factors_group(self, step: int) -> h5py.Group:
        g = self._group(step)
        fg = g.get("factors")
        if not isinstance(fg, h5py.Group):
            raise _error("missing factors group", self.path, step)
        return fg

    def layer_names(self, step: int) -> list[str]:
        """Layer names of a step, in the order they were written."""
        with _h5_errors(self.path, step):
            return list(self._factors_group(step))

    def _layer_group(self, step: int, layer: str) -> h5py.Group:
        fg = self._factors_group(step)
        with _h5_errors(self.path, step, layer):
            lg = fg.get(layer)
        if lg is None:
            raise _error("no such layer in this step", self.path, step, layer)
        if not isinstance(lg, h5py.Group):
            raise _error("is not a group", self.path, step, layer)
        return lg

    def layer_meta(self, step: int, layer: str) -> tuple[str, tuple[int, ...], bool]:
        """``(module_type, weight_shape, has_bias)`` of a layer, validated."""
        lg = self._layer_group(step, layer)
        try:
            with _h5_errors(self.path, step, layer):
                return _read_meta(lg)[:3]
        except CheckpointError as exc:
            raise _error(str(exc), self.path, step, layer) from None

    def factor_kind(self, step: int, layer: str, which: str) -> str:
        """``"diagonal"`` when factor ``which`` (``"A"`` or ``"S"``) is stored as a vector, else
        ``"dense"``, from the dataset's shape alone (no data read, not validated: a missing or
        malformed factor counts as dense; :meth:`read_factors` reports it)."""
        if which not in ("A", "S"):
            raise ValueError(f"factor {which!r}: expected 'A' or 'S'")
        try:
            with _h5_errors(self.path, step, layer):
                ds = self._layer_group(step, layer).get(which)
        except CheckpointError:
            return "dense"
        return "diagonal" if isinstance(ds, h5py.Dataset) and ds.ndim == 1 else "dense"

    def read_factors(self, step: int, layer: str) -> LayerFactors:
        """One layer's factors, read and validated (see :func:`validate_layer`)."""
        lg = self._layer_group(step, layer)
        try:
            with _h5_errors(self.path, step, layer):
                module_type, weight_shape, has_bias, sizes = _read_meta(lg)
                meta = _layer_meta_text(module_type, weight_shape, has_bias)
                arrays = [_read_factor(lg, name, size, meta) for name, size in zip("AS", sizes, strict=True)]
        except CheckpointError as exc:
            raise _error(str(exc), self.path, step, layer) from None
        return LayerFactors(module_type, weight_shape, has_bias, arrays[0], arrays[1])

    def read_weights(self, step: int) -> dict[str, np.ndarray]:
        """The model parameters stored with a step (``{}`` if none)."""
        return self._read_weights(step) or {}

    def _read_weights(self, step: int) -> dict[str, np.ndarray] | None:
        g = self._group(step)
        wg = g.get("weights")
        if wg is None:
            return None
        if not isinstance(wg, h5py.Group):
            raise _error("weights is not a group", self.path, step)
        out = {}
        with _h5_errors(self.path, step):
            for name in wg:
                ds = wg[name]
                if not isinstance(ds, h5py.Dataset) or ds.dtype.kind not in "biuf":
                    raise _error(f"weight {name} is not a numeric dataset", self.path, step)
                out[name] = _native(ds[()])
        return out


def _open_read_only(path: str) -> h5py.File:
    if not os.path.exists(path):
        raise _error("no such file", path)
    if os.path.isdir(path):
        raise _error("is a folder, not a checkpoint file", path)
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        reason = _one_line(str(exc))
        if "signature" in reason:
            reason = "no HDF5 signature"
        elif "truncated" in reason:
            reason = f"truncated ({reason})"
        raise _error(f"not a readable HDF5 file: {reason}", path) from None


def _check_root(f: h5py.File, path: str) -> int:
    """The root attributes: ``format == FORMAT`` and ``format_version`` this code can read."""
    if "format" not in f.attrs:
        raise _error("not a curvlab checkpoint: root attribute format is missing", path)
    fmt = _scalar(f.attrs["format"])
    if fmt != FORMAT:
        raise _error(f"not a curvlab checkpoint: format is {fmt!r}, expected {FORMAT!r}", path)
    try:
        version = _attr_int(f.attrs, "format_version")
    except CheckpointError as exc:
        raise _error(f"root {exc}", path) from None
    if version > FORMAT_VERSION:
        raise _error(
            f"format_version {version} was written by a newer curvlab (this one reads version "
            f"{FORMAT_VERSION}): upgrade curvlab",
            path,
        )
    if version < 1:
        raise _error(f"format_version {version} is not valid (must be {FORMAT_VERSION})", path)
    return version


def _read_model(f: h5py.File, path: str) -> tuple[str | None, dict | None]:
    g = f.get("model")
    if g is None:
        return None, None
    if not isinstance(g, h5py.Group):
        raise _error("/model is not a group", path)
    name = config = None
    try:
        if "name" in g.attrs:
            name = _attr_str(g.attrs, "name")
        if "config" in g.attrs:
            text = _attr_str(g.attrs, "config")
            try:
                config = json.loads(text)
            except json.JSONDecodeError as exc:
                raise CheckpointError(f"config is not valid JSON ({exc})") from None
            if not isinstance(config, dict):
                raise CheckpointError("config is valid JSON but not a JSON object")
    except CheckpointError as exc:
        raise _error(f"/model: {exc}", path) from None
    return name, config


def _read_meta(lg: h5py.Group) -> tuple[str, tuple[int, ...], bool, tuple[int, int]]:
    """``module_type, weight_shape, has_bias, (size of A, size of S)`` from a layer group."""
    module_type = _attr_str(lg.attrs, "module_type")
    if "weight_shape" not in lg.attrs:
        raise CheckpointError("missing attribute weight_shape")
    raw_shape = lg.attrs["weight_shape"]
    has_bias = _attr_bool(lg.attrs, "has_bias")
    sizes = expected_factor_sizes(module_type, raw_shape, has_bias)
    return module_type, _check_weight_shape(module_type, raw_shape), has_bias, sizes


def _native(arr: np.ndarray) -> np.ndarray:
    """``arr`` in native byte order (HDF5 can store big-endian data)."""
    if arr.dtype.byteorder not in ("=", "|"):
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def _read_factor(lg: h5py.Group, name: str, size: int, meta: str) -> np.ndarray:
    ds = lg.get(name)
    if ds is None:
        raise CheckpointError(f"missing factor {name}")
    if not isinstance(ds, h5py.Dataset):
        raise CheckpointError(f"{name} is not a dataset")
    _check_dtype(name, ds.dtype)
    _check_shape(name, tuple(ds.shape), size, meta)
    arr = _native(ds[()])
    _check_values(name, arr)
    return arr


def _as_patterns(layers: str | Iterable[str] | None) -> list[str] | None:
    if layers is None:
        return None
    return [layers] if isinstance(layers, str) else list(layers)


def _select_steps(reader: CheckpointReader, steps: object) -> list[int]:
    """``None`` (all), ``"latest"``, an int or a list of ints, as a sorted list of step numbers."""
    available = reader.step_numbers()
    if steps is None:
        return available
    if steps == "latest":
        if not available:
            raise _error("holds no complete step", reader.path)
        return [available[-1]]
    if isinstance(steps, (int, np.integer)):
        wanted = [steps]
    elif isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
        raise _error(f"steps={steps!r}: expected None, 'latest', an int or a list of ints",
                     reader.path)
    else:
        wanted = list(steps)
    for n in wanted:
        reader._group(n)  # raises a one-line error for an unknown or non-integer step
    return sorted({int(n) for n in wanted})


def load(
    path: str | os.PathLike,
    *,
    steps: int | str | Sequence[int] | None = None,
    layers: str | Sequence[str] | None = None,
    weights: bool = True,
) -> Checkpoint:
    """Read and validate a checkpoint (complete steps only; incomplete ones warn and are skipped).

    ``steps``: ``None`` (all), ``"latest"``, a step number or a list of them. ``layers``: ``None``
    (all) or an ``fnmatch`` glob or list of globs on layer names (case-sensitive); a glob matching
    no layer of any selected step is an error. ``weights=False`` skips the stored parameters
    (``Step.weights`` is then ``None``, as it is for a step stored without weights).
    """
    with CheckpointReader(path) as reader:
        numbers = _select_steps(reader, steps)
        patterns = _as_patterns(layers)
        used: set[str] = set()
        out: dict[int, Step] = {}
        for n in numbers:
            out[n] = _load_step(reader, n, patterns, used, weights)
        unused = [p for p in patterns or [] if p not in used]
        if unused and numbers:
            raise _error(f"layers: pattern {unused[0]!r} matches no layer", reader.path)
        return Checkpoint(
            path=reader.path,
            format_version=reader.format_version,
            model_name=reader.model_name,
            model_config=reader.model_config,
            steps=out,
        )


def _load_step(
    reader: CheckpointReader, n: int, patterns: list[str] | None, used: set[str], weights: bool
) -> Step:
    attrs = reader.step_attrs(n)
    factors = {}
    for name in reader.layer_names(n):
        if patterns is not None:
            hits = [p for p in patterns if fnmatch.fnmatchcase(name, p)]
            used.update(hits)
            if not hits:
                continue
        factors[name] = reader.read_factors(n, name)
    return Step(
        step=n,
        fisher_type=attrs.pop("fisher_type"),
        num_examples=attrs.pop("num_examples"),
        factors=factors,
        weights=reader._read_weights(n) if weights else None,
        attrs=attrs,
    )
