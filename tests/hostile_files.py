"""Hostile and broken files for the reliability tests (issue 15): built by code here, never committed.

* :func:`real_checkpoint`: a checkpoint written by curvlab itself (factors, weights, ``/model``) of one
  of the built-in models on a few digits images (or the token corpus);
* :data:`CRAFTED`: structure-aware mutations of such a checkpoint, by class (attributes, configs,
  shapes, dtypes, values, links, chunking and storage, heaps), each with the outcome a correct curvlab
  gives: ``"refuse"`` (one line, exit 2) or ``"accept"`` (exit 0);
* :func:`byte_mutation`: byte-level damage (bit flips, zeroed runs, truncation, appended bytes);
* :data:`DATA_FILES`: data files for ``--data`` (npz, CIFAR-10, text) that try to make curvlab
  allocate what they declare;
* :func:`not_regular`: paths that are not regular files (a named pipe, a device, a folder).

``outside`` is a folder of files that a hostile checkpoint points at (another HDF5 file, raw bytes,
a text file): no command may read them. As a script, ``python tests/hostile_files.py OUT`` writes the
whole corpus into ``OUT/`` (``--models`` picks the source checkpoints).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

Builder = Callable[[Path, Path, Path], None]


# --------------------------------------------------------------------------------------------------
# Sources


def real_checkpoint(path: Path, model: str = "mlp", examples: int = 24, steps: int = 1) -> Path:
    """A checkpoint written by curvlab (``curvlab factors`` in this process), with weights."""
    import torch

    from curvlab.capture.factors import collect_factors, save_factors
    from curvlab.io.data import iterate_batches, load_dataset
    from curvlab.models import build_model, data_options, model_config

    args: dict = (
        {"d_model": 16, "heads": 2, "d_ff": 32, "vocab": 64, "seq_len": 8}
        if model.startswith("transformer")
        else {}
    )
    data = load_dataset("pystdlib" if args else "digits", limit=examples, **data_options(model, args))
    torch.manual_seed(0)
    net = build_model(model, data.input_shape, data.num_classes, args).eval()
    config = model_config(model, data.input_shape, data.num_classes, args)
    config["data"] = data.name
    for step in range(steps):
        factors = collect_factors(net, iterate_batches(data, 8), fisher="empirical")
        save_factors(
            path, factors, step=10 * step, model=net, model_name=model, model_config=config, append=step > 0
        )
    return path


def make_outside(folder: Path) -> Path:
    """Files a hostile checkpoint points at: ``secret.h5``, ``raw.bin``, ``secret.txt``."""
    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / "secret.h5", "w") as f:
        f["A"] = np.eye(4096)[:8, :8] * 7.0
        f.create_group("steps")
    (folder / "raw.bin").write_bytes(np.full(1 << 16, 3.0).tobytes())
    (folder / "secret.txt").write_text("top secret words " * 200)
    return folder


# --------------------------------------------------------------------------------------------------
# Structure-aware mutations of a real checkpoint


def _first(f: h5py.File) -> tuple[h5py.Group, h5py.Group, str]:
    """The last step group, its first layer group and the layer's path."""
    steps = f["steps"]
    step = steps[sorted(steps, key=int)[-1]]
    name = next(iter(step["factors"]))
    return step, step["factors"][name], f"{step.name}/factors/{name}"


def _edit(fn: Callable[[h5py.File, Path], None]) -> Builder:
    def build(src: Path, dst: Path, outside: Path) -> None:
        shutil.copyfile(src, dst)
        with h5py.File(dst, "r+") as f:
            fn(f, outside)

    return build


def _set_step_attr(key: str, value) -> Builder:
    return _edit(lambda f, _: _first(f)[0].attrs.__setitem__(key, value))


def _set_layer_attr(key: str, value) -> Builder:
    return _edit(lambda f, _: _first(f)[1].attrs.__setitem__(key, value))


def _replace(name: str, make: Callable[[h5py.Group, str, np.ndarray], None]) -> Builder:
    """Replace factor ``name`` of the first layer by what ``make(group, name, old values)`` creates."""

    def fn(f: h5py.File, _: Path) -> None:
        layer = _first(f)[1]
        old = layer[name][()]
        del layer[name]
        make(layer, name, old)

    return _edit(fn)


def _values(change: Callable[[np.ndarray], np.ndarray]) -> Builder:
    return _replace("A", lambda g, n, old: g.create_dataset(n, data=change(old.copy())))


def _diag_scaled(value: float) -> Callable[[np.ndarray], np.ndarray]:
    def change(x: np.ndarray) -> np.ndarray:
        np.fill_diagonal(x, value) if x.ndim == 2 else x.fill(value)
        return x

    return change


def _set_entry(value: float) -> Callable[[np.ndarray], np.ndarray]:
    def change(x: np.ndarray) -> np.ndarray:
        x.flat[0] = value
        return x

    return change


def _set_off_diagonal(value: float) -> Callable[[np.ndarray], np.ndarray]:
    def change(x: np.ndarray) -> np.ndarray:
        x.flat[1] = value
        return x

    return change


def _resize_layer(a_size: int, make: Callable[[h5py.Group, int], None]) -> Builder:
    """Make the first (Linear) layer's A of size ``a_size`` (weight_shape follows) with ``make``."""

    def fn(f: h5py.File, _: Path) -> None:
        layer = _first(f)[1]
        bias = bool(layer.attrs["has_bias"])
        m = layer["S"].shape[0]
        layer.attrs["module_type"] = "Linear"
        layer.attrs["weight_shape"] = np.array([m, a_size - bias], dtype=np.int64)
        del layer["A"]
        make(layer, a_size)

    return _edit(fn)


def _weight(make: Callable[[h5py.Group, str, np.ndarray], None]) -> Builder:
    def fn(f: h5py.File, _: Path) -> None:
        weights = _first(f)[0]["weights"]
        name = next(iter(weights))
        old = weights[name][()]
        del weights[name]
        make(weights, name, old)

    return _edit(fn)


def _scaled_weights(factor: float) -> Callable[[h5py.File, Path], None]:
    """Every float weight multiplied by ``factor`` (finite in float32 for 1e30)."""

    def fn(f: h5py.File, _: Path) -> None:
        for ds in _first(f)[0]["weights"].values():
            if ds.dtype.kind == "f":
                ds[...] = ds[()] * factor

    return fn


def _config_data(value: object) -> Builder:
    def fn(f: h5py.File, outside: Path) -> None:
        config = json.loads(f["model"].attrs["config"])
        config["data"] = value.replace("OUTSIDE", str(outside)) if isinstance(value, str) else value
        f["model"].attrs["config"] = json.dumps(config)

    return _edit(fn)


def _config_text(text: str) -> Builder:
    return _edit(lambda f, _: f["model"].attrs.__setitem__("config", text))


def _widths(f: h5py.File, _: Path) -> None:
    config = json.loads(f["model"].attrs["config"])
    config["args"]["widths"] = [10**9]
    f["model"].attrs["config"] = json.dumps(config)


def _link(make: Callable[[h5py.File, str, Path], None]) -> Builder:
    """Replace factor A of the first layer by the link ``make(file, path of A, outside)`` creates."""

    def fn(f: h5py.File, outside: Path) -> None:
        path = _first(f)[2] + "/A"
        make(f, path, outside)

    return _edit(fn)


def _external_factor(f: h5py.File, path: str, outside: Path) -> None:
    del f[path]
    f[path] = h5py.ExternalLink(str(outside / "secret.h5"), "/A")


def _external_steps(f: h5py.File, path: str, outside: Path) -> None:
    del f["steps"]
    f["steps"] = h5py.ExternalLink(str(outside / "secret.h5"), "/steps")


def _external_model(f: h5py.File, path: str, outside: Path) -> None:
    del f["model"]
    f["model"] = h5py.ExternalLink(str(outside / "secret.h5"), "/")


def _soft_loop(f: h5py.File, path: str, outside: Path) -> None:
    del f[path]
    f[path] = h5py.SoftLink(path)


def _soft_dangling(f: h5py.File, path: str, outside: Path) -> None:
    del f[path]
    f[path] = h5py.SoftLink("/nowhere/A")


def _soft_inside(f: h5py.File, path: str, outside: Path) -> None:
    f.create_group("extra")
    f.move(path, "/extra/A")
    f[path] = h5py.SoftLink("/extra/A")


def _soft_through_external(f: h5py.File, path: str, outside: Path) -> None:
    del f[path]
    f["ext"] = h5py.ExternalLink(str(outside / "secret.h5"), "/")
    f[path] = h5py.SoftLink("/ext/A")


def _external_storage(source: str) -> Builder:
    """Factor A's bytes kept in another file (``source`` in ``outside``, or an absolute path)."""

    def fn(f: h5py.File, outside: Path) -> None:
        layer = _first(f)[1]
        old = layer["A"][()]
        del layer["A"]
        target = source if source.startswith("/") else str(outside / source)
        layer.create_dataset("A", shape=old.shape, dtype=old.dtype, external=[(target, 0, old.nbytes)])

    return _edit(fn)


def _virtual(f: h5py.File, outside: Path) -> None:
    layer = _first(f)[1]
    old = layer["A"][()]
    with h5py.File(outside / "virtual_source.h5", "w") as src:
        src["data"] = old
    del layer["A"]
    layout = h5py.VirtualLayout(shape=old.shape, dtype=old.dtype)
    layout[...] = h5py.VirtualSource(str(outside / "virtual_source.h5"), "data", shape=old.shape)
    layer.create_virtual_dataset("A", layout)


def _many_incomplete(count: int) -> Builder:
    def fn(f: h5py.File, _: Path) -> None:
        steps = f["steps"]
        for k in range(count):
            g = steps.create_group(str(100000 + k))
            g.attrs["step"] = 100000 + k

    return _edit(fn)


def _hardlinked_steps(count: int) -> Builder:
    """``count`` steps whose ``factors`` group is the same object (hard links): a file that reads
    as ``count`` times its size."""

    def fn(f: h5py.File, _: Path) -> None:
        step = _first(f)[0]
        for k in range(count):
            g = f["steps"].create_group(str(200000 + k))
            for key in ("fisher_type", "num_examples"):
                g.attrs[key] = step.attrs[key]
            g.attrs["step"] = 200000 + k
            g["factors"] = step["factors"]
            g.attrs["complete"] = True

    return _edit(fn)


def _heap_zero(src: Path, dst: Path, outside: Path) -> None:
    """Zero the size of the first global heap collection's free-space object (libhdf5 loops on it)."""
    data = bytearray(src.read_bytes())
    start = data.find(b"GCOL\x01")
    size = int.from_bytes(data[start + 8 : start + 16], "little")
    p = start + 16
    while p + 16 <= start + size:
        index = int.from_bytes(data[p : p + 2], "little")
        length = int.from_bytes(data[p + 8 : p + 16], "little")
        if index == 0:
            data[p + 8 : p + 16] = bytes(8)
            break
        p += 16 + (length + 7) // 8 * 8
    dst.write_bytes(bytes(data))


def _heap_size(src: Path, dst: Path, outside: Path) -> None:
    """Grow the first global heap collection's size so that it runs over zeros (as a bit flip did)."""
    data = bytearray(src.read_bytes())
    start = data.find(b"GCOL\x01")
    size = int.from_bytes(data[start + 8 : start + 16], "little")
    data[start + 8 : start + 16] = (size + 4 * 65536).to_bytes(8, "little")
    dst.write_bytes(bytes(data))


def _chunked(shape: tuple[int, ...], write: str, **options) -> Callable[[h5py.Group, int], None]:
    def make(g: h5py.Group, n: int) -> None:
        ds = g.create_dataset("A", shape=(n, n), dtype="f8", chunks=shape, **options)
        if write == "half":
            ds[: n // 2] = np.eye(n)[: n // 2]
        elif write == "zeros":
            block = np.zeros((shape[0], n))
            for i in range(0, n, shape[0]):
                ds[i : i + shape[0]] = block[: n - i]

    return make


def _norm_entry(
    channels: int | list[int], make_a: Callable[[h5py.Group, int], None] | None = None, version: int = 2
) -> Builder:
    """A ``NormAffine`` entry (format 2: the ``(γ, β)`` of a normalisation layer, ``A`` blocks ``(C, 2, 2)``,
    ``S = [1]``) added to the last step as layer ``norm``; ``make_a(group, C)`` writes its ``A``
    (default: valid blocks); ``version`` is written as the file's ``format_version``."""
    shape = [channels] if isinstance(channels, int) else channels

    def fn(f: h5py.File, _: Path) -> None:
        g = _first(f)[0]["factors"].create_group("norm")
        g.attrs["module_type"] = "NormAffine"
        g.attrs["weight_shape"] = np.array(shape, dtype=np.uint64 if max(shape) >= 2**63 else np.int64)
        g.attrs["has_bias"] = True
        c = int(np.prod(np.array(shape, dtype=object)))
        if make_a is None:
            g.create_dataset("A", data=np.tile(np.array([[2.0, 0.5], [0.5, 1.0]]), (c, 1, 1)))
        else:
            make_a(g, c)
        g.create_dataset("S", data=np.ones((1, 1)))
        f.attrs["format_version"] = np.int64(version)

    return _edit(fn)


def _blocks(shape: tuple[int, ...], chunks: tuple[int, ...]) -> Callable[[h5py.Group, int], None]:
    """A blocks ``A`` of the declared ``shape``, chunked and never written."""
    return lambda g, c: g.create_dataset("A", shape=shape, dtype="f8", chunks=chunks)


def _block_values(change: Callable[[np.ndarray], None]) -> Callable[[h5py.Group, int], None]:
    def make(g: h5py.Group, c: int) -> None:
        a = np.tile(np.array([[2.0, 0.5], [0.5, 1.0]]), (c, 1, 1))
        change(a)
        g.create_dataset("A", data=a)

    return make


def _other_model(f: h5py.File, _: Path) -> None:
    """The first layer's entry made a valid Linear of another shape (2 inputs and a bias): a
    well-formed file that does not fit the model its /model config names."""
    layer = _first(f)[1]
    m = layer["S"].shape[0]
    layer.attrs["module_type"] = "Linear"  # whatever it was (the transformer's first entry is a norm)
    layer.attrs["weight_shape"] = np.array([m, 2], dtype=np.int64)
    layer.attrs["has_bias"] = True
    del layer["A"]
    layer.create_dataset("A", data=np.eye(3))


def _coverage(fn: Callable[[h5py.Group, Path], None]) -> Builder:
    """Change the last step's ``coverage`` group (format 2: which parameters the factors cover)."""
    return _edit(lambda f, outside: fn(_first(f)[0]["coverage"], outside))


def _coverage_external(g: h5py.Group, outside: Path) -> None:
    del g["skipped_parameters"]
    g["skipped_parameters"] = h5py.ExternalLink(str(outside / "secret.h5"), "/A")


def _coverage_unwritten(g: h5py.Group, _: Path) -> None:
    """2^40 skipped entries declared (over the 10^6 a coverage may list), none written."""
    for name in ("skipped_name", "skipped_parameters", "skipped_reason"):
        del g[name]
    text = h5py.string_dtype("utf-8")
    g.create_dataset("skipped_name", shape=(1 << 40,), dtype=text, chunks=(1 << 10,))
    g.create_dataset("skipped_parameters", shape=(1 << 40,), dtype="i8", chunks=(1 << 10,))
    g.create_dataset("skipped_reason", shape=(1 << 40,), dtype=text, chunks=(1 << 10,))


def _compressed_ok(f: h5py.File, _: Path) -> None:
    layer = _first(f)[1]
    old = layer["A"][()]
    del layer["A"]
    layer.create_dataset("A", data=old, chunks=True, compression="gzip", shuffle=True, fletcher32=True)


#: name -> (class, expected outcome for `curvlab info`: "refuse", "accept" or "either", builder)
CRAFTED: dict[str, tuple[str, str, Builder]] = {
    # attributes
    "attr_nan_extra": ("attributes", "refuse", _set_step_attr("damping", np.nan)),
    "attr_inf_extra": ("attributes", "refuse", _set_step_attr("damping", np.inf)),
    "attr_nan_array_extra": ("attributes", "refuse", _set_step_attr("decays", np.array([0.5, np.nan]))),
    "attr_array_extra": ("attributes", "accept", _set_step_attr("decays", np.array([0.5, 0.25]))),
    "attr_int_array_extra": ("attributes", "accept", _set_step_attr("sizes", np.arange(6).reshape(2, 3))),
    "attr_bytes_extra": ("attributes", "accept", _set_step_attr("note", np.bytes_(b"fixed bytes"))),
    "attr_complex_extra": ("attributes", "refuse", _set_step_attr("z", np.complex128(1 + 2j))),
    "attr_compound_extra": (
        "attributes",
        "refuse",
        _set_step_attr("pair", np.zeros(2, dtype=[("a", "f8"), ("b", "i4")])),
    ),
    "attr_string_array_extra": ("attributes", "accept", _set_step_attr("names", ["fc", "conv1"])),
    "attr_big_extra": ("attributes", "refuse", _set_step_attr("big", np.zeros(300_000))),
    "attr_empty_fisher": ("attributes", "refuse", _set_step_attr("fisher_type", "")),
    "attr_int_fisher": ("attributes", "refuse", _set_step_attr("fisher_type", 3)),
    "attr_negative_examples": ("attributes", "refuse", _set_step_attr("num_examples", -5)),
    "attr_float_examples": ("attributes", "refuse", _set_step_attr("num_examples", 2.5)),
    "attr_step_mismatch": ("attributes", "refuse", _set_step_attr("step", 77)),
    "attr_weight_shape_u64max": (
        "attributes",
        "refuse",
        _set_layer_attr("weight_shape", np.array([2**64 - 1, 5], dtype=np.uint64)),
    ),
    "attr_weight_shape_huge": (
        "attributes",
        "refuse",
        _set_layer_attr("weight_shape", np.array([2**40, 2**40], dtype=np.int64)),
    ),
    "attr_weight_shape_float": (
        "attributes",
        "refuse",
        _set_layer_attr("weight_shape", np.array([2.5, 3.0])),
    ),
    "attr_module_type": ("attributes", "refuse", _set_layer_attr("module_type", "Conv9d")),
    "attr_has_bias_text": ("attributes", "refuse", _set_layer_attr("has_bias", "yes")),
    "attr_format": ("attributes", "refuse", _edit(lambda f, _: f.attrs.__setitem__("format", "other"))),
    "attr_format_version": (
        "attributes",
        "refuse",
        _edit(lambda f, _: f.attrs.__setitem__("format_version", 99)),
    ),
    "attr_incomplete": (
        "attributes",
        "accept",
        _edit(lambda f, _: _first(f)[0].attrs.__delitem__("complete")),
    ),
    "attr_300_incomplete": ("attributes", "accept", _many_incomplete(300)),
    # configs
    "config_data_path": ("configs", "accept", _config_data("text:OUTSIDE/secret.txt")),
    "config_data_int": ("configs", "accept", _config_data(5)),
    "config_nan": ("configs", "refuse", _config_text('{"name": "mlp", "x": NaN}')),
    "config_infinity": ("configs", "refuse", _config_text('{"name": "mlp", "x": -Infinity}')),
    "config_deep": ("configs", "refuse", _config_text("[" * 100_000 + "]" * 100_000)),
    "config_not_object": ("configs", "refuse", _config_text("[1, 2]")),
    "config_huge_widths": ("configs", "accept", _edit(_widths)),
    # shapes
    "shape_wrong_size": (
        "shapes",
        "refuse",
        _replace("A", lambda g, n, old: g.create_dataset(n, data=old[1:, 1:])),
    ),
    "shape_3d": ("shapes", "refuse", _replace("A", lambda g, n, old: g.create_dataset(n, data=old[None]))),
    "shape_scalar": ("shapes", "refuse", _replace("A", lambda g, n, old: g.create_dataset(n, data=1.0))),
    "shape_empty": (
        "shapes",
        "refuse",
        _replace("A", lambda g, n, old: g.create_dataset(n, shape=(0,), dtype="f8")),
    ),
    "shape_huge_declared": ("shapes", "refuse", _resize_layer(1 << 20, _chunked((1024, 1024), "none"))),
    "shape_unwritten_chunks": ("shapes", "refuse", _resize_layer(20000, _chunked((1000, 1000), "none"))),
    "shape_half_written": ("shapes", "refuse", _resize_layer(400, _chunked((100, 100), "half"))),
    "weight_huge_declared": (
        "shapes",
        "accept",
        _weight(
            lambda g, n, old: g.create_dataset(n, shape=(1 << 20, 1 << 20), dtype="f4", chunks=(1024, 1024))
        ),
    ),
    # dtypes
    "dtype_int": ("dtypes", "refuse", _values(lambda x: x.astype(np.int64))),
    "dtype_float16": ("dtypes", "refuse", _values(lambda x: x.astype(np.float16))),
    "dtype_complex": ("dtypes", "refuse", _values(lambda x: x.astype(np.complex128))),
    "dtype_bigendian": ("dtypes", "accept", _values(lambda x: x.astype(">f8"))),
    "dtype_string": (
        "dtypes",
        "refuse",
        _replace("A", lambda g, n, old: g.create_dataset(n, data=np.array(["a", "b"], dtype="S1"))),
    ),
    "dtype_compound": (
        "dtypes",
        "refuse",
        _replace(
            "A",
            lambda g, n, old: g.create_dataset(
                n, data=np.zeros(old.shape[0], dtype=[("a", "f8"), ("b", "i4")])
            ),
        ),
    ),
    "weight_string": (
        "dtypes",
        "accept",
        _weight(lambda g, n, old: g.create_dataset(n, data=np.array([b"x"]))),
    ),
    # values
    "value_nan": ("values", "refuse", _values(_set_entry(np.nan))),
    "value_inf": ("values", "refuse", _values(_set_entry(np.inf))),
    "value_1e308": ("values", "refuse", _values(_diag_scaled(1e308))),
    "value_1e200": ("values", "accept", _values(_diag_scaled(1e200))),
    "value_asymmetric": ("values", "refuse", _values(_set_off_diagonal(1e3))),
    "value_negative_diag": ("values", "refuse", _values(_diag_scaled(-1.0))),
    "weight_nan": (
        "values",
        "accept",
        _weight(lambda g, n, old: g.create_dataset(n, data=np.full_like(old, np.nan))),
    ),
    "weight_inf": (
        "values",
        "accept",
        _weight(lambda g, n, old: g.create_dataset(n, data=np.full_like(old, np.inf))),
    ),
    "weight_1e30": ("values", "accept", _edit(_scaled_weights(1e30))),
    # links
    "link_external_factor": ("links", "refuse", _link(_external_factor)),
    "link_external_steps": ("links", "refuse", _link(_external_steps)),
    "link_external_model": ("links", "refuse", _link(_external_model)),
    "link_soft_loop": ("links", "refuse", _link(_soft_loop)),
    "link_soft_dangling": ("links", "refuse", _link(_soft_dangling)),
    "link_soft_inside": ("links", "accept", _link(_soft_inside)),
    "link_soft_through_external": ("links", "refuse", _link(_soft_through_external)),
    # chunking and storage
    "storage_external_raw": ("storage", "refuse", _external_storage("raw.bin")),
    "storage_external_devzero": ("storage", "refuse", _external_storage("/dev/zero")),
    "storage_virtual": ("storage", "refuse", _edit(_virtual)),
    "storage_gzip_bomb": (
        "storage",
        "refuse",
        _resize_layer(4096, _chunked((512, 512), "zeros", compression="gzip")),
    ),
    "storage_compressed_ok": ("storage", "accept", _edit(_compressed_ok)),
    # refused when 300 readings of the factors exceed 128x the file (mlp, resnet8), read otherwise
    "storage_hardlinked_300": ("storage", "either", _hardlinked_steps(300)),
    # normalisation layers (format 2: NormAffine entries, blocks A of shape (C, k, k))
    "norm_ok": ("norm", "accept", _norm_entry(6)),
    "norm_version_1": ("norm", "refuse", _norm_entry(6, version=1)),
    "norm_huge_channels": ("norm", "refuse", _norm_entry(1 << 40, _blocks((1 << 40, 2, 2), (1024, 2, 2)))),
    "norm_huge_k": ("norm", "refuse", _norm_entry(4, _blocks((4, 1 << 20, 1 << 20), (1, 1024, 1024)))),
    "norm_unwritten": ("norm", "refuse", _norm_entry(30000, _blocks((30000, 2, 2), (1000, 2, 2)))),
    # 2^32 x 2^32 channels: 2^64, which wraps to 0 in int64 (an empty A must not pass for it)
    "norm_shape_overflow": (
        "norm",
        "refuse",
        _norm_entry([1 << 32, 1 << 32], lambda g, c: g.create_dataset("A", data=np.zeros((0, 2, 2)))),
    ),
    "norm_nine_axes": ("norm", "refuse", _norm_entry([1] * 9)),
    "norm_nan_block": (
        "norm", "refuse", _norm_entry(6, _block_values(lambda a: a.__setitem__((3, 0, 1), np.nan)))
    ),
    "norm_asymmetric_block": (
        "norm", "refuse", _norm_entry(6, _block_values(lambda a: a.__setitem__((2, 0, 1), 5.0)))
    ),
    "norm_indefinite_block": (
        "norm", "refuse", _norm_entry(6, _block_values(lambda a: a.__setitem__((1, 1, 1), -1.0)))
    ),
    "norm_1e308_blocks": (
        "norm", "refuse", _norm_entry(6, _block_values(lambda a: a.__setitem__((slice(None), 0, 0), 1e308)))
    ),
    "shape_other_model": ("shapes", "accept", _edit(_other_model)),
    # the coverage group of a step (format 2)
    "coverage_external": ("coverage", "refuse", _coverage(_coverage_external)),
    "coverage_unwritten": ("coverage", "refuse", _coverage(_coverage_unwritten)),
    "coverage_not_adding_up": (
        "coverage", "refuse", _coverage(lambda g, _: g.attrs.__setitem__("total_parameters", np.int64(7)))
    ),
    # heaps
    "heap_zero_free_space": ("heaps", "refuse", _heap_zero),
    "heap_size_over_zeros": ("heaps", "refuse", _heap_size),
}


# --------------------------------------------------------------------------------------------------
# Byte-level damage


def byte_mutation(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """``(kind, damaged bytes)``: bit flips, a zeroed run, a truncation or appended bytes."""
    out = bytearray(data)
    kind = rng.choice(("flip", "flip", "zero", "zero", "truncate", "append"))
    if kind == "flip":
        for _ in range(rng.choice((1, 2, 4, 8))):
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
    elif kind == "zero":
        n = rng.choice((1, 8, 16, 64, 162, 512))
        i = rng.randrange(len(out))
        out[i : i + n] = bytes(len(out[i : i + n]))
    elif kind == "truncate":
        del out[rng.randrange(len(out)) :]
    else:
        out += bytes(rng.randrange(256) for _ in range(rng.choice((1, 100, 4096))))
    return kind, bytes(out)


def metadata_offsets(path: Path) -> list[int]:
    """Byte offsets outside the raw data of contiguous datasets: where damage hits the structure."""
    ranges = []
    with h5py.File(path, "r") as f:

        def visit(_: str, obj) -> None:
            if isinstance(obj, h5py.Dataset) and obj.id.get_offset() is not None:
                ranges.append((obj.id.get_offset(), obj.id.get_offset() + obj.id.get_storage_size()))

        f.visititems(visit)
    size = path.stat().st_size
    offsets, pos = [], 0
    for start, end in sorted(ranges):
        offsets.extend(range(pos, start))
        pos = max(pos, end)
    offsets.extend(range(pos, size))
    return offsets


def metadata_mutation(data: bytes, offsets: list[int], rng: random.Random) -> tuple[str, bytes]:
    """Like :func:`byte_mutation`, aimed at the file's structure (``offsets`` from
    :func:`metadata_offsets`)."""
    out = bytearray(data)
    kind = rng.choice(("meta_flip", "meta_zero"))
    i = rng.choice(offsets)
    if kind == "meta_flip":
        for _ in range(rng.choice((1, 2, 4))):
            j = rng.choice(offsets)
            out[j] ^= 1 << rng.randrange(8)
    else:
        n = rng.choice((1, 4, 8, 16, 64, 162))
        out[i : i + n] = bytes(len(out[i : i + n]))
    return kind, bytes(out)


# --------------------------------------------------------------------------------------------------
# Data files and paths that are not files


def _npz(path: Path, compressed: bool = True, **arrays) -> None:
    with open(path, "wb") as handle:  # a file object: numpy adds no .npz suffix
        (np.savez_compressed if compressed else np.savez)(handle, **arrays)


def _pickle_bomb(path: Path) -> None:
    """A CIFAR-10 python batch whose one opcode declares 1 TiB of bytes (BINBYTES8)."""
    folder = path
    folder.mkdir(parents=True, exist_ok=True)
    body = b"\x80\x04\x8e" + (1 << 40).to_bytes(8, "little") + b"abc"
    (folder / "data_batch_1").write_bytes(body)


def _pickle_global(path: Path) -> None:
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo hostile",))

    path.mkdir(parents=True, exist_ok=True)
    (path / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}, protocol=2))


def _cifar_bin_labels(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    record = bytes([200]) + bytes(3072)
    (path / "data_batch_1.bin").write_bytes(record * 4)


#: name -> (--data spec with PATH for the file, builder(path)); every one must be refused
DATA_FILES: dict[str, tuple[str, Callable[[Path], None]]] = {
    "npz_label_1e9": (
        "npz:PATH",
        lambda p: _npz(p, x=np.zeros((4, 64), np.float32), y=np.array([0, 1, 0, 10**9])),
    ),
    "npz_wide_bomb": (
        "npz:PATH",
        lambda p: _npz(p, x=np.zeros((4, 3_000_000), np.float32), y=np.arange(4) % 2),
    ),
    "npz_rows_bomb": (
        "npz:PATH",
        lambda p: _npz(p, x=np.zeros((40_000, 3_000), np.float32), y=np.zeros(40_000, int)),
    ),
    "npz_object": ("npz:PATH", lambda p: _npz(p, x=np.array([object()] * 3), y=np.zeros(3, int))),
    "npz_nan": ("npz:PATH", lambda p: _npz(p, x=np.full((4, 64), np.nan, np.float32), y=np.zeros(4, int))),
    "npz_not_zip": ("npz:PATH", lambda p: p.write_bytes(b"not a zip" * 100)),
    "cifar_pickle_bomb": ("cifar10:PATH", _pickle_bomb),
    "cifar_pickle_global": ("cifar10:PATH", _pickle_global),
    "cifar_bin_labels": ("cifar10:PATH", _cifar_bin_labels),
    "text_binary": ("text:PATH", lambda p: p.write_bytes(bytes(range(256)) * 50)),
}


def not_regular(folder: Path) -> dict[str, str]:
    """Paths that are not regular files: a named pipe, a device, a folder, a broken symlink."""
    folder.mkdir(parents=True, exist_ok=True)
    fifo = folder / "pipe.h5"
    if not fifo.exists():
        os.mkfifo(fifo)
    broken = folder / "broken.h5"
    if not broken.is_symlink():
        broken.symlink_to(folder / "missing.h5")
    return {"fifo": str(fifo), "dev_zero": "/dev/zero", "folder": str(folder), "broken_link": str(broken)}


# --------------------------------------------------------------------------------------------------
# The script


def build_corpus(out: Path, models: list[str]) -> list[tuple[str, str, str, Path]]:
    """Every crafted file of every model's checkpoint: ``(model, name, class, path)``."""
    outside = make_outside(out / "outside")
    corpus = []
    for model in models:
        src = real_checkpoint(out / f"{model}.h5", model)
        corpus.append((model, "original", "original", src))
        for name, (kind, _, build) in CRAFTED.items():
            dst = out / f"{model}-{name}.h5"
            build(src, dst, outside)
            corpus.append((model, name, kind, dst))
    return corpus


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--models", default="mlp,simple_cnn")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(args.out, args.models.split(","))
    for name, (_, build) in DATA_FILES.items():
        build(args.out / f"data-{name}")
    print(f"wrote {len(corpus)} checkpoints and {len(DATA_FILES)} data files into {args.out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
