"""Writing checkpoints: :func:`save` (a new file) and :func:`append_step` (one more step), crash-safe.

Files are never modified in place: :func:`save` and :func:`append_step` write a temporary file in
the target folder (``.<name>.tmp-<pid>-<random>``), fsync it and ``os.replace`` it onto the target,
so a crash at any moment leaves either the old file or the new one. :func:`append_step` does this by
copy-and-rename: it copies the file, writes the step into the copy and renames the copy into place.
Within a step, ``complete = True`` (:func:`_mark_complete`) is the last thing written, so a reader
skips a step whose writer died. Everything is validated (:mod:`.format`) before a byte is written.
No pickle anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import h5py
import numpy as np

from curvlab.errors import CheckpointError
from curvlab.io.atomic import commit, remove_quietly, temp_path
from curvlab.io.checkpoint import coverage as coverage_format
from curvlab.io.checkpoint.format import (
    FORMAT,
    FORMAT_VERSION,
    LayerFactors,
    Step,
    _check_attr_value,
    _error,
    _model_config_json,
    _one_line,
    _validate_step,
)
from curvlab.io.checkpoint.reader import CheckpointReader


def _mark_complete(group: h5py.Group) -> None:
    """Written after everything else in the step: a reader ignores steps without it."""
    group.file.flush()
    group.attrs["complete"] = np.bool_(True)


def _write_layer(parent: h5py.Group, name: str, factors: LayerFactors) -> None:
    g = parent.create_group(name)
    g.attrs["module_type"] = factors.module_type
    g.attrs["weight_shape"] = np.asarray(factors.weight_shape, dtype=np.int64)
    g.attrs["has_bias"] = np.bool_(factors.has_bias)
    g.create_dataset("A", data=factors.A)
    g.create_dataset("S", data=factors.S)


def _write_step(steps_group: h5py.Group, step: Step) -> None:
    """One ``/steps/<step>`` group; ``complete = True`` is the last thing written."""
    g = steps_group.create_group(str(int(step.step)), track_order=True)
    g.attrs["step"] = np.int64(step.step)
    g.attrs["fisher_type"] = step.fisher_type
    g.attrs["num_examples"] = np.int64(step.num_examples)
    for key, value in step.attrs.items():
        g.attrs[key] = _check_attr_value(key, value)
    fg = g.create_group("factors", track_order=True)
    for name, factors in step.factors.items():
        _write_layer(fg, name, factors)
    if step.weights is not None:
        wg = g.create_group("weights", track_order=True)
        for name, w in step.weights.items():
            wg.create_dataset(name, data=np.asarray(w))
    if step.coverage is not None:
        coverage_format.write(g, step.coverage)
    _mark_complete(g)


def _write_model(f: h5py.File, name: str | None, config_json: str | None) -> None:
    if name is None and config_json is None:
        return
    g = f.require_group("model")
    if name is not None:
        g.attrs["name"] = str(name)
    if config_json is not None:
        g.attrs["config"] = config_json


def _as_step_list(steps: Step | Sequence[Step]) -> list[Step]:
    return [steps] if isinstance(steps, Step) else list(steps)


def save(
    path: str | os.PathLike,
    steps: Step | Sequence[Step],
    *,
    model_name: str | None = None,
    model_config: Mapping | None = None,
) -> None:
    """Write a new checkpoint holding ``steps`` (replacing any file at ``path``), atomically.

    Everything is validated first (a failure leaves an existing file untouched); the file is then
    written to ``.<name>.tmp-<pid>-<random>`` in the same folder, fsynced and renamed onto
    ``path`` with ``os.replace``. The temp file is removed if anything fails.
    """
    path_s = os.fspath(path)
    step_list = _as_step_list(steps)
    seen: set[int] = set()
    for step in step_list:
        _validate_step(step, path_s)
        if int(step.step) in seen:
            raise _error(f"step {step.step} is given twice", path_s)
        seen.add(int(step.step))
    config_json = _model_config_json(model_config, path_s)
    target = os.path.realpath(path_s)  # through a symlink: replace the file it points to
    if not os.path.isdir(os.path.dirname(target)):
        raise _error(f"cannot write: folder {os.path.dirname(target)} does not exist", path_s)
    tmp = temp_path(target)
    try:
        with _write_errors(path_s):
            with h5py.File(tmp, "w-") as f:
                f.attrs["format"] = FORMAT
                f.attrs["format_version"] = np.int64(FORMAT_VERSION)
                _write_model(f, model_name, config_json)
                steps_group = f.create_group("steps", track_order=True)
                for step in sorted(step_list, key=lambda s: int(s.step)):
                    _write_step(steps_group, step)
            commit(tmp, target)
    except BaseException:
        remove_quietly(tmp)
        raise


@contextmanager
def _write_errors(path: str) -> Iterator[None]:
    try:
        yield
    except CheckpointError:
        raise
    except (OSError, RuntimeError, ValueError, TypeError) as exc:
        raise _error(f"cannot write checkpoint ({_one_line(str(exc))})", path) from exc


def append_step(
    path: str | os.PathLike,
    step: Step,
    *,
    replace: bool = False,
    model_name: str | None = None,
    model_config: Mapping | None = None,
) -> None:
    """Add one step to the checkpoint at ``path`` (created with :func:`save` if it is missing).

    Crash-safe by copy-and-rename: the file is copied to ``.<name>.tmp-<pid>-<random>`` in the same
    folder, the step is written into the copy (``complete`` last), the copy is fsynced and renamed
    onto ``path``, and the folder is fsynced. Killed at any moment, the file holds either the old
    steps or the old steps plus the new one. Cost: one full copy of the file per call.

    A complete step with the same number is an error unless ``replace=True``; an incomplete one is
    replaced. ``model_name`` / ``model_config`` are written if the file has none and must agree
    with what it has otherwise (one file holds one training run).
    """
    path_s = os.fspath(path)
    _validate_step(step, path_s)
    config_json = _model_config_json(model_config, path_s)
    if not os.path.exists(path_s):
        save(path_s, step, model_name=model_name, model_config=model_config)
        return
    with CheckpointReader(path_s) as reader:
        _check_model_agrees(reader, model_name, config_json)
        exists = reader._is_complete_step_quiet(int(step.step))
    if exists and not replace:
        raise _error(
            "already holds a complete step with this number (pass replace=True to overwrite it)",
            path_s,
            int(step.step),
        )
    target = os.path.realpath(path_s)  # through a symlink: update the file it points to
    tmp = temp_path(target)
    try:
        with _write_errors(path_s):
            shutil.copyfile(target, tmp)
            _copy_mode(target, tmp)
            with h5py.File(tmp, "r+") as f:
                steps_group = f["steps"]
                if str(int(step.step)) in steps_group:
                    del steps_group[str(int(step.step))]
                _write_model(f, model_name, config_json)
                _write_step(steps_group, step)
                # the file may now hold what only this version's readers know (a version-1 file grows up)
                f.attrs["format_version"] = np.int64(FORMAT_VERSION)
            commit(tmp, target)
    except BaseException:
        remove_quietly(tmp)
        raise


def _copy_mode(src: str, dst: str) -> None:
    try:
        shutil.copymode(src, dst)
    except OSError:
        pass


def _check_model_agrees(
    reader: CheckpointReader, model_name: str | None, config_json: str | None
) -> None:
    if model_name is not None and reader.model_name not in (None, model_name):
        raise _error(
            f"model name {model_name!r} differs from the file's {reader.model_name!r}",
            reader.path,
        )
    if config_json is not None and reader.model_config not in (None, json.loads(config_json)):
        raise _error("model_config differs from the config already in the file", reader.path)

