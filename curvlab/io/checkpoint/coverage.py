"""The optional ``/steps/<step>/coverage`` group: which trainable parameters a step's factors cover.

Factor capture reports every trainable parameter of the model (docs/factors.md, "Coverage"): covered
by an entry, or skipped with a reason. A step records the counts and the skipped parameters::

    /steps/<step>/coverage          attrs: covered_parameters, total_parameters (int64, >= 0)
        skipped_name                (k,) variable-length UTF-8 strings: parameter names
        skipped_parameters          (k,) int64 > 0: how many of each one's entries have no factors
        skipped_reason              (k,) variable-length UTF-8 strings: why

with ``covered_parameters + Σ skipped_parameters = total_parameters``. As a Python object (``Step.
coverage``, ``FactorSet.coverage.to_json()``) it is ``{"covered_parameters", "total_parameters",
"skipped": [{"name", "parameters", "reason"}]}``. Read through :mod:`curvlab.io.hdf5` (an untrusted
file: links inside the file only, declared sizes checked before reading). h5py and numpy only.
"""

from __future__ import annotations

from typing import Any

import h5py
import numpy as np

from curvlab.errors import CheckpointError
from curvlab.io import hdf5
from curvlab.limits import ReadBudget

GROUP = "coverage"
#: At most this many skipped entries are written or read (a model has far fewer Parameters).
MAX_SKIPPED = 1_000_000


def validate(coverage: Any) -> dict[str, Any]:
    """``coverage`` as a clean dict, or :class:`CheckpointError` (without a location)."""
    if not isinstance(coverage, dict):
        raise CheckpointError(f"coverage is a {type(coverage).__name__}, not a dict")
    try:
        covered, total = coverage["covered_parameters"], coverage["total_parameters"]
        skipped = list(coverage.get("skipped", []))
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"coverage lacks {exc}") from None
    for key, value in (("covered_parameters", covered), ("total_parameters", total)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
            raise CheckpointError(f"coverage {key} {value!r} is not a non-negative integer")
    if len(skipped) > MAX_SKIPPED:
        raise CheckpointError(f"coverage lists {len(skipped)} skipped parameters (at most {MAX_SKIPPED})")
    clean = []
    for item in skipped:
        try:
            name, count, reason = item["name"], item["parameters"], item["reason"]
        except (KeyError, TypeError):
            raise CheckpointError("a skipped coverage entry needs name, parameters and reason") from None
        if not isinstance(name, str) or not isinstance(reason, str) or "\0" in name + reason:
            raise CheckpointError(f"skipped coverage entry {name!r}: name and reason must be strings")
        if isinstance(count, (bool, np.bool_)) or not isinstance(count, (int, np.integer)) or count < 1:
            raise CheckpointError(
                f"skipped coverage entry {name}: parameters {count!r} is not a positive integer"
            )
        clean.append({"name": name, "parameters": int(count), "reason": reason})
    if int(covered) + sum(item["parameters"] for item in clean) != int(total):
        raise CheckpointError(
            f"coverage does not add up: {covered} covered + {sum(i['parameters'] for i in clean)} skipped "
            f"!= {total} total parameters"
        )
    return {"covered_parameters": int(covered), "total_parameters": int(total), "skipped": clean}


def write(step_group: h5py.Group, coverage: dict[str, Any]) -> None:
    """The coverage group of a step (``coverage`` already :func:`validate`-d)."""
    g = step_group.create_group(GROUP)
    g.attrs["covered_parameters"] = np.int64(coverage["covered_parameters"])
    g.attrs["total_parameters"] = np.int64(coverage["total_parameters"])
    text = h5py.string_dtype("utf-8")
    skipped = coverage["skipped"]
    g.create_dataset("skipped_name", data=[s["name"] for s in skipped], dtype=text, shape=(len(skipped),))
    g.create_dataset("skipped_parameters", data=np.array([s["parameters"] for s in skipped], dtype=np.int64))
    g.create_dataset("skipped_reason", data=[s["reason"] for s in skipped], dtype=text, shape=(len(skipped),))


def _dataset(g: h5py.Group, name: str, kinds: str, what: str) -> h5py.Dataset:
    try:
        ds = hdf5.member(g, name, CheckpointError)
    except CheckpointError as exc:
        raise CheckpointError(f"coverage: {exc}") from None
    if not isinstance(ds, h5py.Dataset) or ds.ndim != 1 or ds.dtype.kind not in kinds:
        raise CheckpointError(f"coverage: {name} must be a 1-D {what} dataset")
    if ds.shape[0] > MAX_SKIPPED:
        raise CheckpointError(f"coverage: {name} has {ds.shape[0]} entries (at most {MAX_SKIPPED})")
    return ds


def _strings(g: h5py.Group, name: str, budget: ReadBudget) -> list[str]:
    ds = _dataset(g, name, "OS", "string")
    values = hdf5.read_array(ds, f"coverage: {name}", budget, CheckpointError)
    try:
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]
    except UnicodeDecodeError:
        raise CheckpointError(f"coverage: {name} holds a string that is not UTF-8") from None


def read(step_group: h5py.Group, budget: ReadBudget) -> dict[str, Any] | None:
    """A step's coverage (``None`` when it records none), validated; ``budget``: the file's
    (:class:`~curvlab.limits.ReadBudget`)."""
    g = hdf5.member(step_group, GROUP, CheckpointError)
    if g is None:
        return None
    if not isinstance(g, h5py.Group):
        raise CheckpointError("coverage is not a group")
    names, reasons = _strings(g, "skipped_name", budget), _strings(g, "skipped_reason", budget)
    counts_ds = _dataset(g, "skipped_parameters", "iu", "integer")
    counts = hdf5.read_array(counts_ds, "coverage: skipped_parameters", budget, CheckpointError)
    if not len(names) == len(reasons) == len(counts):
        raise CheckpointError(
            "coverage: skipped_name, skipped_parameters and skipped_reason differ in length"
        )
    attrs = {}
    for key in ("covered_parameters", "total_parameters"):
        if key not in g.attrs:
            raise CheckpointError(f"coverage: missing attribute {key}")
        value = np.asarray(hdf5.attribute(g.attrs, key, CheckpointError))
        if value.size != 1 or value.dtype.kind not in "iu":
            raise CheckpointError(f"coverage: {key} is not an integer")
        attrs[key] = int(value.reshape(()))
    skipped = [
        {"name": n, "parameters": int(c), "reason": r} for n, c, r in zip(names, counts, reasons, strict=True)
    ]
    return validate({**attrs, "skipped": skipped})
