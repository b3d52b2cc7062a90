"""Reading checkpoints: :class:`CheckpointReader` (lazy, one layer at a time) and :func:`load`.

Files are opened read-only and never modified; no pickle anywhere. Files are untrusted: they are
opened, walked and read through :mod:`curvlab.io.hdf5` (no pipes or devices, no link, external storage
or virtual dataset leading outside the file, every dataset's declared size checked against the
machine's budget and the bytes it stores before it is read, no damaged global heap). The root
attributes must name format version 1 or 2 (:mod:`.format`); step groups whose ``complete`` attribute
is missing or false (their writer died while writing them) are skipped with one
:class:`IncompleteStepWarning` per file. Every factor, weight and attribute read is validated against
the rules of :mod:`.format` (:func:`~curvlab.io.checkpoint.format.validate_layer`'s checks; finite
weights and step attributes) before it is returned, and the exceptions h5py raises on damaged files
become one-line :class:`CheckpointError` messages that name file, step and layer once.
"""

from __future__ import annotations

import fnmatch
import json
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import h5py
import numpy as np

from curvlab.errors import CheckpointError
from curvlab.io import hdf5
from curvlab.io.checkpoint import coverage as coverage_format
from curvlab.io.checkpoint.format import (
    _STEP_NAME,
    FORMAT,
    FORMAT_VERSION,
    MODULE_TYPES,
    RESERVED_STEP_ATTRS,
    Checkpoint,
    LayerFactors,
    Step,
    _check_dtype,
    _check_scale,
    _check_shape,
    _check_values,
    _check_weight_shape,
    _error,
    _layer_meta_text,
    _one_line,
    check_module_type_version,
    expected_factor_sizes,
    factor_block,
)
from curvlab.limits import MAX_ATTRIBUTE_BYTES, ReadBudget, check_size

#: Incomplete steps named in the one warning per file (the rest are counted).
_LISTED_STEPS = 10


class IncompleteStepWarning(UserWarning):
    """A step group whose ``complete`` attribute is missing or false: it is skipped on read."""


@contextmanager
def _h5_errors(path: object = None, step: object = None, layer: object = None) -> Iterator[None]:
    """Turn the exceptions h5py raises on damaged files into one-line :class:`CheckpointError`.

    Inside a block that adds the location itself, call it without one (a location given twice
    would be printed twice)."""
    try:
        yield
    except CheckpointError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise _error(f"cannot read HDF5 data ({_one_line(str(exc))})", path, step, layer) from exc


def _attr(attrs: h5py.AttributeManager, key: str) -> Any:
    """An attribute, read after its declared size is checked (:func:`curvlab.io.hdf5.attribute`)."""
    if key not in attrs:
        raise CheckpointError(f"missing attribute {key}")
    return hdf5.attribute(attrs, key, CheckpointError)


def _attr_int(attrs: h5py.AttributeManager, key: str) -> int:
    value = hdf5.scalar(_attr(attrs, key))
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"attribute {key} is {value!r}, not an integer")
    return value


def _attr_str(attrs: h5py.AttributeManager, key: str) -> str:
    value = hdf5.scalar(_attr(attrs, key))
    if not isinstance(value, str):
        raise CheckpointError(f"attribute {key} is {value!r}, not a string")
    return value


def _attr_bool(attrs: h5py.AttributeManager, key: str) -> bool:
    """A bool attribute: h5py's bool enum, or an integer 0/1 from writers without one."""
    value = hdf5.scalar(_attr(attrs, key))
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise CheckpointError(f"attribute {key} is {value!r}, not a bool")


def _extra_value(key: str, value: object) -> Any:
    """An extra step attribute: a number, string or array of numbers or strings; numbers finite."""
    if isinstance(value, np.ndarray) and value.size != 1:
        strings = value.dtype.kind == "O" and all(isinstance(v, (str, bytes)) for v in value.flat)
        if value.dtype.kind not in "biufS" and not strings:
            raise CheckpointError(
                f"step attribute {key} is an array of {value.dtype} (numbers or strings only)"
            )
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise CheckpointError(f"step attribute {key} holds non-finite values (NaN or inf)")
        return value
    value = hdf5.scalar(value)
    if isinstance(value, float) and not np.isfinite(value):
        raise CheckpointError(f"step attribute {key} is {value} (not finite)")
    if not isinstance(value, (bool, int, float, str, bytes)):
        raise CheckpointError(f"step attribute {key} is a {type(value).__name__} (numbers or strings only)")
    return value


def _member(group: h5py.Group, name: str) -> Any:
    """``group[name]`` or None, through links inside the file only (:func:`curvlab.io.hdf5.member`)."""
    with _h5_errors():
        return hdf5.member(group, name, CheckpointError)


class CheckpointReader:
    """Lazy, layer-by-layer access to a checkpoint (peak memory: one layer's factors).

    Opens the file read-only (it is never modified) and checks that it is HDF5 and has the root
    attributes of format v1. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._file, self._budget = hdf5.open_file(self.path, CheckpointError)
        self._steps: tuple[list[int], list[int]] | None = None
        self._checked_steps: set[int] = set()
        try:
            with _h5_errors(self.path):
                self.format_version = _check_root(self._file, self.path)
                self.model_name, self.model_config = _read_model(self._file, self.path)
            try:
                steps = _member(self._file, "steps")
            except CheckpointError as exc:
                raise _error(str(exc), self.path) from None
            if not isinstance(steps, h5py.Group):
                raise _error("missing /steps group (not a curvlab checkpoint?)", self.path)
            self._steps_group = steps
        except BaseException:
            self._file.close()
            raise

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file (idempotent)."""
        self._file.close()

    # --- steps -----------------------------------------------------------------------------------

    def _step_groups(self) -> Iterator[tuple[str, h5py.Group]]:
        steps = self._steps_group
        with _h5_errors(self.path):
            names = list(steps)
        for name in names:
            try:
                g = _member(steps, name)
            except CheckpointError as exc:
                raise _error(str(exc), self.path, name if _STEP_NAME.match(name) else None) from None
            if not isinstance(g, h5py.Group):
                raise _error("is not a group", self.path, name)
            yield name, g

    def _step_state(self, name: str, g: h5py.Group) -> bool:
        """True for a complete step; checks the group name and its ``step`` attribute."""
        if not _STEP_NAME.match(name):
            raise _error(
                f"step group name {name!r} is not a step number in decimal (like '0' or '200',"
                " no sign or leading zeros)",
                self.path,
                name,
            )
        try:
            with _h5_errors():
                complete = "complete" in g.attrs and _attr_bool(g.attrs, "complete")
                if complete:
                    number = _attr_int(g.attrs, "step")
                    if str(number) != name:
                        raise CheckpointError(
                            f"step attribute {number} disagrees with the group name {name!r}"
                        )
        except CheckpointError as exc:
            raise _error(str(exc), self.path, name) from None
        return complete

    def _scan(self) -> tuple[list[int], list[int]]:
        """(complete, incomplete) step numbers, ascending; one warning for all incomplete steps."""
        if self._steps is None:
            complete, incomplete = [], []
            for name, g in self._step_groups():
                (complete if self._step_state(name, g) else incomplete).append(int(name))
            self._steps = (sorted(complete), sorted(incomplete))
            if incomplete:
                warn_incomplete(self.path, self._steps[1], stacklevel=4)
        return self._steps

    def step_numbers(self) -> list[int]:
        """Complete step numbers, ascending; each incomplete step gives one IncompleteStepWarning."""
        return list(self._scan()[0])

    def incomplete_steps(self) -> list[int]:
        """Numbers of the step groups skipped as incomplete (``complete`` missing or false)."""
        return list(self._scan()[1])

    def _is_complete_step_quiet(self, step: int) -> bool:
        try:
            g = _member(self._steps_group, str(step))
        except CheckpointError as exc:
            raise _error(str(exc), self.path, step) from None
        return isinstance(g, h5py.Group) and self._step_state(str(step), g)

    def _group(self, step: int) -> h5py.Group:
        """A complete step's group, its attributes validated (:meth:`step_attrs`) on first use."""
        numbers = self.step_numbers()
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise _error(f"step {step!r} is not an integer", self.path)
        if int(step) not in numbers:
            listed = ", ".join(map(str, numbers)) or "none"
            raise _error(f"no complete step {step} (complete steps: {listed})", self.path)
        g = _member(self._steps_group, str(int(step)))
        if int(step) not in self._checked_steps:
            self._read_step_attrs(g, int(step))
            self._checked_steps.add(int(step))
        return g

    def step_attrs(self, step: int) -> dict[str, Any]:
        """``fisher_type``, ``num_examples`` and every extra attribute of a complete step."""
        return self._read_step_attrs(self._group(step), step)

    def _read_step_attrs(self, g: h5py.Group, step: int) -> dict[str, Any]:
        try:
            with _h5_errors():
                out: dict[str, Any] = {
                    "fisher_type": _attr_str(g.attrs, "fisher_type"),
                    "num_examples": _attr_int(g.attrs, "num_examples"),
                }
                if not out["fisher_type"]:
                    raise CheckpointError("fisher_type is empty (must be a non-empty string)")
                if out["num_examples"] < 0:
                    raise CheckpointError(f"num_examples {out['num_examples']} is negative")
                for key in g.attrs:
                    if key not in RESERVED_STEP_ATTRS:
                        out[key] = _extra_value(key, _attr(g.attrs, key))
        except CheckpointError as exc:
            raise _error(str(exc), self.path, step) from None
        return out

    # --- layers ----------------------------------------------------------------------------------

    def _factors_group(self, step: int) -> h5py.Group:
        g = self._group(step)
        try:
            fg = _member(g, "factors")
        except CheckpointError as exc:
            raise _error(str(exc), self.path, step) from None
        if not isinstance(fg, h5py.Group):
            raise _error("missing factors group", self.path, step)
        return fg

    def layer_names(self, step: int) -> list[str]:
        """Layer names of a step, in the order they were written."""
        with _h5_errors(self.path, step):
            return list(self._factors_group(step))

    def _layer_group(self, step: int, layer: str) -> h5py.Group:
        fg = self._factors_group(step)
        try:
            lg = _member(fg, layer)
        except CheckpointError as exc:
            raise _error(str(exc), self.path, step, layer) from None
        if lg is None:
            raise _error("no such layer in this step", self.path, step, layer)
        if not isinstance(lg, h5py.Group):
            raise _error("is not a group", self.path, step, layer)
        return lg

    def layer_meta(self, step: int, layer: str) -> tuple[str, tuple[int, ...], bool]:
        """``(module_type, weight_shape, has_bias)`` of a layer, validated."""
        lg = self._layer_group(step, layer)
        try:
            with _h5_errors():
                return _read_meta(lg, self.format_version)[:3]
        except CheckpointError as exc:
            raise _error(str(exc), self.path, step, layer) from None

    def factor_kind(self, step: int, layer: str, which: str) -> str:
        """``"diagonal"`` when factor ``which`` (``"A"`` or ``"S"``) is stored as a vector,
        ``"blocks"`` as ``(C, k, k)`` blocks, else ``"dense"``, from the dataset's shape alone (no data
        read, not validated: a missing or malformed factor counts as dense; :meth:`read_factors`
        reports it)."""
        if which not in ("A", "S"):
            raise ValueError(f"factor {which!r}: expected 'A' or 'S'")
        try:
            ds = _member(self._layer_group(step, layer), which)
        except CheckpointError:
            return "dense"
        if not isinstance(ds, h5py.Dataset):
            return "dense"
        return {1: "diagonal", 3: "blocks"}.get(ds.ndim, "dense")

    def check_layers(self, step: int, layers: Iterable[str]) -> None:
        """Check what can be checked of the layers without reading their values: metadata, the
        factors' links, dtypes, shapes, storage and sizes (:func:`curvlab.io.hdf5.check_storage`).
        A command calls this before its work, so that a file damaged anywhere in what it will read
        fails at once, not after the first layers' work; the values are validated when read."""
        for layer in layers:
            lg = self._layer_group(step, layer)
            try:
                with _h5_errors():
                    module_type, weight_shape, has_bias, sizes = _read_meta(lg, self.format_version)
                    meta = _layer_meta_text(module_type, weight_shape, has_bias)
                    for name, size in zip("AS", sizes, strict=True):
                        block = factor_block(module_type, has_bias, name)
                        _factor_dataset(lg, name, size, meta, self._budget, block)
            except CheckpointError as exc:
                raise _error(str(exc), self.path, step, layer) from None

    def read_factors(self, step: int, layer: str) -> LayerFactors:
        """One layer's factors, read and validated (see :func:`validate_layer`)."""
        lg = self._layer_group(step, layer)
        try:
            with _h5_errors():
                module_type, weight_shape, has_bias, sizes = _read_meta(lg, self.format_version)
                meta = _layer_meta_text(module_type, weight_shape, has_bias)
                blocks = [factor_block(module_type, has_bias, name) for name in "AS"]
                arrays = [
                    _read_factor(lg, name, size, meta, self._budget, block)
                    for name, size, block in zip("AS", sizes, blocks, strict=True)
                ]
                _check_scale(arrays[0], arrays[1])
        except CheckpointError as exc:
            raise _error(str(exc), self.path, step, layer) from None
        return LayerFactors(module_type, weight_shape, has_bias, arrays[0], arrays[1])

    def read_coverage(self, step: int) -> dict[str, Any] | None:
        """Which trainable parameters the step's factors cover (:mod:`.coverage`; ``None``: not recorded)."""
        g = self._group(step)
        try:
            with _h5_errors():
                return coverage_format.read(g, self._budget)
        except CheckpointError as exc:
            raise _error(str(exc), self.path, step) from None

    def read_weights(self, step: int) -> dict[str, np.ndarray]:
        """The model parameters stored with a step (``{}`` if none)."""
        return self._read_weights(step) or {}

    def _read_weights(self, step: int) -> dict[str, np.ndarray] | None:
        """Every stored parameter, each checked before it is read, all of them within one array's
        budget together (:mod:`curvlab.limits`), float ones finite."""
        g = self._group(step)
        try:
            wg = _member(g, "weights")
            if wg is None:
                return None
            if not isinstance(wg, h5py.Group):
                raise CheckpointError("weights is not a group")
            with _h5_errors():
                names = list(wg)
                datasets = {name: _member(wg, name) for name in names}
                for name, ds in datasets.items():
                    if not isinstance(ds, h5py.Dataset) or ds.dtype.kind not in "biuf":
                        raise CheckpointError(f"weight {name} is not a numeric dataset")
                total = sum(hdf5.declared_bytes(ds) for ds in datasets.values())
                check_size(f"the {len(datasets)} weights", total, CheckpointError)
                out = {}
                for name, ds in datasets.items():
                    arr = hdf5.read_array(ds, f"weight {name}", self._budget, CheckpointError)
                    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                        raise CheckpointError(f"weight {name} has non-finite values (NaN or inf)")
                    out[name] = arr
        except CheckpointError as exc:
            raise _error(str(exc), self.path, step) from None
        return out


def _open_read_only(path: str) -> h5py.File:
    """A file opened with the checks of :func:`curvlab.io.hdf5.open_file` (no budget kept)."""
    return hdf5.open_file(path, CheckpointError)[0]


def warn_incomplete(path: str, steps: Sequence[int], stacklevel: int = 2) -> None:
    """One :class:`IncompleteStepWarning` for all the incomplete steps of a file."""
    listed = ", ".join(map(str, steps[:_LISTED_STEPS]))
    more = f" and {len(steps) - _LISTED_STEPS} more" if len(steps) > _LISTED_STEPS else ""
    if len(steps) == 1:
        text = f"{path}: step {listed}: incomplete step skipped (attribute complete missing or false: its"
    else:
        text = f"{path}: {len(steps)} incomplete steps skipped ({listed}{more}; attribute complete missing or"
        text += " false: their"
    warnings.warn(
        text + " writer probably died while writing)",
        IncompleteStepWarning,
        stacklevel=stacklevel,
    )


def _check_root(f: h5py.File, path: str) -> int:
    """The root attributes: ``format == FORMAT`` and ``format_version`` this code can read."""
    if "format" not in f.attrs:
        raise _error("not a curvlab checkpoint: root attribute format is missing", path)
    fmt = hdf5.scalar(_attr(f.attrs, "format"))
    if fmt != FORMAT:
        raise _error(f"not a curvlab checkpoint: format is {fmt!r}, expected {FORMAT!r}", path)
    try:
        version = _attr_int(f.attrs, "format_version")
    except CheckpointError as exc:
        raise _error(f"root {exc}", path) from None
    if version > FORMAT_VERSION:
        raise _error(
            f"format_version {version} was written by a newer curvlab (this one reads version "
            f"{FORMAT_VERSION}): upgrade curvlab",
            path,
        )
    if version < 1:
        raise _error(f"format_version {version} is not valid (must be {FORMAT_VERSION})", path)
    return version


def _read_model(f: h5py.File, path: str) -> tuple[str | None, dict | None]:
    name = config = None
    try:
        g = _member(f, "model")
        if g is None:
            return None, None
        if not isinstance(g, h5py.Group):
            raise CheckpointError("is not a group")
        if "name" in g.attrs:
            name = _attr_str(g.attrs, "name")
        if "config" in g.attrs:
            config = parse_config(_attr_str(g.attrs, "config"))
    except CheckpointError as exc:
        raise _error(f"/model: {exc}", path) from None
    return name, config


def _refuse_constant(name: str) -> None:
    raise CheckpointError(f"config holds {name} (JSON numbers must be finite)")


def parse_config(text: str) -> dict:
    """A model config: a JSON object of finite numbers, at most ``MAX_ATTRIBUTE_BYTES`` long."""
    if len(text) > MAX_ATTRIBUTE_BYTES:
        raise CheckpointError(f"config is {len(text)} characters long (at most {MAX_ATTRIBUTE_BYTES})")
    try:
        config = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"config is not valid JSON ({exc})") from None
    except RecursionError:
        raise CheckpointError("config nests too deeply to be a model config") from None
    if not isinstance(config, dict):
        raise CheckpointError("config is valid JSON but not a JSON object")
    return config


def _read_meta(
    lg: h5py.Group, version: int = FORMAT_VERSION
) -> tuple[str, tuple[int, ...], bool, tuple[int, int]]:
    """``module_type, weight_shape, has_bias, (size of A, size of S)`` from a layer group of a file
    of format ``version`` (a module type newer than the file is an error)."""
    module_type = _attr_str(lg.attrs, "module_type")
    if module_type in MODULE_TYPES:
        check_module_type_version(module_type, version)
    raw_shape = _attr(lg.attrs, "weight_shape")
    has_bias = _attr_bool(lg.attrs, "has_bias")
    sizes = expected_factor_sizes(module_type, raw_shape, has_bias)
    return module_type, _check_weight_shape(module_type, raw_shape), has_bias, sizes


def _factor_dataset(
    lg: h5py.Group, name: str, size: int, meta: str, budget: ReadBudget, block: int | None = None
) -> h5py.Dataset:
    """Factor ``name``'s dataset, its dtype, shape (``(size, block, block)`` for blocks) and storage
    checked (no value read)."""
    ds = hdf5.member(lg, name, CheckpointError)
    if ds is None:
        raise CheckpointError(f"missing factor {name}")
    if not isinstance(ds, h5py.Dataset):
        raise CheckpointError(f"{name} is not a dataset")
    _check_dtype(name, ds.dtype)
    _check_shape(name, tuple(ds.shape or ()), size, meta, block)
    hdf5.check_storage(ds, name, budget, CheckpointError)
    return ds


def _read_factor(
    lg: h5py.Group, name: str, size: int, meta: str, budget: ReadBudget, block: int | None = None
) -> np.ndarray:
    ds = _factor_dataset(lg, name, size, meta, budget, block)
    arr = hdf5.read_array(ds, name, budget, CheckpointError)
    _check_values(name, arr)
    return arr


def _as_patterns(layers: str | Iterable[str] | None) -> list[str] | None:
    if layers is None:
        return None
    return [layers] if isinstance(layers, str) else list(layers)


def _select_steps(reader: CheckpointReader, steps: object) -> list[int]:
    """``None`` (all), ``"latest"``, an int or a list of ints, as a sorted list of step numbers."""
    available = reader.step_numbers()
    if steps is None:
        return available
    if steps == "latest":
        if not available:
            raise _error("holds no complete step", reader.path)
        return [available[-1]]
    if isinstance(steps, (int, np.integer)):
        wanted = [steps]
    elif isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
        raise _error(f"steps={steps!r}: expected None, 'latest', an int or a list of ints",
                     reader.path)
    else:
        wanted = list(steps)
    for n in wanted:
        reader._group(n)  # raises a one-line error for an unknown or non-integer step
    return sorted({int(n) for n in wanted})


def load(
    path: str | os.PathLike,
    *,
    steps: int | str | Sequence[int] | None = None,
    layers: str | Sequence[str] | None = None,
    weights: bool = True,
) -> Checkpoint:
    """Read and validate a checkpoint (complete steps only; incomplete ones warn and are skipped).

    ``steps``: ``None`` (all), ``"latest"``, a step number or a list of them. ``layers``: ``None``
    (all) or an ``fnmatch`` glob or list of globs on layer names (case-sensitive); a glob matching
    no layer of any selected step is an error. ``weights=False`` skips the stored parameters
    (``Step.weights`` is then ``None``, as it is for a step stored without weights).
    """
    with CheckpointReader(path) as reader:
        numbers = _select_steps(reader, steps)
        patterns = _as_patterns(layers)
        used: set[str] = set()
        out: dict[int, Step] = {}
        for n in numbers:
            out[n] = _load_step(reader, n, patterns, used, weights)
        unused = [p for p in patterns or [] if p not in used]
        if unused and numbers:
            raise _error(f"layers: pattern {unused[0]!r} matches no layer", reader.path)
        return Checkpoint(
            path=reader.path,
            format_version=reader.format_version,
            model_name=reader.model_name,
            model_config=reader.model_config,
            steps=out,
        )


def _load_step(
    reader: CheckpointReader, n: int, patterns: list[str] | None, used: set[str], weights: bool
) -> Step:
    attrs = reader.step_attrs(n)
    factors = {}
    for name in reader.layer_names(n):
        if patterns is not None:
            hits = [p for p in patterns if fnmatch.fnmatchcase(name, p)]
            used.update(hits)
            if not hits:
                continue
        factors[name] = reader.read_factors(n, name)
    return Step(
        step=n,
        fisher_type=attrs.pop("fisher_type"),
        num_examples=attrs.pop("num_examples"),
        factors=factors,
        weights=reader._read_weights(n) if weights else None,
        attrs=attrs,
        coverage=reader.read_coverage(n),
    )
