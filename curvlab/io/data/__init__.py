"""Data: the embedded ``digits`` images, CIFAR-10 folders, ``.npz`` files and token sequences of text.

A data set is named by a *spec* string (``--data`` on the command line, :data:`DATA_SOURCES`), which
:func:`load_dataset` reads into a :class:`Dataset` held in memory (:mod:`curvlab.io.data.dataset`) and
:func:`iterate_batches` walks in batches. Each form of spec has its module:

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes, no download),
  and ``npz:PATH``: an ``.npz`` with ``x`` and integer ``y`` — :mod:`curvlab.io.data.images`;
* ``cifar10:PATH``: a CIFAR-10 folder (or its parent), binary or python-pickle batches, the latter
  read through a restricted unpickler — :mod:`curvlab.io.data.cifar10`;
* ``pystdlib``: the embedded language-modelling corpus (the running Python's standard-library
  sources), and ``text:PATH``: any UTF-8 text file, both as next-token prediction data —
  :mod:`curvlab.io.data.text`;
* ``PATH.py:FUNC`` / ``package.module:FUNC``: the user's own data factory —
  :func:`load_factory_data` (:mod:`curvlab.io.data.user`). It runs the user's code, so
  :func:`load_dataset` refuses such a spec (it may have been read from a file) and the caller who
  named it calls :func:`load_factory_data`.

Splits are ``train``, ``test`` and ``all``; ``limit`` keeps the first ``limit`` examples of the
split. Every problem with a file raises :class:`~curvlab.errors.DataError` (one line naming the
file). See ``docs/data.md``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from curvlab.choices import DATA_SOURCES  # noqa: F401  (defined without torch, for the command line's --help)
from curvlab.errors import DataError
from curvlab.io.data.cifar10 import CIFAR10_CLASSES as CIFAR10_CLASSES
from curvlab.io.data.cifar10 import CIFAR10_FOLDERS as CIFAR10_FOLDERS
from curvlab.io.data.cifar10 import CIFAR10_MEAN, CIFAR10_STD, _load_cifar10
from curvlab.io.data.cifar10 import CIFAR10_RECORD as CIFAR10_RECORD
from curvlab.io.data.cifar10 import CIFAR10_TEST as CIFAR10_TEST
from curvlab.io.data.cifar10 import CIFAR10_TRAIN as CIFAR10_TRAIN
from curvlab.io.data.cifar10 import RestrictedUnpickler as RestrictedUnpickler
from curvlab.io.data.cifar10 import restricted_load as restricted_load
from curvlab.io.data.dataset import Dataset
from curvlab.io.data.images import DIGITS_MEAN, DIGITS_STD, _load_digits, _load_npz
from curvlab.io.data.images import digits_split_mask as digits_split_mask
from curvlab.io.data.text import (
    DEFAULT_SEQ_LEN,
    DEFAULT_VOCAB,
    PYSTDLIB_BYTES,
    UNK,
    _load_text,
    _pystdlib_tokens,
    _text_options,
    _token_dataset,
    build_vocabulary,
    is_python,
    pystdlib_files,
    python_tokens,
    text_split_mask,
    word_tokens,
)
from curvlab.io.data.text import PYSTDLIB_SKIP as PYSTDLIB_SKIP
from curvlab.io.data.text import TEXT_TEST_EVERY as TEXT_TEST_EVERY
from curvlab.io.data.user import load_factory_data
from curvlab.usercode import is_data_factory_spec as data_factory_spec

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
    "data_factory_spec",
    "is_python",
    "iterate_batches",
    "load_dataset",
    "load_factory_data",
    "pystdlib_files",
    "python_tokens",
    "text_split_mask",
    "word_tokens",
]

#: The data source forms, for error messages and listings.
SOURCE_FORMS: tuple[str, ...] = ("digits", "cifar10:PATH", "npz:PATH", "pystdlib", "text:PATH")
SPLITS: tuple[str, ...] = ("train", "test", "all")


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
    elif data_factory_spec(spec):
        raise DataError(f"{spec}: a data factory (code): load it with curvlab.io.data.load_factory_data, "
                        "which only the caller who named it may call (docs/data.md, \"Own data\")")
    else:
        valid = ", ".join(SOURCE_FORMS)
        raise DataError(f"unknown data source {spec!r} (valid sources: {valid}, or PATH.py:FUNC)")
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
