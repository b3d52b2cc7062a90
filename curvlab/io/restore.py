"""Rebuild a model from a checkpoint: its ``/model`` config and the weights of one step.

Weights are read from HDF5 (never unpickled) and must be finite; a checkpoint without weights, without
a model config, or whose weights do not fit the rebuilt model gives a one-line :class:`CheckpointError`.

A model that a user's factory built (its config names ``"factory"``) is rebuilt only with the factory
the user names now (``model``, ``model_args``): the recorded spec is never imported or called
(:mod:`curvlab.usercode`, docs/models.md "Own models").

A checkpoint is untrusted (docs/reliability.md), so before a command works with its model:
:func:`check_data_fits` (the data has the input shape the model was built for and no more classes)
and :func:`check_outputs` (the outputs on a first batch are finite, naming the first layer whose output
is not, and a softmax is not saturated on every example: when the logits of each example and location
spread over more than :data:`SATURATED_SPREAD`, every predicted probability is exactly 0 or 1 in
float64 and the Fisher is exactly zero — weights of 1e30 do this). The data a checkpoint records is
read only when it is embedded or the user names it (``curvlab.commands.common._load_data``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from curvlab.errors import CheckpointError, DataError
from curvlab.io.checkpoint import CheckpointReader
from curvlab.models import build_from_config
from curvlab.models.factory import rebuild_factory_model
from curvlab.usercode import is_factory_spec, recorded_factory, require_named


@dataclass
class StepWeights:
    """What a checkpoint step says about its model: name, config, step number and weights."""

    path: str
    model_name: str | None
    config: dict[str, Any] | None
    step: int
    weights: dict[str, np.ndarray]


def read_step_weights(path: str, step: int | None = None) -> StepWeights:
    """The weights of ``step`` (default: the latest complete step) and the model's name and config."""
    with CheckpointReader(path) as reader:
        steps = reader.step_numbers()
        if not steps:
            raise CheckpointError(f"{path}: no complete step to take weights from")
        chosen = steps[-1] if step is None else step
        if chosen not in steps:
            raise CheckpointError(f"{path}: step {chosen}: no such complete step (has {steps})")
        weights = reader.read_weights(chosen)
        if not weights:
            raise CheckpointError(f"{path}: step {chosen}: holds no model weights")
        return StepWeights(path, reader.model_name, reader.model_config, chosen, weights)


def load_weights(model: nn.Module, source: StepWeights) -> None:
    """Load numpy weights into ``model``, naming the first parameter that does not fit."""
    state = model.state_dict()
    missing = sorted(set(state) - set(source.weights))
    unexpected = sorted(set(source.weights) - set(state))
    where = f"{source.path}: step {source.step}"
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise CheckpointError(
            f"{where}: weights do not fit the model ({what}); pass the --model and --model-arg the "
            "checkpoint was written with"
        )
    for key, value in source.weights.items():
        if tuple(value.shape) != tuple(state[key].shape):
            raise CheckpointError(
                f"{where}: weights {key}: shape {tuple(value.shape)} does not fit the model's "
                f"{tuple(state[key].shape)}"
            )
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in source.weights.items()})


def rebuild_model(
    path: str,
    step: int | None = None,
    *,
    model: str | None = None,
    model_args: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, StepWeights]:
    """The model a checkpoint was written with, holding the weights of ``step``, in eval mode.

    ``model`` / ``model_args``: what the user named (``--model``, ``--model-arg``; ``None``: not
    given). A factory-built model needs them (see the module docstring); a registry model is rebuilt
    from its recorded config, or as the user names it.
    """
    source = read_step_weights(path, step)
    recorded = recorded_factory(source.config) or (
        source.model_name if is_factory_spec(source.model_name) else None)
    if is_factory_spec(model):
        built = rebuild_factory_model(source.config or {}, model or "", model_args, path)
    elif model is not None:
        built = _registry_model(source, model, model_args, path)
    elif recorded is not None:
        require_named(recorded, model, path, args=(source.config or {}).get("args"), error=CheckpointError)
        raise AssertionError("unreachable")  # pragma: no cover (require_named raised)
    else:
        if not source.config:
            raise CheckpointError(f"{path}: has no /model config: cannot rebuild its model (pass --model)")
        try:
            built = build_from_config(source.config)
        except Exception as exc:  # a config from another version or hand-written: say which file
            raise CheckpointError(f"{path}: cannot rebuild its model from /model config: {exc}") from None
    load_weights(built, source)
    return built.eval(), source


def _registry_model(source: StepWeights, name: str, args: Mapping[str, Any] | None, path: str) -> nn.Module:
    """A registry model the user named, with the recorded shape (and arguments, if they give none)."""
    config = dict(source.config or {})
    if args is None and config.get("name") == name:
        args = config.get("args") or {}
    shape, classes = config.get("input_shape"), config.get("num_classes")
    if shape is None or classes is None:
        raise CheckpointError(f"{path}: /model config has no input_shape and num_classes to build {name} for")
    return build_from_config({"name": name, "input_shape": shape, "num_classes": classes, "args": args or {}})


def check_data_fits(source: StepWeights, spec: str, input_shape: tuple[int, ...], num_classes: int) -> None:
    """The data's example shape is the model's input shape, and its classes are among the model's."""
    config = source.config or {}
    shape, classes = config.get("input_shape"), config.get("num_classes")
    if isinstance(shape, list) and tuple(shape) != tuple(input_shape):
        raise DataError(
            f"--data {spec}: examples of shape {tuple(input_shape)}, but the model of {source.path} takes "
            f"{tuple(shape)}"
        )
    if isinstance(classes, int) and num_classes > classes:
        raise DataError(
            f"--data {spec}: {num_classes} classes, but the model of {source.path} has {classes} outputs"
        )


#: Logit spread beyond which softmax probabilities are exactly 0 or 1 in float64 (exp(-745) == 0).
SATURATED_SPREAD = 745.0


def check_outputs(model: nn.Module, inputs: Any, where: str, *, forward: Any = None,
                  saturation: bool = True) -> None:
    """Refuse a model whose outputs on ``inputs`` are not finite (naming the first such module), or,
    with ``saturation`` (a softmax loss), whose logits are saturated on every example (module doc).
    ``forward(model, inputs)`` gives the logits (default ``model(inputs)``)."""
    first: list[str] = []

    def hook(name: str):
        def record(module: nn.Module, args: object, output: object) -> None:
            if not first and isinstance(output, torch.Tensor) and output.is_floating_point():
                if not torch.isfinite(output).all():
                    first.append(name)

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            out = forward(model, inputs) if forward is not None else model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    if first or (isinstance(out, torch.Tensor) and not torch.isfinite(out).all()):
        layer = f"layer {first[0]}" if first else "the output"
        raise CheckpointError(
            f"{where}: the model's {layer} is not finite (NaN or inf) on the first batch: weights too large?"
        )
    if saturation and isinstance(out, torch.Tensor) and out.ndim >= 2 and out.shape[-1] > 1:
        spread = out.amax(dim=-1) - out.amin(dim=-1)
        if bool((spread > SATURATED_SPREAD).all()):
            raise CheckpointError(
                f"{where}: the model's logits spread over {float(spread.min()):.3g} or more on every example "
                f"of the first batch (beyond {SATURATED_SPREAD:g}, softmax is exactly 0 or 1 and the Fisher "
                "is zero): weights too large?"
            )
