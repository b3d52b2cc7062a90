"""Own data: ``--data PATH.py:FUNC`` or ``--data package.module:FUNC`` (docs/data.md, "Own data").

The factory is called with no arguments, plus ``split`` (``"train"``, ``"test"`` or ``"all"``) when
it has a parameter of that name; without one it can only serve ``train``/``all`` (the whole of what it
returns). It returns one of

* a map-style ``torch.utils.data.Dataset`` whose items are ``(x, y)`` pairs (``len`` and indexing),
  or an iterable one (then ``limit`` bounds how many items are taken: ``--examples`` is required);
* a pair ``(x, y)`` of tensors or numpy arrays, one example per row;
* a dict ``{"x": ..., "y": ..., "num_classes": ...}`` (``num_classes`` optional);
* a :class:`~curvlab.io.data.dataset.Dataset`.

The examples are stacked into a :class:`Dataset` held in memory: ``x`` a float tensor (any shape per
example; float64 is kept, other floats become float32) or an int64 tensor of token ids, ``y`` int64
class labels ``>= 0``. ``num_classes`` is the data set's ``num_classes`` attribute or key, else
``1 + max(y)``. Non-finite inputs, float or negative labels, rows that differ in shape and a first
dimension that differs between ``x`` and ``y`` are one-line :class:`DataError` s naming the spec.
The factory is user code: it runs only when the user names it (:mod:`curvlab.usercode`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from curvlab.errors import DataError
from curvlab.io.data.dataset import Dataset
from curvlab.usercode import describe_exception, load_factory

__all__ = ["load_factory_data"]


def load_factory_data(spec: str, split: str = "train", limit: int | None = None) -> Dataset:
    """The data set built by the factory ``spec`` (one the caller named), ``limit`` examples at most."""
    factory = load_factory(spec, "--data", DataError)
    if split == "test" and not factory.accepts("split"):
        raise DataError(f"--data {spec}: the factory has no 'split' parameter, so it has no test split")
    result = factory.call({}, {"split": split})
    where = f"--data {spec}"
    declared = getattr(result, "num_classes", None)
    if isinstance(result, Dataset):
        x, y, declared = result.x, result.y, result.num_classes
    elif isinstance(result, Mapping):
        missing = [key for key in ("x", "y") if key not in result]
        if missing:
            raise DataError(
                f"{where}: the returned dict has no {missing[0]!r} (keys: {sorted(map(str, result))})")
        x, y, declared = result["x"], result["y"], result.get("num_classes")
    elif isinstance(result, tuple) and len(result) == 2:
        x, y = result
    elif isinstance(result, torch.utils.data.Dataset):
        x, y = _stack_items(result, limit, where)
    else:
        raise DataError(f"{where}: the factory returned a {type(result).__name__}; expected a "
                        "torch.utils.data.Dataset, an (x, y) pair of tensors or a dict with x and y")
    x, y = _tensor(x, where, "x"), _tensor(y, where, "y")
    if limit is not None and limit < x.shape[0]:
        x, y = x[:limit].clone(), y[:limit].clone()
    x, y = _checked(x, y, where)
    num_classes = _num_classes(declared, y, where)
    return Dataset(x, y, num_classes, spec, split)


def _stack_items(data: torch.utils.data.Dataset, limit: int | None, where: str) -> tuple[Tensor, Tensor]:
    """The ``(x, y)`` items of a torch data set, stacked (the first ``limit``)."""
    try:
        count = len(data)  # type: ignore[arg-type]
    except TypeError:
        count = None
    if count is None and limit is None:
        raise DataError(f"{where}: an iterable data set without a length: give --examples N to bound it")
    wanted = count if limit is None else limit if count is None else min(count, limit)
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    try:
        items = (data[i] for i in range(wanted)) if count is not None else iter(data)
        for k, item in enumerate(items):
            if k >= wanted:
                break
            if not isinstance(item, tuple | list) or len(item) != 2:
                raise DataError(f"{where}: item {k} is a {type(item).__name__}, not an (x, y) pair")
            xs.append(_tensor(item[0], where, f"item {k}: x"))
            ys.append(_tensor(item[1], where, f"item {k}: y"))
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 (the user's data set: any failure is one line)
        raise DataError(f"{where}: reading item {len(xs)} raised {describe_exception(exc)}") from None
    if not xs:
        raise DataError(f"{where}: the data set is empty")
    for k, (a, b) in enumerate(zip(xs, ys, strict=True)):
        if a.shape != xs[0].shape or b.shape != ys[0].shape:
            raise DataError(f"{where}: item {k} has shapes x {tuple(a.shape)}, y {tuple(b.shape)}; "
                            f"item 0 has x {tuple(xs[0].shape)}, y {tuple(ys[0].shape)}")
    return torch.stack(xs), torch.stack(ys)


def _tensor(value: Any, where: str, what: str) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise DataError(f"{where}: {what} has dtype {value.dtype}; expected numbers")
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, int | float) and not isinstance(value, bool):
        return torch.tensor(value)
    raise DataError(f"{where}: {what} is a {type(value).__name__}, not a tensor or numpy array")


def _checked(x: Tensor, y: Tensor, where: str) -> tuple[Tensor, Tensor]:
    if x.ndim < 1 or x.shape[0] == 0:
        raise DataError(f"{where}: x holds no examples (shape {tuple(x.shape)})")
    if y.ndim < 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"{where}: x has {x.shape[0]} examples but y has shape {tuple(y.shape)}")
    if x.is_floating_point():
        if not bool(torch.isfinite(x).all()):
            raise DataError(f"{where}: x holds NaN or infinite values")
        if x.dtype != torch.float64:
            x = x.to(torch.float32)
    elif x.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        x = x.to(torch.int64)  # token ids (an Embedding's input)
    else:
        raise DataError(f"{where}: x has dtype {x.dtype}; expected floats or integer token ids")
    if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        raise DataError(f"{where}: y has dtype {y.dtype}; expected integer class labels")
    y = y.to(torch.int64)
    if int(y.min()) < 0:
        raise DataError(f"{where}: y holds a negative label ({int(y.min())})")
    return x, y


def _num_classes(declared: Any, y: Tensor, where: str) -> int:
    largest = int(y.max())
    if declared is None:
        return largest + 1
    if isinstance(declared, bool) or not isinstance(declared, int | np.integer) or declared <= largest:
        raise DataError(f"{where}: num_classes must be an integer above the largest label {largest}, "
                        f"got {declared!r}")
    return int(declared)
