"""Own models: ``--model PATH.py:FUNC`` or ``--model package.module:FUNC`` (docs/models.md, "Own models").

A *factory* is a function of the user's that returns a ``torch.nn.Module``. It is called with the
``--model-arg key=value`` items as keyword arguments (values parsed as JSON where they parse,
:func:`curvlab.usercode.parse_factory_args`), plus ``input_shape`` (one example's shape, from the
data) and ``num_classes`` when it has parameters of those names and the arguments do not give them.

Its *config*, recorded in a checkpoint's ``/model`` (docs/format.md), is
``{"factory", "factory_file", "factory_sha256", "args", "input_shape", "num_classes"}``: the spec as
the user wrote it, the absolute path and sha256 of the file that defined the function, the
arguments it was called with, and the data's shape and class count (``null`` when unknown). A
config read from a file is never acted on by itself (:mod:`curvlab.usercode`):
:func:`rebuild_factory_model` needs the spec and arguments from the user, and then compares them
and the file's sha256 with the recorded ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from curvlab.errors import ModelError
from curvlab.models.budget import build_own_within_budget
from curvlab.usercode import Factory, check_recorded, json_safe, load_factory, recorded_factory

__all__ = ["build_factory_model", "check_forward", "factory_config", "rebuild_factory_model"]


def factory_config(
    factory: Factory,
    input_shape: Sequence[int] | None,
    num_classes: int | None,
    args: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The JSON-serialisable config of a model built by ``factory`` (see the module docstring)."""
    return {
        **factory.record(),
        "args": json_safe(dict(args or {}), f"--model {factory.text}: its arguments", ModelError),
        "input_shape": None if input_shape is None else [int(v) for v in input_shape],
        "num_classes": None if num_classes is None else int(num_classes),
    }


def build_factory_model(
    spec: str | Factory,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    args: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Call the factory ``spec`` (a spec the caller named, or a loaded :class:`Factory`).

    The factory is called twice: first on PyTorch's ``meta`` device, to refuse a model over the memory
    budget before it is allocated (:func:`~curvlab.models.budget.build_own_within_budget`; skipped when
    the factory's code cannot run there), then for real. Returns the module it builds; its config is
    remembered (:func:`curvlab.models.config_of`), so that
    :func:`curvlab.save_factors` records it. Raises :class:`ModelError` (one line) for a missing
    file, an exception in the user's code, a wrong argument or a result that is not an ``nn.Module``.
    """
    from curvlab.models import remember_config

    factory = spec if isinstance(spec, Factory) else load_factory(spec, "--model", ModelError)
    offered: dict[str, Any] = {}
    if input_shape is not None:
        offered["input_shape"] = tuple(int(v) for v in input_shape)
    if num_classes is not None:
        offered["num_classes"] = int(num_classes)
    model = build_own_within_budget(
        f"--model {factory.text}", lambda: factory.call(dict(args or {}), offered)
    )
    if not isinstance(model, nn.Module):
        raise ModelError(f"--model {factory.text}: the factory returned an object of type "
                         f"{type(model).__name__}, not a torch.nn.Module")
    remember_config(model, factory_config(factory, input_shape, num_classes, args))
    return model


def rebuild_factory_model(
    recorded: Mapping[str, Any],
    spec: str,
    args: Mapping[str, Any] | None,
    where: str,
) -> nn.Module:
    """The model a checkpoint recorded as built by a factory, rebuilt with the factory the user named.

    ``spec`` and ``args`` come from the user (``args`` ``None``: no ``--model-arg`` given). The recorded
    input shape and class count are offered to the factory; the recorded arguments and the file's
    sha256 are only compared (:func:`curvlab.usercode.check_recorded`).
    """
    factory = load_factory(spec, "--model", ModelError)
    if recorded_factory(recorded):  # (a registry model's record has nothing to compare a factory with)
        check_recorded(factory, args or {}, recorded, where, args_given=args is not None, error=ModelError)
    shape = recorded.get("input_shape")
    classes = recorded.get("num_classes")
    if shape is not None and not (isinstance(shape, list) and all(_count(v) for v in shape)):
        raise ModelError(
            f"{where}: /model config: input_shape must be a list of positive integers, got {shape!r}")
    if classes is not None and not _count(classes):
        raise ModelError(f"{where}: /model config: num_classes must be a positive integer, got {classes!r}")
    return build_factory_model(factory, shape, classes, args)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_forward(model: nn.Module, data: Any, where: str) -> None:
    """One forward pass of the user's model on the data's first two examples, in eval mode and without
    gradients (no batch-norm statistics change): an exception there — a shape that does not fit, a
    dtype — is one :class:`ModelError` line naming the model and data, before any work starts."""
    import torch

    from curvlab.usercode import describe_exception

    training = model.training
    parameter = next(model.parameters(), None)
    x = data.x[:2]
    if parameter is not None:
        x = x.to(parameter.device)
        if x.is_floating_point():
            x = x.to(parameter.dtype)
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    except Exception as exc:  # noqa: BLE001 (the user's model: any failure is one line)
        raise ModelError(f"{where}: the forward pass on inputs of shape {tuple(x.shape)} raised "
                         f"{describe_exception(exc)}") from None
    finally:
        model.train(training)
