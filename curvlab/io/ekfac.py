"""The EKFAC file: the Kronecker-factored eigenbasis of each layer with EKFAC's eigenvalues in it.

EKFAC (George et al. 2018) keeps K-FAC's eigenbasis ``Q_S ⊗ Q_A`` and replaces the eigenvalues
``σ_i α_j`` by the second moments of the gradients along each direction, ``Λ_ij = E[(Q_S^T G Q_A)_ij²]``.
``curvlab gradcov --ekfac OUT.h5`` writes them (the Fisher's, from its curvature route, or the empirical
gradients' second moments); ``curvlab spectrum`` and ``curvlab fit`` read them as a spectrum, and
:meth:`curvlab.analysis.operators.EKFACOperator.from_file` as an operator. The layout (docs/format.md,
"EKFAC files")::

    /                               attrs: format = "curvlab.ekfac", format_version = 2, source, data
    /model                          (optional) attrs: name, config — copied from the checkpoint
    /steps/<step>                   attrs: step, complete (written last), fisher_type, num_examples
    /steps/<step>/layers/<layer>    attrs: module_type, weight_shape, has_bias
        eigenvalues                 (m, n) float64 >= 0: Λ[i, j] along Q_S[:, i] Q_A[:, j]^T
        S_eigenvalues, A_eigenvalues   (m,), (n,) float64: K-FAC's factor eigenvalues, ascending
        S_eigenvectors | S_order    (m, m) float64 columns, or (m,) int64 with Q_S = I[:, order]
        A_eigenvectors | A_order    the same for A; a NormAffine entry's blocks A (version 2) has both:
                                    (C, k, k) float64 (each block's eigenvectors in its columns) and
                                    (n,) int64, n = C·k: column i of Q_A is eigenvector order[i] % k
                                    of block order[i] // k (as the spectrum file's F_order)

Reading validates every shape against the layer's ``weight_shape`` before any data is read (so a
hostile file cannot make the reader allocate more than the layer's own size), and refuses non-finite or
negative eigenvalues and orders that are not permutations, with one line naming file, step and layer.
The file is untrusted: it is opened, walked and read through :mod:`curvlab.io.hdf5` (no pipe, no link
or storage outside the file, sizes checked against the budget). numpy and h5py only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from curvlab.errors import CheckpointError, CurvlabError, where
from curvlab.io import hdf5
from curvlab.limits import ReadBudget

EKFAC_FORMAT = "curvlab.ekfac"
EKFAC_FORMAT_VERSION = 2  # 2: NormAffine entries (blocks A); version 1 files are still read


@dataclass
class EKFACLayer:
    module_type: str
    weight_shape: tuple[int, ...]
    has_bias: bool
    eigenvalues: np.ndarray
    S_eigenvalues: np.ndarray
    A_eigenvalues: np.ndarray
    S_eigenvectors: np.ndarray | None = None
    S_order: np.ndarray | None = None
    A_eigenvectors: np.ndarray | None = None
    A_order: np.ndarray | None = None


@dataclass
class EKFACStep:
    step: int
    fisher_type: str
    num_examples: int
    layers: dict[str, EKFACLayer]


def permutation_of(Q: np.ndarray) -> np.ndarray | None:
    """``order`` with ``Q = I[:, order]`` if ``Q`` is a permutation matrix, else ``None``."""
    if Q.ndim != 2 or np.count_nonzero(Q) != Q.shape[0] or not np.all((Q == 0) | (Q == 1)):
        return None
    order = np.argmax(Q, axis=0)
    return order.astype(np.int64) if len(np.unique(order)) == Q.shape[0] else None


def write_ekfac(
    path: str,
    step: int,
    layers: Mapping[str, EKFACLayer],
    *,
    fisher_type: str,
    num_examples: int,
    attrs: Mapping[str, Any],
    model_name: str | None = None,
    model_config: Mapping[str, Any] | None = None,
) -> None:
    """Write one step's EKFAC layers to a new file, atomically (``complete`` written last)."""
    from curvlab.io.atomic import atomic_output

    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"] = EKFAC_FORMAT
        f.attrs["format_version"] = np.int64(EKFAC_FORMAT_VERSION)
        for key, value in attrs.items():
            f.attrs[key] = value
        if model_name is not None or model_config is not None:
            mg = f.create_group("model")
            if model_name is not None:
                mg.attrs["name"] = model_name
            if model_config is not None:
                mg.attrs["config"] = json.dumps(dict(model_config))
        g = f.create_group(f"steps/{step}", track_order=True)
        g.attrs["step"] = np.int64(step)
        g.attrs["fisher_type"] = fisher_type
        g.attrs["num_examples"] = np.int64(num_examples)
        lg = g.create_group("layers", track_order=True)
        for name, layer in layers.items():
            h = lg.create_group(name)
            h.attrs["module_type"] = layer.module_type
            h.attrs["weight_shape"] = np.asarray(layer.weight_shape, dtype=np.int64)
            h.attrs["has_bias"] = np.bool_(layer.has_bias)
            h.create_dataset("eigenvalues", data=np.asarray(layer.eigenvalues, dtype=np.float64))
            for which in ("S", "A"):
                h.create_dataset(
                    f"{which}_eigenvalues",
                    data=np.asarray(getattr(layer, f"{which}_eigenvalues"), dtype=np.float64),
                )
                order = getattr(layer, f"{which}_order")
                vectors = getattr(layer, f"{which}_eigenvectors")
                if order is not None:
                    h.create_dataset(f"{which}_order", data=np.asarray(order, dtype=np.int64))
                if vectors is not None:  # with an order too: a blocks factor's (C, k, k) eigenvectors
                    h.create_dataset(f"{which}_eigenvectors", data=np.asarray(vectors, dtype=np.float64))
        f.flush()
        g.attrs["complete"] = np.bool_(True)


def is_ekfac_file(path: str) -> bool:
    """Whether ``path`` is an HDF5 file whose root says ``format = "curvlab.ekfac"``."""
    try:
        f, _ = hdf5.open_file(path, CheckpointError)
        with f:
            return "format" in f.attrs and hdf5.scalar(_attr(f.attrs, "format")) == EKFAC_FORMAT
    except (CurvlabError, OSError, ValueError, KeyError, RuntimeError):
        return False


def _attr(attrs: h5py.AttributeManager, key: str, default: Any = None) -> Any:
    """An attribute (size checked first, :func:`curvlab.io.hdf5.attribute`), or ``default``."""
    return hdf5.attribute(attrs, key, CheckpointError) if key in attrs else default


def _member(group: h5py.Group, name: str, at: str) -> Any:
    try:
        return hdf5.member(group, name, CheckpointError)
    except CheckpointError as exc:
        raise CheckpointError(f"{at}: {exc}") from None


def _dataset(h: h5py.Group, key: str, shape: tuple[int, ...], kind: str, at: str,
             budget: ReadBudget) -> np.ndarray:
    ds = _member(h, key, at)
    if not isinstance(ds, h5py.Dataset):
        raise CheckpointError(f"{at}: missing dataset {key}")
    if tuple(ds.shape or ()) != shape or ds.dtype.kind not in kind:
        raise CheckpointError(f"{at}: {key} has shape {ds.shape} and dtype {ds.dtype}, expected {shape}")
    try:
        arr = hdf5.read_array(ds, key, budget, CheckpointError)
    except CheckpointError as exc:
        raise CheckpointError(f"{at}: {exc}") from None
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise CheckpointError(f"{at}: {key} has non-finite values")
    return arr


def _basis(
    h: h5py.Group, which: str, size: int, at: str, budget: ReadBudget, block: int | None = None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(eigenvectors, order)`` of one side: dense ``(size, size)``, a permutation ``order``, or, with
    ``block = k`` (a blocks factor), ``(size / k, k, k)`` blocks and ``order`` (module docstring).
    Every dataset is read through :func:`_dataset` (declared shape and storage checked first)."""
    order = None
    if _member(h, f"{which}_order", at) is not None or block is not None:
        order = _dataset(h, f"{which}_order", (size,), "iu", at, budget).astype(np.int64)
        if not np.array_equal(np.sort(order), np.arange(size)):
            raise CheckpointError(f"{at}: {which}_order is not a permutation of 0..{size - 1}")
        if block is None:
            return None, order
        shape = (size // block, block, block)
    else:
        shape = (size, size)
    return _dataset(h, f"{which}_eigenvectors", shape, "f", at, budget).astype(np.float64), order


def read_ekfac(path: str, step: int | str = "latest") -> EKFACStep:
    """One complete step of an EKFAC file, validated (module docstring)."""
    from curvlab.io.checkpoint import expected_factor_sizes
    from curvlab.io.checkpoint.format import block_size

    f, budget = hdf5.open_file(path, CheckpointError)
    with f:
        try:
            fmt = hdf5.scalar(_attr(f.attrs, "format"))
            if fmt != EKFAC_FORMAT:
                raise CheckpointError(f"{path}: not an EKFAC file (format {fmt!r})")
            version = hdf5.scalar(_attr(f.attrs, "format_version"))
            if not isinstance(version, int) or not 1 <= version <= EKFAC_FORMAT_VERSION:
                raise CheckpointError(f"{path}: unsupported format_version {version!r}")
            steps = _member(f, "steps", path)
            if not isinstance(steps, h5py.Group):
                raise CheckpointError(f"{path}: missing /steps")
            groups = {k: _member(steps, k, where(path, k)) for k in steps if k.isdigit()}
            complete = sorted(
                int(k) for k, g in groups.items()
                if isinstance(g, h5py.Group) and bool(hdf5.scalar(_attr(g.attrs, "complete", False)))
            )
            if not complete:
                raise CheckpointError(f"{path}: holds no complete step")
            chosen = complete[-1] if step == "latest" else int(step)
            if chosen not in complete:
                raise CheckpointError(f"{path}: step {chosen}: no such complete step (has {complete})")
            g = groups[str(chosen)]
            layer_group = _member(g, "layers", where(path, chosen))
            if not isinstance(layer_group, h5py.Group):
                raise CheckpointError(f"{where(path, chosen)}: missing layers group")
            layers = {}
            for name in layer_group:
                at = where(path, chosen, name)
                h = _member(layer_group, name, at)
                if not isinstance(h, h5py.Group):
                    raise CheckpointError(f"{at}: is not a group")
                module_type = str(hdf5.scalar(_attr(h.attrs, "module_type")))
                weight_shape = tuple(int(v) for v in np.asarray(_attr(h.attrs, "weight_shape")).ravel())
                has_bias = bool(hdf5.scalar(_attr(h.attrs, "has_bias")))
                try:
                    n, m = expected_factor_sizes(module_type, weight_shape, has_bias)
                except CheckpointError as exc:
                    raise CheckpointError(f"{at}: {exc}") from None
                k = block_size(module_type, has_bias)
                if k is not None:  # a blocks A: C blocks of k x k, n = C·k directions on the A side
                    if version < 2:
                        raise CheckpointError(f"{at}: module_type {module_type} needs format_version 2")
                    n *= k
                values = _dataset(h, "eigenvalues", (m, n), "f", at, budget).astype(np.float64)
                if (values < 0).any():
                    raise CheckpointError(f"{at}: eigenvalues must be >= 0")
                s_vec, s_order = _basis(h, "S", m, at, budget)
                a_vec, a_order = _basis(h, "A", n, at, budget, k)
                layers[name] = EKFACLayer(
                    module_type,
                    weight_shape,
                    has_bias,
                    values,
                    _dataset(h, "S_eigenvalues", (m,), "f", at, budget).astype(np.float64),
                    _dataset(h, "A_eigenvalues", (n,), "f", at, budget).astype(np.float64),
                    s_vec,
                    s_order,
                    a_vec,
                    a_order,
                )
            return EKFACStep(
                chosen,
                str(hdf5.scalar(_attr(g.attrs, "fisher_type", ""))),
                int(hdf5.scalar(_attr(g.attrs, "num_examples", 0))),
                layers,
            )
        except (KeyError, OSError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{path}: cannot read EKFAC data ({' '.join(str(exc).split())})") from None
