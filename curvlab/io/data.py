"""Data: the embedded ``digits`` images, CIFAR-10 folders, ``.npz`` files and token sequences of text.

A data set is named by a *spec* string (``--data`` on the command line, :data:`DATA_SOURCES`):

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes, no
  download), as ``(N, 1, 8, 8)``; pixels ``/16`` then standardised with the fixed
  :data:`DIGITS_MEAN` / :data:`DIGITS_STD`. Split rule: image ``i`` (in scikit-learn's order) is in
  ``test`` when ``i % 5 == 4`` (359 images), else in ``train`` (1,438 images).
* ``cifar10:PATH``: a CIFAR-10 folder (``PATH`` is the folder with the batch files, or its parent
  holding ``cifar-10-batches-py/`` or ``cifar-10-batches-bin/``), in the binary layout
  (``data_batch_{1..5}.bin``, ``test_batch.bin``) or the python-pickle layout
  (``data_batch_{1..5}``, ``test_batch``), the latter read through a restricted unpickler
  that can only rebuild numpy uint8 arrays. Pixels ``/255`` then standardised per channel with
  :data:`CIFAR10_MEAN` / :data:`CIFAR10_STD`.
* ``npz:PATH``: an ``.npz`` with ``x`` (``(N, C, H, W)``, ``(N, H, W)`` -> C = 1, or ``(N, D)`` ->
  ``(N, 1, 1, D)``; float, or uint8 -> ``/255``; no further normalisation) and integer ``y``
  ``(N,)``; optional ``x_test``/``y_test`` (split ``test``) and a scalar ``num_classes``.
* ``pystdlib``: the embedded language-modelling corpus, the running Python's standard-library
  sources (the first :data:`PYSTDLIB_BYTES` bytes of ``.py`` files in sorted path order, tests and
  ``site-packages`` excluded), tokenised with :mod:`tokenize`.
* ``text:PATH``: any UTF-8 text file, tokenised like ``pystdlib`` if it parses as Python, else
  split into words and punctuation marks.

A text source becomes next-token prediction data: the tokens are mapped to ids with a vocabulary of
the ``vocab`` most frequent training tokens (``<unk>`` = id 0 included) and cut into consecutive,
non-overlapping pieces of ``seq_len + 1`` tokens; ``x`` is a piece's first ``seq_len`` ids and ``y``
its last ``seq_len`` (``y[t] = x[t + 1]``). Every 10th piece is in ``test``.

Splits are ``train``, ``test`` and ``all``; ``limit`` keeps the first ``limit`` examples of the
split. Every problem with a file raises :class:`~curvlab.errors.DataError` (one line naming the
file). See ``docs/data.md``.
"""

from __future__ import annotations

import ast
import functools
import io
import os
import pickle
import re
import sysconfig
import tokenize
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from curvlab.choices import DATA_SOURCES  # defined without torch, for the command line's --help
from curvlab.errors import DataError

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATA_SOURCES",
    "DEFAULT_SEQ_LEN",
    "DEFAULT_VOCAB",
    "DIGITS_MEAN",
    "DIGITS_STD",
    "PYSTDLIB_BYTES",
    "SOURCE_FORMS",
    "SPLITS",
    "UNK",
    "Dataset",
    "build_vocabulary",
    "is_python",
    "iterate_batches",
    "load_dataset",
    "pystdlib_files",
    "python_tokens",
    "text_split_mask",
    "word_tokens",
]

#: The data source forms, for error messages and listings.
SOURCE_FORMS: tuple[str, ...] = ("digits", "cifar10:PATH", "npz:PATH", "pystdlib", "text:PATH")
SPLITS: tuple[str, ...] = ("train", "test", "all")

#: Mean and standard deviation of the digits ``train`` split after ``/16`` (one channel).
DIGITS_MEAN = 0.3058
DIGITS_STD = 0.3764
#: Per-channel (R, G, B) mean and std of the 50,000 CIFAR-10 training images, pixels in [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

CIFAR10_CLASSES = 10
CIFAR10_RECORD = 1 + 3 * 32 * 32  # one label byte, then the R, G and B planes (32x32, row-major)
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = ("test_batch",)
CIFAR10_FOLDERS = ("cifar-10-batches-py", "cifar-10-batches-bin")


@dataclass(repr=False)
class Dataset:
    """A labelled data set held in memory.

    Images: ``x`` float32 ``(N, C, H, W)``, ``y`` int64 ``(N,)``. Text: ``x`` int64 token ids
    ``(N, seq_len)``, ``y`` int64 ``(N, seq_len)`` the next tokens, ``num_classes`` the vocabulary
    size, ``vocabulary`` the token strings by id and ``tokenizer`` ``"python"`` or ``"words"``.
    """

    x: Tensor
    y: Tensor
    num_classes: int
    name: str
    split: str = "all"
    vocabulary: tuple[str, ...] | None = None
    tokenizer: str | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one example: ``(C, H, W)`` for images, ``(seq_len,)`` for text."""
        return tuple(int(v) for v in self.x.shape[1:])

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})"
        )


# --------------------------------------------------------------------------- entry points


def load_dataset(
    spec: str,
    *,
    split: str = "train",
    limit: int | None = None,
    vocab: int | None = None,
    seq_len: int | None = None,
) -> Dataset:
    """Load the data set named by ``spec`` (see :data:`DATA_SOURCES`), one ``split`` of it.

    ``split`` is ``"train"``, ``"test"`` or ``"all"``; ``limit`` keeps the first ``limit`` examples
    (deterministic). ``vocab`` (the vocabulary cap, ``<unk>`` included, default
    :data:`DEFAULT_VOCAB`) and ``seq_len`` (default :data:`DEFAULT_SEQ_LEN`) shape the text sources
    and are ignored by the image sources. Raises :class:`DataError` for an unknown source or a bad
    file.
    """
    if split not in SPLITS:
        raise DataError(f"{spec}: unknown split {split!r} (valid splits: {', '.join(SPLITS)})")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"{spec}: limit must be a positive integer, got {limit!r}")
    source, sep, path = spec.partition(":")
    if source == "digits" and not sep:
        dataset = _load_digits(split)
    elif source == "cifar10" and path:
        dataset = _load_cifar10(Path(path).expanduser(), split)
    elif source == "npz" and path:
        dataset = _load_npz(Path(path).expanduser(), split)
    elif source == "pystdlib" and not sep:
        options = _text_options(spec, vocab, seq_len)
        root, tokens = _pystdlib_tokens()
        dataset = _token_dataset(tokens, str(root), split, *options, tokenizer="python")
    elif source == "text" and path:
        options = _text_options(spec, vocab, seq_len)
        dataset = _load_text(Path(path).expanduser(), split, *options)
    else:
        valid = ", ".join(SOURCE_FORMS)
        raise DataError(f"unknown data source {spec!r} (valid sources: {valid})")
    dataset.name = spec
    if limit is not None and limit < len(dataset):
        # clone: a view would keep the whole split alive
        dataset.x, dataset.y = dataset.x[:limit].clone(), dataset.y[:limit].clone()
    return dataset


def iterate_batches(
    dataset: Dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(x, y)`` batches covering every example once; the last batch may be smaller.

    Without ``shuffle`` the batches follow the data set's order; with it the order is
    ``torch.randperm`` under a CPU generator seeded with ``seed`` (the same seed, the same order).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(
            f"{dataset.name}: batch size must be a positive integer, got {batch_size!r}"
        )
    n = len(dataset)
    order = None
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    for start in range(0, n, batch_size):
        if order is None:
            yield dataset.x[start : start + batch_size], dataset.y[start : start + batch_size]
        else:
            index = order[start : start + batch_size]
            yield dataset.x[index], dataset.y[index]


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


def _read_cifar_bin(file: Path) -> tuple[np.ndarray, np.ndarray]:
    """One binary batch: records of 1 label byte + 3072 pixel bytes (R, G, B planes, 32x32)."""
    raw = np.fromfile(file, dtype=np.uint8)
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
    """Unpickle ``file`` with :class:`RestrictedUnpickler` (``encoding="bytes"``: Python 2 str)."""
    try:
        with open(file, "rb") as handle:
            return RestrictedUnpickler(handle, encoding="bytes").load()
    except OSError as exc:
        raise DataError(f"{file}: cannot read ({exc.strerror or exc})") from exc
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


def _describe(value: Any) -> str:
    """Short description of a value for an error message."""
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    return type(value).__name__


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


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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


# --------------------------------------------------------------------------- text

#: Default vocabulary cap and sequence length of the text sources (= ``transformer_shallow``'s).
DEFAULT_VOCAB = 2048
DEFAULT_SEQ_LEN = 32
#: ``pystdlib`` reads standard-library files in sorted order until it holds this many bytes.
PYSTDLIB_BYTES = 2_000_000
#: Folder names under the standard library that ``pystdlib`` skips.
PYSTDLIB_SKIP = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
#: Every ``TEXT_TEST_EVERY``-th sequence (index ``i % 10 == 9``) is in the ``test`` split.
TEXT_TEST_EVERY = 10
#: The out-of-vocabulary token, id 0.
UNK = "<unk>"
#: How :func:`python_tokens` writes the layout tokens of :mod:`tokenize` (``<`` is always a token
#: of its own in both tokenizers, so these strings can never come from the text itself).
_LAYOUT_TOKENS = {
    tokenize.NEWLINE: "<newline>",
    tokenize.INDENT: "<indent>",
    tokenize.DEDENT: "<dedent>",
    tokenize.ENDMARKER: "<eof>",
}
_DROPPED_TOKENS = frozenset({tokenize.ENCODING, tokenize.COMMENT, tokenize.NL})
_WORD = re.compile(r"\w+|[^\w\s]")


class _NotPython(Exception):
    """:mod:`tokenize` rejected the text."""


def python_tokens(text: str) -> list[str]:
    """The Python tokens of ``text`` as strings, raising ``ValueError`` if it does not tokenize.

    Names, operators, numbers and strings (f-string parts too) are kept as written; logical line
    ends, indents, dedents and the end of the text become ``<newline>``, ``<indent>``, ``<dedent>``,
    ``<eof>``; comments and non-logical line breaks (inside brackets, blank lines) are dropped. Text
    that :mod:`tokenize` rejects, or on which it reports an error token (e.g. an unmatched quote or
    a ``$``), is not Python.
    """
    out = []
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type == tokenize.ERRORTOKEN:
                raise _NotPython(f"line {token.start[0]}: unexpected {token.string!r}")
            if token.type in _DROPPED_TOKENS:
                continue
            out.append(_LAYOUT_TOKENS.get(token.type, token.string))
    except _NotPython as exc:
        raise ValueError(f"not Python: {exc}") from None
    except Exception as exc:  # TokenError, IndentationError, ...: whatever tokenize rejects
        raise ValueError(f"not Python: {_first_line(exc)}") from None
    return out


def word_tokens(text: str) -> list[str]:
    """Words (maximal runs of Unicode word characters) and single punctuation marks; no whitespace."""
    return _WORD.findall(text)


def build_vocabulary(tokens: Sequence[str], vocab: int) -> tuple[str, ...]:
    """``<unk>`` then the ``vocab - 1`` most frequent tokens, ties broken by code-point order."""
    counts = Counter(tokens)
    ranked = sorted(counts, key=lambda token: (-counts[token], token))
    return (UNK, *ranked[: vocab - 1])


def text_split_mask(num_sequences: int, split: str) -> np.ndarray:
    """Boolean mask of the sequences in ``split``: ``test`` is every 10th (``i % 10 == 9``)."""
    test = np.arange(num_sequences) % TEXT_TEST_EVERY == TEXT_TEST_EVERY - 1
    if split == "test":
        return test
    if split == "train":
        return ~test
    return np.ones(num_sequences, dtype=bool)


def _text_options(spec: str, vocab: int | None, seq_len: int | None) -> tuple[int, int]:
    """``(vocab, seq_len)`` with defaults, checked: ``vocab >= 2``, ``seq_len >= 1``."""
    vocab = DEFAULT_VOCAB if vocab is None else vocab
    seq_len = DEFAULT_SEQ_LEN if seq_len is None else seq_len
    for key, value, least in (("vocab", vocab, 2), ("seq_len", seq_len, 1)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < least:
            raise DataError(f"{spec}: {key} must be an integer >= {least}, got {value!r}")
    return int(vocab), int(seq_len)


def _token_dataset(
    tokens: Sequence[str], where: str, split: str, vocab: int, seq_len: int, *, tokenizer: str
) -> Dataset:
    """Cut ``tokens`` into pieces of ``seq_len + 1``, build the vocabulary on ``train``, encode."""
    piece = seq_len + 1
    count = len(tokens) // piece
    if count == 0:
        raise DataError(
            f"{where}: {len(tokens)} token(s), too short for one sequence of seq_len + 1 = {piece} tokens"
        )
    mask = text_split_mask(count, split)
    if not mask.any():
        raise DataError(
            f"{where}: {count} sequences of {piece} tokens, so the {split} split (every "
            f"{TEXT_TEST_EVERY}th sequence) is empty; use a longer text or a smaller seq_len"
        )
    train = text_split_mask(count, "train")
    train_tokens = [t for i in np.flatnonzero(train) for t in tokens[i * piece : (i + 1) * piece]]
    vocabulary = build_vocabulary(train_tokens, vocab)
    ids = {token: i for i, token in enumerate(vocabulary)}
    chosen = [t for i in np.flatnonzero(mask) for t in tokens[i * piece : (i + 1) * piece]]
    encoded = np.fromiter((ids.get(t, 0) for t in chosen), dtype=np.int64, count=len(chosen))
    pieces = torch.from_numpy(encoded.reshape(-1, piece))
    return Dataset(
        x=pieces[:, :-1].contiguous(),
        y=pieces[:, 1:].contiguous(),
        num_classes=len(vocabulary),
        name="text",
        split=split,
        vocabulary=vocabulary,
        tokenizer=tokenizer,
    )


def is_python(text: str) -> bool:
    """True if ``text`` parses as a Python module (:func:`ast.parse`) and :func:`python_tokens` takes it."""
    try:
        ast.parse(text)
        python_tokens(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


def _load_text(path: Path, split: str, vocab: int, seq_len: int) -> Dataset:
    """A UTF-8 text file: Python tokens if it is Python (:func:`is_python`), else :func:`word_tokens`."""
    if not path.is_file():
        raise DataError(f"{path}: text file not found")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from None
    text = text.removeprefix("\ufeff")  # a byte-order mark is not text
    if is_python(text):
        tokens, tokenizer = python_tokens(text), "python"
    else:
        tokens, tokenizer = word_tokens(text), "words"
    return _token_dataset(tokens, str(path), split, vocab, seq_len, tokenizer=tokenizer)


def pystdlib_files(root: Path | None = None) -> list[Path]:
    """The ``.py`` files that make up ``pystdlib``, in order (sorted by path components).

    Files under ``site-packages``, ``dist-packages`` and test folders, and the machine-specific
    ``_sysconfigdata*`` modules, are skipped; the list stops at the file that brings the total size
    to :data:`PYSTDLIB_BYTES` (files that do not tokenize are skipped when read).
    """
    root = _stdlib_root() if root is None else root
    candidates = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in PYSTDLIB_SKIP]  # prune the walk
        candidates += [
            Path(folder, name)
            for name in names
            if name.endswith(".py") and not name.startswith("_sysconfigdata")
        ]
    candidates.sort(key=lambda p: p.relative_to(root).parts)
    chosen, total = [], 0
    for path in candidates:
        if total >= PYSTDLIB_BYTES:
            break
        chosen.append(path)
        total += path.stat().st_size
    return chosen


def _stdlib_root() -> Path:
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"{root}: the Python standard library folder does not exist (pystdlib)")
    return root


@functools.lru_cache(maxsize=1)
def _pystdlib_tokens() -> tuple[Path, tuple[str, ...]]:
    """The standard library folder and the tokens of :func:`pystdlib_files`, read once per process.

    Each file is decoded as :mod:`tokenize` does (its coding cookie, else UTF-8); a file that does
    not decode or tokenize is skipped.
    """
    root = _stdlib_root()
    tokens: list[str] = []
    for path in pystdlib_files(root):
        try:
            with open(path, "rb") as handle:
                encoding, _ = tokenize.detect_encoding(handle.readline)
                handle.seek(0)
                text = handle.read().decode(encoding)
            tokens.extend(python_tokens(text))
        except (OSError, SyntaxError, UnicodeDecodeError, LookupError, ValueError):
            continue
    if not tokens:
        raise DataError(f"{root}: no readable .py files in the Python standard library (pystdlib)")
    return root, tuple(tokens)
