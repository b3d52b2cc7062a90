"""The checkpoint format, version 2: what a valid file is (constants, data classes, validation).

Everything that writes or reads Kronecker factors goes through :mod:`curvlab.io.checkpoint`; this
module says what its files hold. The layout, attribute types, validation rules and crash-safety
mechanism are documented field by field in ``docs/format.md``; the short version::

    /                               attrs: format = "curvlab.kfac", format_version = 2 (1 still read)
    /model                          (optional) attrs: name (str), config (JSON string)
    /steps/<step>                   attrs: step, complete (written last), fisher_type, num_examples,
                                           optional extras (ema_decay, damping, mc_samples, ...)
    /steps/<step>/factors/<layer>   attrs: module_type, weight_shape, has_bias
        A                           input-side factor, dense (n, n), diagonal (n,) or blocks (C, k, k)
        S                           output-side factor, dense (m, m) or diagonal (m,)
    /steps/<step>/weights/<param>   (optional) model parameters at that step
    /steps/<step>/coverage          (optional) which trainable parameters have factors (:mod:`.coverage`)

Math (design.md, "Math conventions"): a layer ``s = W a`` with ``W`` of shape ``(m, n)`` has
``A = E[a a^T]`` (n x n, input side, ``a`` augmented by a trailing 1 when there is a bias) and
``S = E[g g^T]`` (m x m, output side, ``g = dL/ds`` of the per-example loss), so that the layer's
Fisher block is ``F ~= S (x) A`` for the row-major vec of ``W``. Both factors are symmetric positive
semi-definite; a diagonal factor (1-D dataset) stores only the diagonal of that matrix, a blocks
factor (3-D, ``(C, k, k)``) the diagonal blocks of a block-diagonal one (version 2: the exact
per-channel Fisher blocks of a normalisation layer's ``(γ, β)``, ``module_type = "NormAffine"``,
whose ``S`` is the 1 × 1 factor ``[1]``).

Validation (:func:`validate_layer`, and ``_validate_step`` for everything :func:`save` checks before
it writes a byte): the factor sizes a layer's metadata implies (:func:`expected_factor_sizes`),
float32/float64 dtypes, finite values, and symmetry and positive semi-definiteness within
:data:`SYMMETRY_TOL` of the largest |diagonal entry|. The reader (:mod:`.reader`) and the writer
(:mod:`.writer`) both check files against these rules; the one-line :class:`CheckpointError`
messages (``file: step S: layer L: problem``) are built here too.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from curvlab.errors import CheckpointError, where
from curvlab.io.checkpoint import coverage as coverage_format

FORMAT = "curvlab.kfac"
FORMAT_VERSION = 2
MODULE_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "Embedding", "TiedEmbedding", "NormAffine")
#: The format version that introduced each module type (the others are in version 1).
MODULE_TYPE_VERSION = {"Conv1d": 2, "Conv3d": 2, "NormAffine": 2}
#: The rank of ``weight_shape`` of each module type (``None``: any rank >= 1).
WEIGHT_RANK = {"Conv1d": 3, "Conv2d": 4, "Conv3d": 5, "NormAffine": None}

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


# --------------------------------------------------------------------------------------------------
# Data classes


def _kind(x: np.ndarray) -> str:
    return {1: "diagonal", 3: "blocks"}.get(np.ndim(x), "dense")


@dataclass
class LayerFactors:
    """The two Kronecker factors of one layer, ``F ~= S (x) A`` (design.md, Math conventions).

    ``A`` is the input-side factor (size from :func:`expected_factor_sizes`), ``S`` the output-side
    one. Each is either dense (2-D, square, symmetric PSD) or diagonal (1-D, non-negative).
    ``weight_shape`` is the layer weight's PyTorch shape (for ``Embedding``: ``(V, d)``). A
    ``NormAffine`` entry's ``A`` is blocks, ``(C, k, k)``, and its ``S`` the 1 × 1 factor ``[1]``.
    """

    module_type: str
    weight_shape: tuple[int, ...]
    has_bias: bool
    A: np.ndarray
    S: np.ndarray

    @property
    def A_kind(self) -> str:  # noqa: N802 (the math name)
        """``"dense"`` for a 2-D ``A``, ``"diagonal"`` for a 1-D one, ``"blocks"`` for a 3-D one."""
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
    coverage: dict[str, Any] | None = None


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
    * ``Conv1d`` / ``Conv3d`` (version 2), weight ``(c_out, c_in, k_1[, k_2, k_3])``: A is
      ``c_in*k_1*... + b``, S is ``c_out``.
    * ``NormAffine`` (version 2), weight ``γ`` of any shape with ``C`` entries: A has ``C`` blocks
      (of ``k × k``, :func:`block_size`), S is 1.

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
    if module_type in ("Conv1d", "Conv2d", "Conv3d"):
        return math.prod(shape[1:]) + b, shape[0]  # exact Python ints: a hostile shape cannot overflow
    if module_type == "NormAffine":
        return math.prod(shape), 1
    if module_type == "Embedding":
        if has_bias:
            raise CheckpointError("module_type Embedding cannot have has_bias = true")
        return shape[0], shape[1]
    return shape[1] + b, shape[0]  # TiedEmbedding: the pre-softmax Linear (out = V, in = d)


def block_size(module_type: str, has_bias: bool) -> int | None:
    """``k`` of a blocks factor ``A`` ``(C, k, k)`` (``NormAffine``: 2 with a shift, else 1); ``None``
    for module types whose factors are dense or diagonal."""
    if module_type == "NormAffine":
        return 2 if has_bias else 1
    return None


def check_module_type_version(module_type: str, version: int) -> None:
    """:class:`CheckpointError` when a file of format ``version`` cannot hold ``module_type``."""
    needed = MODULE_TYPE_VERSION.get(module_type, 1)
    if version < needed:
        raise CheckpointError(
            f"module_type {module_type} needs format_version {needed}, the file has {version}"
        )


def _check_weight_shape(module_type: str, weight_shape: object) -> tuple[int, ...]:
    """``weight_shape`` as a tuple of positive ints of the rank ``module_type`` needs."""
    rank = WEIGHT_RANK.get(module_type, 2)
    try:
        arr = np.asarray(weight_shape)
    except Exception as exc:  # noqa: BLE001 (anything unconvertible is a bad shape)
        raise CheckpointError(f"bad weight_shape {weight_shape!r}") from exc
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise CheckpointError(f"bad weight_shape {_fmt(weight_shape)}: not a 1-D integer array")
    if rank is None and not 1 <= arr.shape[0] <= 8:
        raise CheckpointError(f"bad weight_shape {_fmt(weight_shape)}: {module_type} needs 1 to 8 entries")
    if rank is not None and arr.shape[0] != rank:
        raise CheckpointError(
            f"bad weight_shape {_fmt(weight_shape)}: {module_type} needs {rank} entries"
        )
    if (arr < 1).any():
        raise CheckpointError(f"bad weight_shape {_fmt(weight_shape)}: entries must be >= 1")
    if (arr > np.iinfo(np.int64).max).any():
        raise CheckpointError(f"bad weight_shape {_fmt(weight_shape)}: entries must fit in int64")
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


def _check_shape(name: str, shape: tuple[int, ...], size: int, meta: str, block: int | None = None) -> None:
    """Rank 1 or 2, square if 2-D, and of the size the layer metadata implies; with ``block = k``,
    ``(size, k, k)`` blocks instead."""
    if block is not None:
        if shape != (size, block, block):
            raise CheckpointError(
                f"{name} has shape {shape} but {meta} needs {size} blocks of {block} x {block}: "
                f"({size}, {block}, {block})"
            )
        return
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


def _check_block_values(name: str, x: np.ndarray, tol: float) -> None:
    """A blocks factor ``(C, k, k)``: finite, every block symmetric and not clearly indefinite, with
    ``c = max |diagonal entry|`` over all blocks (the rules of a dense factor, block by block; for
    ``k <= 2`` they are exactly positive semi-definiteness up to the tolerance)."""
    if not np.isfinite(x).all():
        raise CheckpointError(f"{name} has non-finite values (NaN or inf)")
    diag = np.diagonal(x, axis1=1, axis2=2)
    scale = float(np.abs(diag).max()) if diag.size else 0.0
    atol = tol * scale
    if diag.size and diag.min() < -atol:
        c, i = np.unravel_index(int(np.argmin(diag)), diag.shape)
        raise CheckpointError(
            f"{name} is not positive semi-definite: block {c} has diagonal entry {float(diag[c, i]):.6g} "
            f"< -{tol:g} * max|diag| ({scale:.6g})"
        )
    asym = np.abs(x - x.transpose(0, 2, 1))
    if asym.size and asym.max() > atol:
        c = int(np.unravel_index(int(np.argmax(asym)), asym.shape)[0])
        raise CheckpointError(
            f"{name} is not symmetric: block {c} differs from its transpose by {float(asym.max()):.3g} > "
            f"{tol:g} * max|diag| ({scale:.6g})"
        )
    root = np.sqrt(np.maximum(diag, 0))
    excess = np.abs(x) - root[:, :, None] * root[:, None, :]
    if excess.size and excess.max() > atol:
        c = int(np.unravel_index(int(np.argmax(excess)), excess.shape)[0])
        raise CheckpointError(f"{name} is not positive semi-definite: block {c} has an entry above "
                              "the square root of the product of its diagonal entries")


def _check_values(name: str, x: np.ndarray) -> None:
    tol = SYMMETRY_TOL[np.dtype(x.dtype.newbyteorder("="))]
    if x.ndim == 3:
        _check_block_values(name, x, tol)
    elif x.ndim == 1:
        _check_diagonal_values(name, x, tol)
    else:
        _check_dense_values(name, x, tol)


def _check_scale(A: np.ndarray, S: np.ndarray) -> None:  # noqa: N803 (the math names)
    """``tr A``, ``tr S`` and ``tr(S ⊗ A) = tr S · tr A`` are finite float64 numbers.

    The trace of the Kronecker block bounds every K-FAC eigenvalue ``λ_S[i] λ_A[j]`` of the layer: if
    it overflows, so would the spectrum, the sums ``info`` reports and every product downstream.
    """
    traces = []
    with np.errstate(over="ignore", invalid="ignore"):
        for name, x in (("A", A), ("S", S)):
            diag = x if x.ndim == 1 else np.diagonal(x, axis1=-2, axis2=-1)  # dense or (C, k, k) blocks
            trace = float(np.abs(diag).sum(dtype=np.float64))
            if not np.isfinite(trace):
                raise CheckpointError(f"{name} is too large: its trace overflows float64")
            traces.append(trace)
        if not np.isfinite(traces[0] * traces[1]):
            raise CheckpointError(
                f"A and S are too large together: tr A * tr S = {traces[0]:.3g} * {traces[1]:.3g} "
                "overflows float64 (the layer's K-FAC eigenvalues would be infinite)"
            )


def _layer_meta_text(module_type: str, weight_shape: tuple[int, ...], has_bias: bool) -> str:
    return f"{module_type} with weight_shape {weight_shape} and has_bias={has_bias}"


def _check_meta(module_type: object, weight_shape: object, has_bias: object) -> tuple[int, int]:
    if not isinstance(has_bias, (bool, np.bool_)):
        raise CheckpointError(f"has_bias is {has_bias!r}, not a bool")
    return expected_factor_sizes(module_type, weight_shape, bool(has_bias))  # type: ignore[arg-type]


def factor_block(module_type: str, has_bias: bool, which: str) -> int | None:
    """``k`` when factor ``which`` (``"A"`` or ``"S"``) of such a layer is stored as ``(C, k, k)`` blocks."""
    return block_size(module_type, has_bias) if which == "A" else None


def validate_layer(
    factors: LayerFactors, *, path: object = None, step: object = None, layer: object = None
) -> None:
    """Check one layer's factors; raise :class:`CheckpointError` naming file, step and layer.

    Checks: known ``module_type``; ``weight_shape`` of the right rank with positive entries;
    ``has_bias`` a bool (false for Embedding); ``A`` and ``S`` float32/float64 of rank 1 (diagonal)
    or 2 (dense, square) with the sizes of :func:`expected_factor_sizes` (a ``NormAffine`` ``A``:
    rank 3, ``(C, k, k)`` blocks); finite; dense factors and blocks symmetric and not clearly
    indefinite, diagonal factors non-negative, all within
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
            block = factor_block(factors.module_type, bool(factors.has_bias), name)
            _check_shape(name, x.shape, size, meta, block)
            _check_values(name, x)
        _check_scale(factors.A, factors.S)
    except CheckpointError as exc:
        raise _error(str(exc), path, step, layer) from None


def _check_name(kind: str, name: object, path: object, step: object) -> None:
    """Layer and parameter names become HDF5 link names: non-empty, no '/', not '.'."""
    if not isinstance(name, str) or not name or "/" in name or name == ".":
        raise _error(f"bad {kind} name {name!r} (non-empty string without '/')", path, step)


def _check_attr_value(key: str, value: object) -> Any:
    """An extra step attribute as something HDF5 stores exactly: number, string or numeric array.

    Extras are small metadata: strings without NUL characters, finite numbers, numeric arrays up to
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
        if not np.isfinite(value):
            raise CheckpointError(f"step attribute {key!r} = {value} is not finite")
        return value
    if isinstance(value, (list, tuple, np.ndarray)):
        arr = np.asarray(value)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise CheckpointError(f"step attribute {key!r} holds non-finite values (NaN or inf)")
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
    if step.coverage is not None:
        try:
            step.coverage = coverage_format.validate(step.coverage)
        except CheckpointError as exc:
            raise _error(str(exc), path, n) from None
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
