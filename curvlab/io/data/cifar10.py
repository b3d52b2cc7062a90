"""The ``cifar10:PATH`` source: a CIFAR-10 folder in the binary or the python-pickle layout, the latter
read through a restricted unpickler.

``PATH`` is the folder with the batch files, or its parent holding ``cifar-10-batches-py/`` or
``cifar-10-batches-bin/``, in the binary layout (``data_batch_{1..5}.bin``, ``test_batch.bin``: records
of one label byte and the R, G, B planes, 32x32) or the python-pickle layout (``data_batch_{1..5}``,
``test_batch``), the latter read through a restricted unpickler (:class:`RestrictedUnpickler`) that can
only rebuild numpy uint8 arrays. ``train`` = the five data batches, ``test`` = the test batch. Pixels
``/255`` then standardised per channel with :data:`CIFAR10_MEAN` / :data:`CIFAR10_STD`:
``x = (pixel/255 − mean_c) / std_c``. See ``docs/data.md``.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from curvlab.errors import DataError
from curvlab.io.data.dataset import Dataset, _describe, _first_line
from curvlab.limits import check_regular_file, check_size, format_bytes

#: Per-channel (R, G, B) mean and std of the 50,000 CIFAR-10 training images, pixels in [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

CIFAR10_CLASSES = 10
CIFAR10_RECORD = 1 + 3 * 32 * 32  # one label byte, then the R, G and B planes (32x32, row-major)
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = ("test_batch",)
CIFAR10_FOLDERS = ("cifar-10-batches-py", "cifar-10-batches-bin")


# --------------------------------------------------------------------------- CIFAR-10


def _cifar_folder(path: Path) -> tuple[Path, str]:
    """The folder holding the batches and its layout, ``"bin"`` or ``"py"``.

    ``path`` itself is tried first, then its ``cifar-10-batches-py/`` and ``cifar-10-batches-bin/``
    subfolders; in one folder the binary layout wins over the pickle layout.
    """
    if not path.is_dir():
        raise DataError(f"{path}: CIFAR-10 folder not found")
    for folder in (path, *(path / name for name in CIFAR10_FOLDERS)):
        names = CIFAR10_TRAIN + CIFAR10_TEST
        if any((folder / f"{name}.bin").is_file() for name in names):
            return folder, "bin"
        if any((folder / name).is_file() for name in names):
            return folder, "py"
    raise DataError(
        f"{path}: no CIFAR-10 batches found (looked for data_batch_1..5[.bin] and test_batch[.bin]"
        f" here and in {' and '.join(CIFAR10_FOLDERS)}/)"
    )


def _load_cifar10(path: Path, split: str) -> Dataset:
    """A CIFAR-10 split: ``train`` = the five data batches, ``test`` = the test batch."""
    folder, layout = _cifar_folder(path)
    names = {"train": CIFAR10_TRAIN, "test": CIFAR10_TEST, "all": CIFAR10_TRAIN + CIFAR10_TEST}
    reader = _read_cifar_bin if layout == "bin" else _read_cifar_pickle
    suffix = ".bin" if layout == "bin" else ""
    pixels, labels = [], []
    for name in names[split]:
        file = folder / f"{name}{suffix}"
        if not file.is_file():
            raise DataError(f"{file}: CIFAR-10 batch missing")
        batch_pixels, batch_labels = reader(file)
        pixels.append(batch_pixels)
        labels.append(batch_labels)
    x = _standardise_cifar(np.concatenate(pixels))
    y = torch.from_numpy(np.concatenate(labels).astype(np.int64))
    return Dataset(x=x, y=y, num_classes=CIFAR10_CLASSES, name="cifar10", split=split)


def _standardise_cifar(pixels: np.ndarray) -> Tensor:
    """uint8 ``(N, 3, 32, 32)`` -> float32: ``/255``, minus channel mean, over channel std."""
    x = torch.from_numpy(pixels).to(torch.float32).div_(255.0)
    mean = torch.tensor(CIFAR10_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def _check_labels(file: Path, labels: np.ndarray) -> None:
    """CIFAR-10 labels must lie in ``[0, 10)``."""
    if labels.size and (labels.min() < 0 or labels.max() >= CIFAR10_CLASSES):
        bad = labels[(labels < 0) | (labels >= CIFAR10_CLASSES)][0]
        raise DataError(f"{file}: label {int(bad)} out of range 0..{CIFAR10_CLASSES - 1}")


def _read_bytes(file: Path) -> bytes:
    """A batch file's bytes, after checking it is a regular file whose images fit the memory budget
    as float32 (4 bytes a pixel)."""
    size = check_regular_file(str(file), DataError, "CIFAR-10 batch")
    check_size(f"{file}: the images of a {format_bytes(size)} batch as float32", 4 * size, DataError)
    try:
        return file.read_bytes()
    except OSError as exc:
        raise DataError(f"{file}: cannot read ({exc.strerror or exc})") from exc


def _read_cifar_bin(file: Path) -> tuple[np.ndarray, np.ndarray]:
    """One binary batch: records of 1 label byte + 3072 pixel bytes (R, G, B planes, 32x32)."""
    raw = np.frombuffer(_read_bytes(file), dtype=np.uint8)
    if raw.size == 0 or raw.size % CIFAR10_RECORD:
        raise DataError(
            f"{file}: size {raw.size} bytes is not a positive multiple of the {CIFAR10_RECORD}-byte"
            " CIFAR-10 record (truncated?)"
        )
    records = raw.reshape(-1, CIFAR10_RECORD)
    labels = records[:, 0]
    _check_labels(file, labels)
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


_LATIN1_NAMES = frozenset({"latin1", "latin_1", "iso8859_1", "iso_8859_1", "l1"})


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes: latin-1 only, nothing else.

    The encoding name is compared with a fixed list (no codec lookup, which could import modules).
    """
    name = encoding.lower().replace("-", "_") if isinstance(encoding, str) else None
    if not isinstance(text, str) or name not in _LATIN1_NAMES:
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin-1")


def _numpy_reconstruct() -> Any:
    """``numpy``'s ``_reconstruct`` (moved to ``numpy._core`` in numpy 2, without the shim)."""
    core = getattr(np, "_core", None)
    if core is not None and hasattr(core, "multiarray"):
        return core.multiarray._reconstruct
    return np.core.multiarray._reconstruct  # pragma: no cover - numpy 1.x


_RECONSTRUCT_NAMES = (
    ("numpy.core.multiarray", "_reconstruct"),  # numpy 1.x and Python 2 pickles (real CIFAR-10)
    ("numpy._core.multiarray", "_reconstruct"),  # numpy 2.x
)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can only rebuild numpy arrays (what a CIFAR-10 python batch holds).

    The admitted globals are numpy's ``_reconstruct`` (under ``numpy.core.multiarray`` and
    ``numpy._core.multiarray``), ``numpy.ndarray``, ``numpy.dtype`` and ``_codecs.encode``
    restricted to latin-1 (how Python 3 writes bytes at protocol 2). Any other global raises
    :class:`pickle.UnpicklingError` ("refusing to unpickle global ..."); no other callable can run.
    """

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in _RECONSTRUCT_NAMES:
            return _numpy_reconstruct()
        if key == ("numpy", "ndarray"):
            return np.ndarray
        if key == ("numpy", "dtype"):
            return np.dtype
        if key == ("_codecs", "encode"):
            return _latin1_encode
        raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing a persistent id")


def restricted_load(file: Path) -> Any:
    """Unpickle ``file`` with :class:`RestrictedUnpickler` (``encoding="bytes"``: Python 2 str).

    The file is read into memory first (within the budget of :func:`_read_bytes`): a pickle opcode
    that declares a huge length then takes at most what the file holds, where reading it from the
    file object would allocate the declared length up front.
    """
    data = _read_bytes(file)
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # any malformed pickle: truncated, bad opcodes, refused globals
        message = _first_line(exc)
        raise DataError(f"{file}: not a readable CIFAR-10 python batch: {message}") from exc


def _entry(batch: dict, key: str) -> Any:
    """``batch[b"key"]`` (Python 2 pickles) or ``batch["key"]``, ``None`` if absent."""
    if key.encode() in batch:
        return batch[key.encode()]
    return batch.get(key)


def _read_cifar_pickle(file: Path) -> tuple[np.ndarray, np.ndarray]:
    """One python batch: a dict with ``b"data"`` (uint8 ``(n, 3072)``), ``b"labels"`` (n ints)."""
    batch = restricted_load(file)
    if not isinstance(batch, dict):
        raise DataError(f"{file}: expected a dict, found {type(batch).__name__}")
    data, labels = _entry(batch, "data"), _entry(batch, "labels")
    if data is None or labels is None:
        keys = sorted(k.decode("latin-1") if isinstance(k, bytes) else str(k) for k in batch)
        raise DataError(f"{file}: expected keys 'data' and 'labels', found {keys}")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(f"{file}: 'data' must be a uint8 array (n, 3072), got {_describe(data)}")
    if data.shape[1] != CIFAR10_RECORD - 1:
        raise DataError(f"{file}: 'data' must have shape (n, 3072), got {data.shape}")
    labels = _label_array(file, labels)
    if labels.shape[0] != data.shape[0]:
        raise DataError(f"{file}: {labels.shape[0]} labels for {data.shape[0]} images")
    _check_labels(file, labels)
    return np.ascontiguousarray(data).reshape(-1, 3, 32, 32), labels


def _label_array(file: Path, labels: Any) -> np.ndarray:
    """CIFAR-10 labels (a list of ints, or an integer array) as a 1-D int64 array."""
    if isinstance(labels, np.ndarray):
        array = labels
    elif isinstance(labels, list | tuple) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in labels
    ):
        array = np.array(labels, dtype=np.int64)
    else:
        raise DataError(f"{file}: 'labels' must be a list of ints, got {_describe(labels)}")
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{file}: 'labels' must be a 1-D integer array, got {_describe(array)}")
    return array.astype(np.int64)
