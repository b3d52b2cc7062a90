"""Model registry: build the models of seed F.2 by name, from ``--model-arg key=value``.

The image classifiers take inputs ``(N, C, H, W)`` (``input_shape`` is ``(C, H, W)``) and return
logits ``(N, num_classes)``; the language model ``transformer_shallow`` takes int64 token ids
``(N, T)`` (``input_shape`` is ``(seq_len,)``) and returns logits ``(N, T, num_classes)``. Models are
built deterministically under ``torch.manual_seed``, carry their weights in ``nn.Conv2d``
(``groups=1``), ``nn.Linear`` and (the Transformer) ``nn.Embedding`` layers, plus batch-norm and
layer-norm scales and shifts, and keep readable module paths (``conv1``, ``blocks.0.conv1``, ``fc``)
that become HDF5 layer names. Models whose loss uses label smoothing say so in
``model.label_smoothing``; models with weight constraints list them in ``model.weight_normalized``
(apply with :func:`curvlab.models.layers.project_weights_` after each optimiser step).
See ``docs/models.md``.

A model's full description is its *config* (:func:`model_config`), a JSON-serialisable dict
``{"name", "input_shape", "num_classes", "args"}`` with every argument filled in;
:func:`build_from_config` is its inverse (used to rebuild a model from a checkpoint's ``/model``).
A model built here, or by a user's factory (:mod:`curvlab.models.factory`), remembers its config
(:func:`config_of`), which is what :func:`curvlab.save_factors` records. A config that names a
factory is never built from a file's say-so: :func:`build_from_config` refuses it.
"""

from __future__ import annotations

import math
import numbers
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from curvlab.errors import ModelError
from curvlab.models import mlp, resnet8, resnet32, simple_cnn, transformer, vgg11
from curvlab.models.budget import build_within_budget

__all__ = [
    "available_models",
    "build_from_config",
    "build_model",
    "config_of",
    "recordable_config",
    "data_options",
    "model_config",
    "model_descriptions",
    "parse_model_args",
]

_Check = Callable[[dict[str, Any]], str | None]
_InputCheck = Callable[[Sequence[int]], str | None]
_ConfigCheck = Callable[[tuple[int, ...], int, dict[str, Any]], str | None]


@dataclass(frozen=True)
class _ModelSpec:
    """A registered model: its builder, its argument defaults and its extra checks."""

    builder: Callable[..., nn.Module]
    defaults: Mapping[str, Any]
    description: str
    validate: _Check | None = None
    check_input: _InputCheck | None = None
    allow_empty: frozenset[str] = field(default_factory=frozenset)
    #: the form of ``input_shape``, for error messages; its number of entries is the input rank
    input_form: tuple[str, ...] = ("C", "H", "W")
    #: a check of the resolved input shape and class count against the resolved arguments
    check_config: _ConfigCheck | None = None
    #: arguments that :func:`data_options` passes on to :func:`curvlab.io.data.load_dataset`
    data_keys: tuple[str, ...] = ()


_REGISTRY: dict[str, _ModelSpec] = {
    "mlp": _ModelSpec(
        builder=mlp.build,
        defaults=mlp.DEFAULTS,
        description="flatten, Linear+ReLU hidden layers (widths), Linear classifier",
        allow_empty=frozenset({"widths"}),
    ),
    "simple_cnn": _ModelSpec(
        builder=simple_cnn.build,
        defaults=simple_cnn.DEFAULTS,
        description="2 x (5x5 conv, ReLU, 2x2 max-pool), 1 hidden Linear, classifier (seed F.2)",
        validate=lambda args: _length_check(args, "channels", 2),
        check_input=simple_cnn.check_input,
    ),
    "resnet8": _ModelSpec(
        builder=resnet8.build,
        defaults=resnet8.DEFAULTS,
        description="7 3x3 convs with residual connections, no batch norm, Linear (seed F.2)",
        validate=resnet8.validate,
    ),
    "resnet32": _ModelSpec(
        builder=resnet32.build,
        defaults=resnet32.DEFAULTS,
        description="CIFAR ResNet-32: 31 weight-normalised 3x3 convs, ghost batch norm, Linear; "
        "label smoothing (seed F.2)",
        validate=resnet32.validate,
    ),
    "vgg11": _ModelSpec(
        builder=vgg11.build,
        defaults=vgg11.DEFAULTS,
        description="VGG-11: 8 weight-normalised 3x3 convs, ghost batch norm, max-pools, Linear; "
        "label smoothing (seed F.2)",
        validate=vgg11.validate,
    ),
    "transformer_shallow": _ModelSpec(
        builder=transformer.build,
        defaults=transformer.DEFAULTS,
        description="2-layer decoder-only Transformer LM, tied embedding/pre-softmax weight (seed F.2); "
        "token ids (N, seq_len)",
        validate=transformer.validate,
        input_form=("seq_len",),
        check_config=transformer.check_config,
        data_keys=("vocab", "seq_len"),
    ),
}


def available_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_REGISTRY)


def model_descriptions() -> dict[str, str]:
    """One-line description of each model, with its default arguments (for ``--help``)."""
    out = {}
    for name in available_models():
        spec = _REGISTRY[name]
        defaults = ", ".join(f"{k}={_format_value(v)}" for k, v in spec.defaults.items())
        out[name] = f"{spec.description} [{defaults}]"
    return out


# --------------------------------------------------------------------------- --model-arg parsing


def parse_model_args(items: Sequence[str]) -> dict[str, Any]:
    """Parse repeatable ``--model-arg key=value`` items into a dict.

    A value is read as a bool (``true``/``false``, any case), an int, a float, a comma-separated
    list of ints (``"64,32"`` -> ``[64, 32]``) or of numbers (floats if any entry is not an int),
    else kept as a string. An item without ``=``, with an empty or non-identifier key, or a key
    given twice raises :class:`ModelError`.
    """
    args: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise ModelError(f"--model-arg {item!r}: expected key=value")
        if not key.isidentifier():
            raise ModelError(f"--model-arg {item!r}: {key!r} is not a valid argument name")
        if key in args:
            raise ModelError(f"--model-arg {item!r}: argument {key!r} given twice")
        args[key] = _parse_value(raw.strip())
    return args


def _parse_scalar(text: str) -> int | float | None:
    """``text`` as an int or a finite float, else ``None``."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _parse_value(text: str) -> Any:
    """One ``--model-arg`` value: bool, int, float, list of numbers, else the string itself."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if "," not in text:
        scalar = _parse_scalar(text)
        return text if scalar is None else scalar
    parts = [_parse_scalar(part.strip()) for part in text.split(",")]
    if any(part is None for part in parts):
        return text
    if all(isinstance(part, int) for part in parts):
        return parts
    return [float(part) for part in parts]


def _format_value(value: Any) -> str:
    """A value as it would be written on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


# --------------------------------------------------------------------------- validation


def _spec(name: str) -> _ModelSpec:
    """The registered model ``name``, or :class:`ModelError` listing the valid names."""
    if not isinstance(name, str) or name not in _REGISTRY:
        valid = ", ".join(available_models())
        raise ModelError(f"unknown model {name!r} (valid models: {valid})")
    return _REGISTRY[name]


def _positive_int(value: Any) -> bool:
    """True for a positive integer (a Python or numpy integer, not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def _coerce(name: str, key: str, value: Any, default: Any, allow_empty: bool) -> Any:
    """``value`` checked and converted to the type of ``default``.

    bool; positive int; non-negative finite float (an int is accepted); list of positive ints.
    """
    bad = f"model {name!r}: argument {key!r}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ModelError(f"{bad} must be true or false, got {value!r}")
        return value
    if isinstance(default, float):
        if (
            not isinstance(value, numbers.Real)
            or isinstance(value, bool)
            or not math.isfinite(value)
            or value < 0
        ):
            raise ModelError(f"{bad} must be a non-negative number, got {value!r}")
        return float(value)
    if isinstance(default, int):
        if not _positive_int(value):
            raise ModelError(f"{bad} must be a positive integer, got {value!r}")
        return int(value)
    if isinstance(default, list):
        if _positive_int(value):
            value = [value]
        elif value == "" and allow_empty:
            value = []
        if not isinstance(value, list | tuple) or not all(_positive_int(v) for v in value):
            raise ModelError(
                f"{bad} must be a comma-separated list of positive integers, got {value!r}"
            )
        if not value and not allow_empty:
            raise ModelError(f"{bad} must not be empty")
        return [int(v) for v in value]
    raise AssertionError(f"unsupported default type for {name}.{key}")  # pragma: no cover


def _resolve_args(name: str, args: Mapping[str, Any] | None) -> dict[str, Any]:
    """The model's arguments with defaults filled in, every value checked."""
    spec = _spec(name)
    args = dict(args or {})
    unknown = sorted(set(args) - set(spec.defaults))
    if unknown:
        valid = ", ".join(sorted(spec.defaults))
        raise ModelError(
            f"model {name!r}: unknown argument(s) {', '.join(map(repr, unknown))} (valid: {valid})"
        )
    resolved = {}
    for key, default in spec.defaults.items():
        value = args.get(key, default)
        resolved[key] = _coerce(name, key, value, default, key in spec.allow_empty)
    problem = spec.validate(resolved) if spec.validate else None
    if problem:
        raise ModelError(f"model {name!r}: {problem}")
    return resolved


def _length_check(args: Mapping[str, Any], key: str, length: int) -> str | None:
    """``None`` if ``args[key]`` has ``length`` entries, else why not."""
    if len(args[key]) != length:
        return f"{key} must have {length} entries, got {args[key]}"
    return None


def _resolve_shape(name: str, input_shape: Sequence[int], num_classes: int) -> tuple[int, ...]:
    """``input_shape`` as a tuple of positive ints (``(C, H, W)`` or the model's form); checks
    ``num_classes`` too."""
    form = _spec(name).input_form
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = ()
    if len(shape) != len(form) or not all(_positive_int(v) for v in shape):
        written = f"({', '.join(form)}{',' if len(form) == 1 else ''})"
        raise ModelError(
            f"model {name!r}: input_shape must be {written} positive integers, got {input_shape!r}"
        )
    if not _positive_int(num_classes):
        raise ModelError(
            f"model {name!r}: num_classes must be a positive integer, got {num_classes!r}"
        )
    shape = tuple(int(v) for v in shape)
    check = _spec(name).check_input
    problem = check(shape) if check else None
    if problem:
        raise ModelError(f"model {name!r}: {problem}")
    return shape


# --------------------------------------------------------------------------- public builders


def model_config(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    args: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON-serialisable config ``{"name", "input_shape", "num_classes", "args"}`` of a model.

    Every argument is present (defaults filled in), lists are plain lists; raises
    :class:`ModelError` for an unknown model, an unknown argument or an invalid value.
    """
    spec = _spec(name)
    shape = _resolve_shape(name, input_shape, num_classes)
    resolved = _resolve_args(name, args)
    problem = spec.check_config(shape, int(num_classes), resolved) if spec.check_config else None
    if problem:
        raise ModelError(f"model {name!r}: {problem}")
    return {
        "name": name,
        "input_shape": list(shape),
        "num_classes": int(num_classes),
        "args": resolved,
    }


def data_options(name: str, args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The keyword arguments of :func:`curvlab.io.data.load_dataset` that model ``name`` dictates.

    ``{"vocab": ..., "seq_len": ...}`` (defaults filled in) for ``transformer_shallow``, ``{}`` for
    the image models: ``load_dataset(spec, split=..., **data_options(name, args))`` then yields data
    whose ``input_shape`` and ``num_classes`` fit ``build_model(name, ..., args)``.
    """
    resolved = _resolve_args(name, args)
    return {key: resolved[key] for key in _spec(name).data_keys}


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    args: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Build model ``name`` for inputs ``(N, *input_shape)`` and ``num_classes`` logits.

    ``args`` are the model's arguments (e.g. from :func:`parse_model_args`); missing ones take their
    defaults. Unknown model names, unknown arguments and invalid values raise :class:`ModelError`
    listing the valid names/keys, and a model whose parameters would not fit the memory budget
    (:mod:`curvlab.models.budget`) too. Parameters are drawn from torch's global RNG, so
    ``torch.manual_seed(s)`` before the call makes the model reproducible.
    """
    config = model_config(name, input_shape, num_classes, args)
    builder, shape = _REGISTRY[name].builder, tuple(config["input_shape"])
    model = build_within_budget(f"model {name!r}", lambda: builder(shape, num_classes, **config["args"]))
    remember_config(model, config)
    return model


#: model -> the config it was built from (weak: a model that goes away takes its entry with it)
_CONFIGS: weakref.WeakKeyDictionary[nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()


def remember_config(model: nn.Module, config: Mapping[str, Any]) -> None:
    """Remember the config ``model`` was built from (:func:`config_of` gives it back)."""
    _CONFIGS[model] = dict(config)


def config_of(model: nn.Module) -> dict[str, Any] | None:
    """The config of a model built by :func:`build_model` or by a factory (``None`` for any other
    module): what a checkpoint's ``/model`` records to rebuild it."""
    config = _CONFIGS.get(model)
    return None if config is None else dict(config)


class ConfigWarning(UserWarning):
    """A model's config could not be recorded (whole or in part): rebuilding it will need more."""


def recordable_config(model: nn.Module, where: str) -> dict[str, Any] | None:
    """:func:`config_of` ``model``, for a checkpoint at ``where``; one :class:`ConfigWarning` line says
    what is missing (the whole config of a module curvlab did not build; a shape it was not given)."""
    import warnings

    config = config_of(model)
    if config is None:
        warnings.warn(
            f"{where}: no model config recorded: this {type(model).__name__} was not built by "
            "curvlab.build_model, so `curvlab gradcov` and `factors --weights` cannot rebuild it; build it "
            "with curvlab.build_model (a registry name or your factory PATH.py:FUNC) or pass model_config=",
            ConfigWarning, stacklevel=3)
        return None
    unknown = [key for key in ("input_shape", "num_classes") if config.get(key) is None]
    if unknown:
        warnings.warn(
            f"{where}: model config recorded without {' and '.join(unknown)} (build the model with "
            "input_shape=... and num_classes=... to record them)", ConfigWarning, stacklevel=3)
    return config


def build_from_config(config: Mapping[str, Any]) -> nn.Module:
    """Rebuild the model described by :func:`model_config`'s output (e.g. from a checkpoint).

    A config that names a factory (``"factory"``) is refused: it was read from a file, and a factory
    is built only when the user names it (:func:`curvlab.models.factory.rebuild_factory_model`).
    """
    if not isinstance(config, Mapping):
        raise ModelError(f"model config must be a mapping, got {type(config).__name__}")
    if "factory" in config:
        raise ModelError(f"model config names the factory {config['factory']!r}: it is rebuilt only with "
                         "--model naming it (curvlab.models.factory.rebuild_factory_model)")
    missing = [key for key in ("name", "input_shape", "num_classes") if key not in config]
    if missing:
        raise ModelError(f"model config is missing {', '.join(missing)} (has: {sorted(config)})")
    args = config.get("args") or {}
    if not isinstance(args, Mapping):
        raise ModelError(f"model config: args must be a mapping, got {type(args).__name__}")
    return build_model(config["name"], config["input_shape"], config["num_classes"], args)
