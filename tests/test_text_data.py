"""Tests of the text sources of curvlab.io.data: ``text:PATH`` and the embedded ``pystdlib`` corpus.

Expected token lists and vocabularies are written out by hand (or counted independently with
``collections.Counter``), never produced by the code under test.
"""

from __future__ import annotations

import sysconfig
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from curvlab.errors import CurvlabError, DataError
from curvlab.io.data import (
    DEFAULT_SEQ_LEN,
    DEFAULT_VOCAB,
    PYSTDLIB_BYTES,
    UNK,
    build_vocabulary,
    is_python,
    iterate_batches,
    load_dataset,
    pystdlib_files,
    python_tokens,
    text_split_mask,
    word_tokens,
)
from curvlab.models.transformer import DEFAULTS as TRANSFORMER_DEFAULTS

PYTHON_SNIPPET = '''import os  # a comment

def f(x, y=2):
    """Doc."""
    if x:
        return [x,
                y]
    return None
'''
PYTHON_TOKENS = [
    "import", "os", "<newline>",
    "def", "f", "(", "x", ",", "y", "=", "2", ")", ":", "<newline>",
    "<indent>", '"""Doc."""', "<newline>",
    "if", "x", ":", "<newline>",
    "<indent>", "return", "[", "x", ",", "y", "]", "<newline>",
    "<dedent>", "return", "None", "<newline>",
    "<dedent>", "<eof>",
]  # fmt: skip


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def decode(dataset, row: torch.Tensor) -> list[str]:
    return [dataset.vocabulary[i] for i in row.tolist()]


# --------------------------------------------------------------------------- tokenizers


def test_python_tokens_by_hand() -> None:
    assert python_tokens(PYTHON_SNIPPET) == PYTHON_TOKENS


def test_python_tokens_reject_non_python() -> None:
    for text in ["it's a test\n", "cost: $5\n", "f(x\n", "  a\n b\n"]:
        with pytest.raises(ValueError, match="not Python"):
            python_tokens(text)
        assert not is_python(text)
    assert is_python(PYTHON_SNIPPET)
    assert not is_python("one two three\n")  # tokenizes, but does not parse: prose


def test_word_tokens_by_hand() -> None:
    text = "It's 3.5 km—naïve, über-cool!\n\tdone"
    assert word_tokens(text) == [
        "It", "'", "s", "3", ".", "5", "km", "—", "naïve", ",", "über", "-", "cool", "!", "done",
    ]  # fmt: skip


def test_vocabulary_order_and_cap() -> None:
    tokens = list("aaaabbbccde") + ["b"]
    # counts: a 4, b 4, c 2, d 1, e 1 -> ties by code point: a before b, d before e
    assert build_vocabulary(tokens, 100) == (UNK, "a", "b", "c", "d", "e")
    assert build_vocabulary(tokens, 4) == (UNK, "a", "b", "c")
    assert build_vocabulary(tokens, 2) == (UNK, "a")


def test_split_mask() -> None:
    mask = text_split_mask(25, "test")
    assert mask.nonzero()[0].tolist() == [9, 19]
    assert (text_split_mask(25, "train") == ~mask).all() and text_split_mask(25, "all").all()


# --------------------------------------------------------------------------- text:PATH


def test_text_python_file_sequences(tmp_path: Path) -> None:
    path = write(tmp_path, "prog.py", PYTHON_SNIPPET * 3)
    tokens = PYTHON_TOKENS[:-1] * 3 + ["<eof>"]  # one end of file: 103 tokens
    data = load_dataset(f"text:{path}", split="all", seq_len=4, vocab=1000)
    assert data.tokenizer == "python" and data.name == f"text:{path}"
    assert data.x.dtype == torch.int64 and data.y.dtype == torch.int64
    assert data.x.shape == (103 // 5, 4) and data.input_shape == (4,)
    # pieces of seq_len + 1 = 5 consecutive tokens: x = first 4, y = last 4 (shifted by one)
    for i in range(len(data)):
        assert decode(data, data.x[i]) == tokens[5 * i : 5 * i + 4]
        assert decode(data, data.y[i]) == tokens[5 * i + 1 : 5 * i + 5]
    assert torch.equal(data.x[:, 1:], data.y[:, :-1])
    # the vocabulary: <unk>, then the training tokens by count (sequences 0..8, 10..19 -> train)
    train_tokens = [t for i in range(20) if i % 10 != 9 for t in tokens[5 * i : 5 * i + 5]]
    counts = Counter(train_tokens)
    assert data.vocabulary[0] == UNK
    assert list(data.vocabulary[1:]) == sorted(counts, key=lambda t: (-counts[t], t))
    assert data.num_classes == len(data.vocabulary) == len(counts) + 1


def test_text_vocabulary_cap_and_unknown(tmp_path: Path) -> None:
    path = write(tmp_path, "words.txt", "the cat, the dog; the end? " * 5 + "zebra")
    data = load_dataset(f"text:{path}", split="all", seq_len=5, vocab=4)
    assert data.tokenizer == "words"
    # counts: the 15, "," 5, ";" 5, "?" 5, cat 5, dog 5, end 5, zebra 1 -> vocab 4 keeps 3 tokens
    assert data.vocabulary == (UNK, "the", ",", ";")
    assert data.num_classes == 4
    ids = torch.cat([data.x, data.y[:, -1:]], dim=1).flatten().tolist()
    words = word_tokens(path.read_text())
    expected = [data.vocabulary.index(w) if w in data.vocabulary else 0 for w in words[: len(ids)]]
    assert ids == expected and 0 in ids


def test_text_prose_falls_back_to_words(tmp_path: Path) -> None:
    path = write(tmp_path, "prose.txt", "Don't panic: it's only $5, (really).\n" * 4)
    data = load_dataset(f"text:{path}", split="all", seq_len=3, vocab=50)
    assert data.tokenizer == "words"
    expected = word_tokens(path.read_text())
    assert decode(data, data.x[0]) == expected[:3] and decode(data, data.y[0]) == expected[1:4]


def test_text_splits_disjoint_and_complete(tmp_path: Path) -> None:
    path = write(tmp_path, "long.txt", " ".join(f"w{i % 37}" for i in range(3000)))
    full = load_dataset(f"text:{path}", split="all", seq_len=7)
    train = load_dataset(f"text:{path}", split="train", seq_len=7)
    test = load_dataset(f"text:{path}", split="test", seq_len=7)
    assert len(full) == 3000 // 8 and len(train) + len(test) == len(full)
    index = torch.arange(len(full))
    assert torch.equal(test.x, full.x[index % 10 == 9]) and torch.equal(train.x, full.x[index % 10 != 9])
    assert torch.equal(test.y, full.y[index % 10 == 9])
    assert train.vocabulary == test.vocabulary == full.vocabulary
    assert load_dataset(f"text:{path}", split="train", seq_len=7, limit=5).x.equal(train.x[:5])


def test_test_only_tokens_are_unknown(tmp_path: Path) -> None:
    # 10 sequences of 2 tokens: the 10th (the test split) holds words never seen in training
    path = write(tmp_path, "t.txt", "a b " * 9 + "x y")
    test = load_dataset(f"text:{path}", split="test", seq_len=1)
    assert test.vocabulary == (UNK, "a", "b")
    assert test.x.tolist() == [[0]] and test.y.tolist() == [[0]]


def test_text_deterministic_and_bom(tmp_path: Path) -> None:
    path = write(tmp_path, "a.py", PYTHON_SNIPPET * 4)
    bom = write(tmp_path, "b.py", b"\xef\xbb\xbf" + (PYTHON_SNIPPET * 4).encode())
    first, second = (load_dataset(f"text:{p}", split="all", seq_len=6) for p in (path, path))
    with_bom = load_dataset(f"text:{bom}", split="all", seq_len=6)
    for other in (second, with_bom):
        assert torch.equal(first.x, other.x) and torch.equal(first.y, other.y)
        assert first.vocabulary == other.vocabulary


@pytest.mark.parametrize(
    ("content", "kwargs", "message"),
    [
        (b"\x80\x81 not utf-8", {}, r"not UTF-8 text \(invalid byte at offset 0\)"),
        ("one two three", {"seq_len": 3}, "3 token\\(s\\), too short for one sequence of seq_len \\+ 1 = 4"),
        ("", {}, r"1 token\(s\), too short"),  # an empty file is Python: one <eof> token
        ("a b", {"seq_len": 2}, r"2 token\(s\), too short"),
        ("a b c d", {"seq_len": 1, "split": "test"}, "the test split .* is empty"),
        ("a b c d", {"vocab": 1}, "vocab must be an integer >= 2"),
        ("a b c d", {"seq_len": 0}, "seq_len must be an integer >= 1"),
        ("a b c d", {"seq_len": 2.0}, "seq_len must be an integer >= 1"),
    ],
)
def test_text_errors(tmp_path: Path, content: str | bytes, kwargs: dict, message: str) -> None:
    path = write(tmp_path, "bad.txt", content)
    with pytest.raises(DataError, match=message) as info:
        load_dataset(f"text:{path}", **kwargs)
    text = str(info.value)
    assert isinstance(info.value, CurvlabError) and "\n" not in text
    assert "bad.txt" in text


def test_text_missing_file_and_bad_spec(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.txt: text file not found"):
        load_dataset(f"text:{tmp_path / 'nope.txt'}")
    with pytest.raises(DataError, match="is a folder, not a text file"):
        load_dataset(f"text:{tmp_path}")
    for spec in ("text:", "text", "pystdlib:x"):
        with pytest.raises(DataError, match="unknown data source"):
            load_dataset(spec)


def test_text_input_is_not_modified(tmp_path: Path) -> None:
    path = write(tmp_path, "keep.py", PYTHON_SNIPPET * 2)
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    load_dataset(f"text:{path}", seq_len=3)
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.py"]  # nothing cached on disk


# --------------------------------------------------------------------------- pystdlib


def test_pystdlib_files_sorted_bounded_and_stdlib_only() -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = pystdlib_files()
    assert files == pystdlib_files()
    keys = [p.relative_to(root).parts for p in files]
    assert keys == sorted(keys)
    assert not any({"site-packages", "test", "tests"} & set(k[:-1]) for k in keys)
    sizes = [p.stat().st_size for p in files]
    assert sum(sizes) >= PYSTDLIB_BYTES and sum(sizes[:-1]) < PYSTDLIB_BYTES
    assert keys[0] == ("__future__.py",)


def test_pystdlib_defaults_and_determinism() -> None:
    start = time.perf_counter()
    data = load_dataset("pystdlib")
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0  # about 1 s measured on 2 cores; generous for a loaded test machine
    assert data.tokenizer == "python" and data.name == "pystdlib"
    assert data.input_shape == (DEFAULT_SEQ_LEN,) and data.num_classes == DEFAULT_VOCAB
    assert data.x.dtype == torch.int64 and int(data.x.max()) < DEFAULT_VOCAB
    assert torch.equal(data.x[:, 1:], data.y[:, :-1])
    assert data.vocabulary[0] == UNK and "<newline>" in data.vocabulary and "def" in data.vocabulary
    assert len(data) > 5000
    again = load_dataset("pystdlib")
    assert torch.equal(data.x, again.x) and data.vocabulary == again.vocabulary
    small = load_dataset("pystdlib", split="test", vocab=64, seq_len=16, limit=10)
    assert small.x.shape == (10, 16) and small.num_classes == 64 and int(small.x.max()) < 64
    assert small.vocabulary == build_vocabulary_of_train(small)


def build_vocabulary_of_train(dataset) -> tuple[str, ...]:
    """The vocabulary recomputed from the token strings of the ``train`` pieces (independent count)."""
    from curvlab.io.data.text import _pystdlib_tokens

    _, tokens = _pystdlib_tokens()
    piece = dataset.x.shape[1] + 1
    count = len(tokens) // piece
    train = [t for i in range(count) if i % 10 != 9 for t in tokens[i * piece : (i + 1) * piece]]
    counts = Counter(train)
    ranked = sorted(counts, key=lambda t: (-counts[t], t))
    return (UNK, *ranked[: dataset.num_classes - 1])


def test_defaults_match_the_transformer() -> None:
    assert (
        DEFAULT_VOCAB == TRANSFORMER_DEFAULTS["vocab"] and DEFAULT_SEQ_LEN == TRANSFORMER_DEFAULTS["seq_len"]
    )


def test_text_batches_and_image_sources_unchanged() -> None:
    data = load_dataset("pystdlib", limit=10, seq_len=8, vocab=100)
    batches = list(iterate_batches(data, 4))
    assert [b[0].shape for b in batches] == [(4, 8), (4, 8), (2, 8)]
    digits = load_dataset("digits", limit=4, vocab=10, seq_len=3)  # text options ignored
    assert digits.input_shape == (1, 8, 8) and digits.vocabulary is None and digits.tokenizer is None
