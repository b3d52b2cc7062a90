"""The image sources held in arrays: the embedded ``digits`` set and the user's ``.npz`` files.

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes, no
  download), as ``(N, 1, 8, 8)``; pixels ``/16`` then standardised with the fixed
  :data:`DIGITS_MEAN` / :data:`DIGITS_STD`, ``x = (pixel/16 − DIGITS_MEAN) / DIGITS_STD``. Split rule:
  image ``i`` (in scikit-learn's order) is in ``test`` when ``i % 5 == 4`` (359 images), else in
  ``train`` (1,438 images).
* ``npz:PATH``: an ``.npz`` with ``x`` (``(N, C, H, W)``, ``(N, H, W)`` -> C = 1, or ``(N, D)`` ->
  ``(N, 1, 1, D)``; float, or uint8 -> ``/255``; no further normalisation) and integer ``y``
  ``(N,)``; optional ``x_test``/``y_test`` (split ``test``) and a scalar ``num_classes`` (default
  ``1 +`` the largest label of ``y`` and ``y_test``, at most :data:`MAX_CLASSES`). Read member by
  member with ``allow_pickle=False``, each ``.npy`` header checked before its data is read: its size
  as float32 within the memory budget and at most ``MAX_EXPANSION`` times its compressed size
  (:mod:`curvlab.limits`).

CIFAR-10 folders have their own module (:mod:`curvlab.io.data.cifar10`). See ``docs/data.md``.
"""

from __future__ import annotations

import functools
import math
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from curvlab.errors import DataError
from curvlab.io.data.dataset import Dataset, _describe, _first_line
from curvlab.limits import MAX_EXPANSION, SMALL_ARRAY, check_regular_file, check_size, format_bytes

#: Largest number of classes of an ``.npz`` data set (its largest label + 1, or ``num_classes``): every
#: class is a logit of the model, a column of the classifier and, for ``exact``, a backward pass.
MAX_CLASSES = 1 << 20
#: The members of an ``.npz`` file that are read (others are ignored, unread).
NPZ_KEYS = ("x", "y", "x_test", "y_test", "num_classes")

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
    """The arrays :data:`NPZ_KEYS` of an ``.npz`` archive, each checked before it is read (module doc)."""
    check_regular_file(str(path), DataError, "npz file")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read npz: not an .npz archive ({_first_line(exc)})") from None
    arrays = {}
    try:
        with archive:
            for info in archive.infolist():
                key = info.filename.removesuffix(".npy")
                if key in NPZ_KEYS and info.filename.endswith(".npy") and key not in arrays:
                    arrays[key] = _read_member(path, archive, info, key)
    except DataError:
        raise
    except Exception as exc:  # a corrupt member, a bad CRC, a truncated stream, ...
        raise DataError(f"{path}: cannot read npz: {_first_line(exc)}") from None
    return arrays


def _read_member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, key: str) -> np.ndarray:
    """One ``.npy`` member: its header checked (numeric dtype, size within the budget) before its data."""
    with archive.open(info) as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
        else:
            raise DataError(f"{path}: {key}: unsupported .npy format version {version}")
    if dtype.hasobject or dtype.kind not in "biuf":
        raise DataError(f"{path}: cannot read npz: {key} has dtype {dtype} (numbers only: no pickles)")
    count = math.prod(shape)
    declared = count * dtype.itemsize
    check_size(f"{path}: {key} ({'x'.join(map(str, shape)) or 'scalar'} {dtype}) as float32",
               max(declared, 4 * count), DataError)
    if declared > SMALL_ARRAY and declared > MAX_EXPANSION * max(info.compress_size, 1):
        raise DataError(
            f"{path}: {key} declares {format_bytes(declared)} but stores {format_bytes(info.compress_size)} "
            f"compressed (more than {MAX_EXPANSION}x: a decompression bomb?)"
        )
    with archive.open(info) as handle:
        return np.lib.format.read_array(handle, allow_pickle=False)


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
    if y.size and int(y.max()) >= MAX_CLASSES:
        raise DataError(
            f"{path}: {key} has label {int(y.max())}: more than the {MAX_CLASSES} classes curvlab allows"
        )
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
    if int(value) > MAX_CLASSES:
        raise DataError(f"{path}: num_classes = {int(value)}, more than the {MAX_CLASSES} curvlab allows")
    return int(value)
