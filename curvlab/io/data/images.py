"""The image sources held in arrays: the embedded ``digits`` set and the user's ``.npz`` files.

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes, no
  download), as ``(N, 1, 8, 8)``; pixels ``/16`` then standardised with the fixed
  :data:`DIGITS_MEAN` / :data:`DIGITS_STD`, ``x = (pixel/16 − DIGITS_MEAN) / DIGITS_STD``. Split rule:
  image ``i`` (in scikit-learn's order) is in ``test`` when ``i % 5 == 4`` (359 images), else in
  ``train`` (1,438 images).
* ``npz:PATH``: an ``.npz`` with ``x`` (``(N, C, H, W)``, ``(N, H, W)`` -> C = 1, or ``(N, D)`` ->
  ``(N, 1, 1, D)``; float, or uint8 -> ``/255``; no further normalisation) and integer ``y``
  ``(N,)``; optional ``x_test``/``y_test`` (split ``test``) and a scalar ``num_classes`` (default
  ``1 +`` the largest label of ``y`` and ``y_test``). Read with ``allow_pickle=False``.

CIFAR-10 folders have their own module (:mod:`curvlab.io.data.cifar10`). See ``docs/data.md``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from curvlab.errors import DataError
from curvlab.io.data.dataset import Dataset, _describe, _first_line

#: Mean and standard deviation of the digits ``train`` split after ``/16`` (one channel).
DIGITS_MEAN = 0.3058
DIGITS_STD = 0.3764


# --------------------------------------------------------------------------- digits


def digits_split_mask(n: int, split: str) -> np.ndarray:
    """Boolean mask of the digits images in ``split``: ``test`` is every fifth (``i % 5 == 4``)."""
    test = np.arange(n) % 5 == 4
    if split == "test":
        return test
    if split == "train":
        return ~test
    return np.ones(n, dtype=bool)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The raw digits images ``(1797, 8, 8)`` (values 0..16) and labels, read once per process."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images, labels = bunch.images.astype(np.float32), bunch.target.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _load_digits(split: str) -> Dataset:
    """scikit-learn's bundled digits as ``(N, 1, 8, 8)``, ``/16`` and standardised."""
    images, labels = _digits_arrays()
    mask = digits_split_mask(len(labels), split)
    x = (torch.from_numpy(images[mask]).unsqueeze(1) / 16.0 - DIGITS_MEAN) / DIGITS_STD
    y = torch.from_numpy(labels[mask].copy())
    return Dataset(x=x.contiguous(), y=y, num_classes=10, name="digits", split=split)


# --------------------------------------------------------------------------- npz


def _load_npz(path: Path, split: str) -> Dataset:
    """An ``.npz`` file: ``x``/``y`` (``train``, ``all``), ``x_test``/``y_test`` (``test``)."""
    if not path.is_file():
        raise DataError(f"{path}: npz file not found")
    arrays = _read_npz(path)
    x_key, y_key = ("x_test", "y_test") if split == "test" else ("x", "y")
    missing = [key for key in (x_key, y_key) if key not in arrays]
    if missing:
        raise DataError(f"{path}: missing array(s) {', '.join(missing)} (found {sorted(arrays)})")
    x = _npz_images(path, x_key, arrays[x_key])
    y = _npz_labels(path, y_key, arrays[y_key])
    if y.shape[0] != x.shape[0]:
        raise DataError(f"{path}: {x_key} has {x.shape[0]} examples but {y_key} has {y.shape[0]}")
    num_classes = _npz_num_classes(path, arrays)
    return Dataset(x=x, y=torch.from_numpy(y), num_classes=num_classes, name="npz", split=split)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` archive, read with ``allow_pickle=False``."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:  # not a zip/npy file, a pickle, unreadable, ...
        raise DataError(f"{path}: cannot read npz: {_first_line(exc)}") from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: not an .npz archive (a single .npy array?)")
    try:
        with loaded:
            return {key: loaded[key] for key in loaded.files}
    except Exception as exc:  # an object (pickled) array, a corrupt member, ...
        raise DataError(f"{path}: cannot read npz: {_first_line(exc)}") from exc


def _npz_images(path: Path, key: str, x: np.ndarray) -> Tensor:
    """``x`` as float32 ``(N, C, H, W)``; ``(N, H, W)``: C = 1; ``(N, D)``: ``(N, 1, 1, D)``."""
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    else:
        raise DataError(f"{path}: {key} must be a float or uint8 array, got {x.dtype}")
    if x.ndim == 2:
        x = x[:, None, None, :]
    elif x.ndim == 3:
        x = x[:, None, :, :]
    elif x.ndim != 4:
        raise DataError(f"{path}: {key} must be (N, C, H, W), (N, H, W) or (N, D), got {x.shape}")
    if x.shape[0] == 0 or 0 in x.shape[1:]:
        raise DataError(f"{path}: {key} is empty (shape {x.shape})")
    if not np.isfinite(x).all():
        raise DataError(f"{path}: {key} contains NaN or infinite values")
    return torch.from_numpy(np.ascontiguousarray(x))


def _npz_labels(path: Path, key: str, y: np.ndarray) -> np.ndarray:
    """``y`` as int64 ``(N,)``: integer dtype, non-negative."""
    if not np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
        raise DataError(f"{path}: {key} must hold integer labels, got {y.dtype}")
    if y.ndim != 1:
        raise DataError(f"{path}: {key} must have shape (N,), got {y.shape}")
    if y.size and y.min() < 0:
        raise DataError(f"{path}: {key} has negative label {int(y.min())}")
    return y.astype(np.int64)


def _npz_num_classes(path: Path, arrays: dict[str, np.ndarray]) -> int:
    """The ``num_classes`` scalar if present, else 1 + the largest label of ``y`` and ``y_test``."""
    largest = max(
        int(arrays[key].max()) for key in ("y", "y_test") if key in arrays and arrays[key].size
    )
    if "num_classes" not in arrays:
        return largest + 1
    value = arrays["num_classes"]
    if value.ndim != 0 or not np.issubdtype(value.dtype, np.integer):
        raise DataError(f"{path}: num_classes must be an integer scalar, got {_describe(value)}")
    if int(value) <= largest:
        raise DataError(f"{path}: num_classes = {int(value)} but the largest label is {largest}")
    return int(value)
