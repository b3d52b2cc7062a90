"""The text sources: ``pystdlib`` (the embedded corpus) and ``text:PATH``, tokenised and cut into
next-token prediction data.

* ``pystdlib``: the embedded language-modelling corpus, the running Python's standard-library
  sources (the first :data:`PYSTDLIB_BYTES` bytes of ``.py`` files in sorted path order, tests and
  ``site-packages`` excluded), tokenised with :mod:`tokenize` (:func:`python_tokens`).
* ``text:PATH``: any UTF-8 text file, tokenised like ``pystdlib`` if it parses as Python
  (:func:`is_python`), else split into words and punctuation marks (:func:`word_tokens`).

A text source becomes next-token prediction data: the tokens are mapped to ids with a vocabulary of
the ``vocab`` most frequent training tokens (``<unk>`` = id 0 included, :func:`build_vocabulary`) and
cut into consecutive, non-overlapping pieces of ``seq_len + 1`` tokens; ``x`` is a piece's first
``seq_len`` ids and ``y`` its last ``seq_len`` (``y[t] = x[t + 1]``). Every 10th piece is in ``test``
(:func:`text_split_mask`). See ``docs/data.md``.
"""

from __future__ import annotations

import ast
import functools
import io
import os
import re
import sysconfig
import tokenize
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from curvlab.errors import DataError
from curvlab.io.data.dataset import Dataset, _first_line
from curvlab.limits import check_regular_file, check_size, format_bytes

#: Default vocabulary cap and sequence length of the text sources (= ``transformer_shallow``'s).
DEFAULT_VOCAB = 2048
DEFAULT_SEQ_LEN = 32
#: ``pystdlib`` reads standard-library files in sorted order until it holds this many bytes.
PYSTDLIB_BYTES = 2_000_000
#: Folder names under the standard library that ``pystdlib`` skips.
PYSTDLIB_SKIP = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
#: Every ``TEXT_TEST_EVERY``-th sequence (index ``i % 10 == 9``) is in the ``test`` split.
TEXT_TEST_EVERY = 10
#: Memory per byte of a text file while it is tokenised, at most: one Python string per token (~50
#: bytes each, a token can be a single character) in the token list, its copies in the split and
#: the AST that :func:`is_python` builds.
TOKEN_BYTES = 64
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
    size = check_regular_file(str(path), DataError, "text file")
    check_size(f"{path}: tokenising {format_bytes(size)} of text (about {TOKEN_BYTES} bytes per character)",
               size * TOKEN_BYTES, DataError)
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
