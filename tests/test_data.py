"""Tests of curvlab.io.data: digits, CIFAR-10 (binary and python-pickle layouts), npz, batching.

The CIFAR-10 files are written here byte by byte in the documented layouts, with pixel offsets
computed independently of the loader's reshapes, so a transposed plane or a row/column swap fails.
"""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from curvlab.errors import CurvlabError, DataError
from curvlab.io.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DATA_SOURCES,
    DIGITS_MEAN,
    DIGITS_STD,
    SOURCE_FORMS,
    Dataset,
    RestrictedUnpickler,
    digits_split_mask,
    iterate_batches,
    load_dataset,
)

TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
PER_BATCH = 3  # images per small batch file


# --------------------------------------------------------------------------- digits


def test_digits_shapes_and_dtypes() -> None:
    train = load_dataset("digits")
    test = load_dataset("digits", split="test")
    full = load_dataset("digits", split="all")
    assert (len(train), len(test), len(full)) == (1438, 359, 1797)
    for ds in (train, test, full):
        assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
        assert ds.x.shape[1:] == (1, 8, 8) and ds.input_shape == (1, 8, 8)
        assert ds.num_classes == 10 and ds.name == "digits"
        assert int(ds.y.min()) == 0 and int(ds.y.max()) == 9
    assert train.split == "train" and "n=1438" in repr(train)


def test_digits_normalisation_constants() -> None:
    from sklearn.datasets import load_digits

    raw = load_digits().images / 16.0
    train_raw = raw[digits_split_mask(len(raw), "train")]
    assert abs(train_raw.mean() - DIGITS_MEAN) < 1e-4
    assert abs(train_raw.std() - DIGITS_STD) < 1e-4
    train = load_dataset("digits")
    assert abs(train.x.mean().item()) < 1e-3 and abs(train.x.std().item() - 1) < 1e-3
    expected = (torch.from_numpy(raw[0].astype(np.float32)) - DIGITS_MEAN) / DIGITS_STD
    assert torch.allclose(load_dataset("digits", split="all").x[0, 0], expected, atol=1e-6)


def test_digits_deterministic() -> None:
    a, b = load_dataset("digits"), load_dataset("digits")
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    a.x[0] += 1  # a caller's in-place edit does not leak into the next load
    assert torch.equal(load_dataset("digits").x, b.x)


def test_digits_splits_disjoint_and_complete() -> None:
    full = load_dataset("digits", split="all")
    train_mask = digits_split_mask(len(full), "train")
    test_mask = digits_split_mask(len(full), "test")
    assert not (train_mask & test_mask).any() and (train_mask | test_mask).all()
    assert np.flatnonzero(test_mask)[:3].tolist() == [4, 9, 14]
    train, test = load_dataset("digits"), load_dataset("digits", split="test")
    assert torch.equal(full.x[torch.from_numpy(train_mask)], train.x)
    assert torch.equal(full.y[torch.from_numpy(test_mask)], test.y)
    assert np.bincount(test.y.numpy()).min() >= 20  # every class is in the test split


def test_limit_takes_first_examples() -> None:
    train = load_dataset("digits")
    small = load_dataset("digits", limit=10)
    assert len(small) == 10 and torch.equal(small.x, train.x[:10])
    assert len(load_dataset("digits", split="test", limit=10_000)) == 359


@pytest.mark.parametrize(
    ("spec", "kwargs", "message"),
    [
        ("mnist", {}, "unknown data source"),
        ("digits:x", {}, "unknown data source"),
        ("cifar10:", {}, "unknown data source"),
        ("digits", {"split": "val"}, "unknown split"),
        ("digits", {"limit": 0}, "limit"),
        ("digits", {"limit": 2.5}, "limit"),
    ],
)
def test_bad_spec(spec: str, kwargs: dict, message: str) -> None:
    with pytest.raises(DataError, match=message) as info:
        load_dataset(spec, **kwargs)
    assert isinstance(info.value, CurvlabError) and "\n" not in str(info.value)
    if message == "unknown data source":
        assert all(source in str(info.value) for source in SOURCE_FORMS)
        assert all(source in DATA_SOURCES for source in SOURCE_FORMS)  # the --help line


# --------------------------------------------------------------------------- CIFAR-10 helpers


def pixel_value(image: int, channel: int, row: int, col: int) -> int:
    """The test pattern: a distinct-ish byte per (image, channel, row, col)."""
    return (image * 37 + channel * 101 + row * 7 + col * 3) % 256


def image_bytes(image: int) -> bytearray:
    """One image's 3072 bytes in the documented order: R plane, G plane, B plane, each row-major."""
    out = bytearray(3072)
    for channel in range(3):
        for row in range(32):
            for col in range(32):
                out[channel * 1024 + row * 32 + col] = pixel_value(image, channel, row, col)
    return out


def label_of(image: int) -> int:
    return (image * 3 + 1) % 10


def batch_images(batch: int) -> list[int]:
    """Global image numbers in batch ``batch`` (0..4 train, 5 test)."""
    return list(range(batch * PER_BATCH, (batch + 1) * PER_BATCH))


def write_cifar_bin(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for batch, name in enumerate([*TRAIN_BATCHES, "test_batch"]):
        records = bytearray()
        for image in batch_images(batch):
            records += bytes([label_of(image)]) + image_bytes(image)
        (folder / f"{name}.bin").write_bytes(bytes(records))


def batch_dict(batch: int) -> dict:
    images = batch_images(batch)
    data = np.frombuffer(b"".join(image_bytes(i) for i in images), dtype=np.uint8)
    return {
        b"batch_label": f"batch {batch}".encode(),
        b"labels": [label_of(i) for i in images],
        b"data": data.reshape(len(images), 3072).copy(),
        b"filenames": [f"img_{i}.png".encode() for i in images],
    }


# Python 2's cPickle at protocol 2, as the real cifar-10-batches-py files were written: py2 ``str``
# values are SHORT_BINSTRING/BINSTRING opcodes and numpy lives at ``numpy.core.multiarray``.


def _py2_str(value: bytes) -> bytes:
    if len(value) < 256:
        return b"U" + bytes([len(value)]) + value
    return b"T" + struct.pack("<i", len(value)) + value


def _py2_int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if 0 <= value < 65536:
        return b"M" + struct.pack("<H", value)
    return b"J" + struct.pack("<i", value)


def py2_pickle(batch: dict) -> bytes:
    """Hand-assembled Python-2-style protocol-2 pickle of a CIFAR-10 batch dict."""
    data: np.ndarray = batch[b"data"]
    n, width = data.shape
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\nq\x03cnumpy\nndarray\nq\x04"
        + _py2_int(0) + b"\x85" + _py2_str(b"b") + b"\x87Rq\x05("
        + _py2_int(1) + _py2_int(n) + _py2_int(width) + b"\x86"
        + b"cnumpy\ndtype\nq\x06" + _py2_str(b"u1") + _py2_int(0) + _py2_int(1) + b"\x87Rq\x07("
        + _py2_int(3) + _py2_str(b"|") + b"NNN" + struct.pack("<ci", b"J", -1)
        + struct.pack("<ci", b"J", -1) + _py2_int(0) + b"tb"
        + b"\x89" + _py2_str(data.tobytes()) + b"tb"
    )  # fmt: skip
    labels = b"]q\x08(" + b"".join(_py2_int(v) for v in batch[b"labels"]) + b"e"
    names = b"]q\x09(" + b"".join(_py2_str(v) for v in batch[b"filenames"]) + b"e"
    return (
        b"\x80\x02}q\x01("
        + _py2_str(b"data") + b"q\x02" + array
        + _py2_str(b"labels") + labels
        + _py2_str(b"batch_label") + _py2_str(batch[b"batch_label"])
        + _py2_str(b"filenames") + names
        + b"u."
    )  # fmt: skip


def write_cifar_py(folder: Path, style: str = "py3") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for batch, name in enumerate([*TRAIN_BATCHES, "test_batch"]):
        content = batch_dict(batch)
        blob = py2_pickle(content) if style == "py2" else pickle.dumps(content, protocol=2)
        (folder / name).write_bytes(blob)


def check_cifar(ds: Dataset, images: list[int]) -> None:
    """Every pixel and label of ``ds`` is the test pattern of ``images``, in order."""
    assert ds.x.shape == (len(images), 3, 32, 32) and ds.x.dtype == torch.float32
    assert ds.y.tolist() == [label_of(i) for i in images]
    assert ds.num_classes == 10 and ds.input_shape == (3, 32, 32)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    raw = torch.round((ds.x * std + mean) * 255).to(torch.int64)
    idx = torch.tensor(images).view(-1, 1, 1, 1)
    c = torch.arange(3).view(1, 3, 1, 1)
    r = torch.arange(32).view(1, 1, 32, 1)
    j = torch.arange(32).view(1, 1, 1, 32)
    assert torch.equal(raw, (idx * 37 + c * 101 + r * 7 + j * 3) % 256)
    # one known pixel, exactly as the documented normalisation computes it in float32
    k, channel, row, col = len(images) - 1, 2, 5, 17
    value = torch.tensor(pixel_value(images[k], channel, row, col), dtype=torch.float32)
    expected = (value / 255.0 - CIFAR10_MEAN[channel]) / CIFAR10_STD[channel]
    assert torch.allclose(ds.x[k, channel, row, col], expected, rtol=0, atol=1e-6)


TRAIN_IMAGES = list(range(5 * PER_BATCH))
TEST_IMAGES = batch_images(5)


# --------------------------------------------------------------------------- CIFAR-10 loading


@pytest.mark.parametrize("layout", ["bin", "py3", "py2"])
@pytest.mark.parametrize("use_parent", [False, True])
def test_cifar_layouts_reproduce_pixels(tmp_path: Path, layout: str, use_parent: bool) -> None:
    sub = "cifar-10-batches-bin" if layout == "bin" else "cifar-10-batches-py"
    folder = tmp_path / sub
    if layout == "bin":
        write_cifar_bin(folder)
    else:
        write_cifar_py(folder, style=layout)
    spec = f"cifar10:{tmp_path if use_parent else folder}"
    check_cifar(load_dataset(spec), TRAIN_IMAGES)
    check_cifar(load_dataset(spec, split="test"), TEST_IMAGES)
    check_cifar(load_dataset(spec, split="all"), TRAIN_IMAGES + TEST_IMAGES)
    check_cifar(load_dataset(spec, limit=4), TRAIN_IMAGES[:4])


def test_py2_pickle_matches_py3_pickle(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(py2_pickle(batch_dict(0)))
    with open(tmp_path / "a", "rb") as handle:
        loaded = RestrictedUnpickler(handle, encoding="bytes").load()
    original = batch_dict(0)
    assert sorted(loaded) == sorted(original)
    assert np.array_equal(loaded[b"data"], original[b"data"])
    assert loaded[b"data"].dtype == np.uint8
    assert loaded[b"labels"] == original[b"labels"]
    assert loaded[b"filenames"] == original[b"filenames"]


def test_cifar_missing_folder_and_batches(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_dataset(f"cifar10:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match="no CIFAR-10 batches"):
        load_dataset(f"cifar10:{tmp_path}")
    write_cifar_py(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3: CIFAR-10 batch missing"):
        load_dataset(f"cifar10:{tmp_path}")
    assert len(load_dataset(f"cifar10:{tmp_path}", split="test")) == PER_BATCH


def test_cifar_bin_truncated(tmp_path: Path) -> None:
    write_cifar_bin(tmp_path)
    path = tmp_path / "data_batch_2.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="data_batch_2.bin: size .* not a positive multiple"):
        load_dataset(f"cifar10:{tmp_path}")
    path.write_bytes(b"")
    with pytest.raises(DataError, match="data_batch_2.bin"):
        load_dataset(f"cifar10:{tmp_path}")


def test_cifar_bin_bad_label(tmp_path: Path) -> None:
    write_cifar_bin(tmp_path)
    path = tmp_path / "test_batch.bin"
    blob = bytearray(path.read_bytes())
    blob[3073] = 10  # label byte of the second record
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="test_batch.bin: label 10 out of range"):
        load_dataset(f"cifar10:{tmp_path}", split="test")


def write_test_batch(folder: Path, content: object) -> str:
    folder.mkdir(exist_ok=True)
    (folder / "test_batch").write_bytes(pickle.dumps(content, protocol=2))
    return f"cifar10:{folder}"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop(b"data"), "expected keys 'data' and 'labels'"),
        (lambda d: d.pop(b"labels"), "expected keys 'data' and 'labels'"),
        (lambda d: d.update({b"data": d[b"data"][:, :1024]}), r"shape \(n, 3072\)"),
        (lambda d: d.update({b"data": d[b"data"].astype(np.int16)}), "uint8 array"),
        (lambda d: d.update({b"data": d[b"data"].reshape(-1)}), "uint8 array"),
        (lambda d: d.update({b"labels": d[b"labels"][:-1]}), "2 labels for 3 images"),
        (lambda d: d.update({b"labels": [0, 1, 12]}), "label 12 out of range"),
        (lambda d: d.update({b"labels": ["a", "b", "c"]}), "list of ints"),
    ],
)
def test_cifar_pickle_bad_content(tmp_path: Path, mutate, message: str) -> None:
    content = batch_dict(5)
    mutate(content)
    spec = write_test_batch(tmp_path, content)
    with pytest.raises(DataError, match=message) as info:
        load_dataset(spec, split="test")
    assert "test_batch" in str(info.value) and "\n" not in str(info.value)


def test_cifar_pickle_not_a_dict_and_truncated(tmp_path: Path) -> None:
    spec = write_test_batch(tmp_path, [1, 2, 3])
    with pytest.raises(DataError, match="expected a dict, found list"):
        load_dataset(spec, split="test")
    blob = pickle.dumps(batch_dict(5), protocol=2)
    (tmp_path / "test_batch").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="test_batch: not a readable CIFAR-10 python batch"):
        load_dataset(spec, split="test")


def test_cifar_str_keys_accepted(tmp_path: Path) -> None:
    content = {key.decode(): value for key, value in batch_dict(5).items()}
    spec = write_test_batch(tmp_path, content)
    check_cifar(load_dataset(spec, split="test"), TEST_IMAGES)


# --------------------------------------------------------------------------- unpickler security


class _Evil:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))


def test_malicious_pickle_refused_without_side_effect(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    for payload in (_Evil(command), {b"data": _Evil(command), b"labels": []}):
        spec = write_test_batch(tmp_path / "cifar", payload)
        with pytest.raises(DataError, match=r"refusing to unpickle global (posix|nt|os)\.system"):
            load_dataset(spec, split="test")
        assert not marker.exists()
    # sanity: the same payload really would run the command through a general unpickler
    pickle.loads(pickle.dumps(_Evil(command), protocol=2))
    assert marker.exists()


@pytest.mark.parametrize(
    "blob",
    [
        pickle.dumps(_EvalEvil(), protocol=2),
        pickle.dumps({b"data": _EvalEvil()}, protocol=4),
        b"\x80\x02cbuiltins\ngetattr\nq\x00.",
        b"\x80\x02cnumpy\nload\nq\x00.",
        b"\x80\x02cnumpy.core.multiarray\nscalar\nq\x00.",
        # _codecs.encode is only admitted for latin-1
        b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R.",
        b"\x80\x02P1\n.",  # persistent id
    ],
)
def test_restricted_unpickler_refuses(tmp_path: Path, blob: bytes) -> None:
    (tmp_path / "test_batch").write_bytes(blob)
    with pytest.raises(DataError, match="test_batch: not a readable CIFAR-10 python batch: refus"):
        load_dataset(f"cifar10:{tmp_path}", split="test")


# --------------------------------------------------------------------------- npz


def test_npz_round_trip_4d(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 2, 3, 4))
    y = np.array([0, 1, 2, 1, 0, 4])
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_dataset(f"npz:{tmp_path / 'd.npz'}", split="all")
    assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
    assert torch.equal(ds.x, torch.from_numpy(x.astype(np.float32)))
    assert ds.y.tolist() == y.tolist() and ds.num_classes == 5 and ds.input_shape == (2, 3, 4)
    assert len(load_dataset(f"npz:{tmp_path / 'd.npz'}", limit=2)) == 2


def test_npz_uint8_3d_2d_and_num_classes(tmp_path: Path) -> None:
    x = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    np.savez(tmp_path / "a.npz", x=x, y=np.array([1, 0], dtype=np.uint8), num_classes=np.int64(7))
    ds = load_dataset(f"npz:{tmp_path / 'a.npz'}")
    assert ds.input_shape == (1, 3, 5) and ds.num_classes == 7
    assert torch.allclose(ds.x[1, 0], torch.from_numpy(x[1].astype(np.float32) / 255.0))
    np.savez(tmp_path / "b.npz", x=np.ones((4, 9), dtype=np.float64), y=np.zeros(4, dtype=np.int32))
    ds = load_dataset(f"npz:{tmp_path / 'b.npz'}")
    assert ds.input_shape == (1, 1, 9) and ds.num_classes == 1


def test_npz_test_split(tmp_path: Path) -> None:
    path = tmp_path / "s.npz"
    np.savez(path, x=np.zeros((3, 4)), y=[0, 1, 1], x_test=np.ones((2, 4)), y_test=[3, 0])
    train, test = load_dataset(f"npz:{path}"), load_dataset(f"npz:{path}", split="test")
    assert len(train) == 3 and len(test) == 2
    assert train.num_classes == test.num_classes == 4
    np.savez(path, x=np.zeros((3, 4)), y=[0, 1, 1])
    with pytest.raises(DataError, match="missing array"):
        load_dataset(f"npz:{path}", split="test")


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((3, 4))}, r"missing array\(s\) y"),
        ({"y": np.zeros(3, dtype=int)}, r"missing array\(s\) x"),
        ({"x": np.zeros((3, 4)), "y": np.zeros(2, dtype=int)}, "3 examples but y has 2"),
        ({"x": np.zeros((3, 4)), "y": np.array([0.0, 1.0, 1.0])}, "integer labels"),
        ({"x": np.zeros((3, 4)), "y": np.array([True, False, True])}, "integer labels"),
        ({"x": np.zeros((3, 4)), "y": np.array([0, -1, 1])}, "negative label -1"),
        ({"x": np.zeros((3, 4)), "y": np.zeros((3, 1), dtype=int)}, r"shape \(N,\)"),
        ({"x": np.zeros((3, 4), dtype=np.int32), "y": np.zeros(3, dtype=int)}, "float or uint8"),
        ({"x": np.zeros(3), "y": np.zeros(3, dtype=int)}, r"\(N, C, H, W\)"),
        ({"x": np.zeros((0, 4)), "y": np.zeros(0, dtype=int)}, "empty"),
        ({"x": np.full((3, 4), np.nan), "y": np.zeros(3, dtype=int)}, "NaN"),
        ({"x": np.array([object()] * 3), "y": np.zeros(3, dtype=int)}, "cannot read npz"),
        (
            {"x": np.zeros((3, 4)), "y": np.array([0, 5, 1]), "num_classes": np.int64(5)},
            "num_classes = 5 but the largest label is 5",
        ),
        (
            {"x": np.zeros((3, 4)), "y": np.zeros(3, dtype=int), "num_classes": np.array([2, 3])},
            "integer scalar",
        ),
    ],
)
def test_npz_errors(tmp_path: Path, arrays: dict, message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message) as info:
        load_dataset(f"npz:{path}")
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_npz_missing_or_not_npz(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="none.npz: npz file not found"):
        load_dataset(f"npz:{tmp_path / 'none.npz'}")
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip file")
    with pytest.raises(DataError, match="junk.npz: cannot read npz"):
        load_dataset(f"npz:{tmp_path / 'junk.npz'}")
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(DataError, match="single.npy: cannot read npz: not an .npz archive"):
        load_dataset(f"npz:{tmp_path / 'single.npy'}")


# --------------------------------------------------------------------------- iterate_batches


def toy_dataset(n: int = 10) -> Dataset:
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    return Dataset(x=x, y=torch.arange(n), num_classes=n, name="toy")


def test_iterate_batches_covers_all_in_order() -> None:
    batches = list(iterate_batches(toy_dataset(10), 4))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert torch.cat([y for _, y in batches]).tolist() == list(range(10))
    for x, y in batches:
        assert torch.equal(x.view(-1).long(), y)  # x and y stay paired
    assert len(list(iterate_batches(toy_dataset(8), 4))) == 2
    assert len(list(iterate_batches(toy_dataset(3), 100))) == 1


def test_iterate_batches_shuffle_deterministic() -> None:
    ds = toy_dataset(50)

    def order(seed: int) -> list[int]:
        return torch.cat([y for _, y in iterate_batches(ds, 7, shuffle=True, seed=seed)]).tolist()

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) == list(range(50)) and order(1) != list(range(50))
    for x, y in iterate_batches(ds, 7, shuffle=True, seed=3):
        assert torch.equal(x.view(-1).long(), y)


@pytest.mark.parametrize("batch_size", [0, -1, 2.0, True])
def test_iterate_batches_bad_size(batch_size) -> None:
    with pytest.raises(DataError, match="batch size"):
        next(iterate_batches(toy_dataset(), batch_size))
