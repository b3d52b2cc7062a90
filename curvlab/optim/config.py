"""What defines a training run: :class:`TrainConfig`, its defaults and its checks.

The optimizers are those of seed F.4 (:data:`OPTIMIZERS`), the learning-rate schedules those of F.3
(:data:`SCHEDULES`, computed in :mod:`curvlab.optim.schedules`). :meth:`TrainConfig.resolved` fills in
the defaults that depend on other fields (``lr`` from :data:`DEFAULT_LR`, ``decay_steps = steps``) and
:meth:`TrainConfig.check` raises one :class:`~curvlab.errors.OptionError` line for the first bad value;
:meth:`TrainConfig.from_json` reads the ``train`` object of a run's ``config.json`` back
(:func:`curvlab.optim.runfolder.read_config`). See ``curvlab train --help`` and docs/training.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from curvlab.choices import FISHER_TYPES, LOSS_NAMES, OPTIMIZERS, SCHEDULES  # without torch, for the parsers
from curvlab.errors import CheckpointError, OptionError

#: Default initial learning rate per optimizer.
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.05, "adam": 1e-3, "kfac": 0.05}


@dataclass
class TrainConfig:
    """Everything that defines a training run (see ``curvlab train --help`` and docs/training.md).

    ``model`` is a registry name or a factory spec (``PATH.py:FUNC``) and ``data`` a data source or a
    data factory: the caller names them, and :func:`curvlab.optim.train.train` builds and loads them.
    Every other field has the command line's default; ``data`` defaults to ``digits`` (``pystdlib`` for
    ``transformer_shallow``), ``lr`` to :data:`DEFAULT_LR` of the optimizer, ``decay_steps`` to ``steps``.
    """

    model: str
    steps: int
    data: str | None = None
    optimizer: str = "kfac"
    batch_size: int = 128
    lr: float | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    examples: int | None = None
    schedule: str = "constant"
    decay_steps: int | None = None
    final_lr_factor: float = 0.01
    momentum: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    damping: float = 1e-2
    kl_clip: float | None = 1e-3
    factor_decay: float = 0.95
    factor_update_every: int = 1
    inverse_update_every: int = 10
    fisher: str = "mc"
    mc_samples: int = 1
    loss: str = "cross-entropy"
    ignore_index: int | None = None
    label_smoothing: float | None = None  # None: the model's own (model.label_smoothing), else 0
    factor_examples: int = 512
    save_every: int | None = None
    save_steps: list[int] = field(default_factory=list)
    seed: int = 0
    augment: list[str] = field(default_factory=list)
    augment_padding: int | None = None

    def resolved(self) -> TrainConfig:
        """A copy with defaults that depend on other fields filled in (data, lr, decay_steps), checked."""
        config = dataclasses.replace(self, model_args=dict(self.model_args), save_steps=list(self.save_steps),
                                     augment=list(self.augment) if not isinstance(self.augment, str)
                                     else self.augment)
        if config.data is None:
            from curvlab.optim.train import default_data

            config.data = default_data(config.model, config.model_args)
        if config.lr is None:
            config.lr = DEFAULT_LR.get(config.optimizer, 0.1)
        if config.decay_steps is None:
            config.decay_steps = config.steps
        config.save_steps = sorted({int(s) for s in config.save_steps})
        from curvlab.optim.augment import parse_augment

        config.augment = parse_augment(config.augment)
        config.check()
        return config

    def check(self) -> None:
        """One-line :class:`OptionError` for the first bad value."""
        _choice("--optimizer", self.optimizer, OPTIMIZERS)
        _choice("--schedule", self.schedule, SCHEDULES)
        _choice("--fisher", self.fisher, FISHER_TYPES)
        _choice("--loss", self.loss, LOSS_NAMES)
        if self.ignore_index is not None and (isinstance(self.ignore_index, bool)
                                              or not isinstance(self.ignore_index, int)):
            raise OptionError(f"--ignore-index must be an integer, got {self.ignore_index!r}")
        if self.label_smoothing is not None:
            _number("label_smoothing", self.label_smoothing, low=0.0, high=1.0)
        if self.loss != "cross-entropy" and (self.ignore_index is not None or self.label_smoothing):
            option = "--ignore-index" if self.ignore_index is not None else "--label-smoothing"
            raise OptionError(f"{option} is an option of cross-entropy, not of {self.loss}")
        for name in ("steps", "batch_size", "factor_update_every", "inverse_update_every", "mc_samples",
                     "factor_examples"):
            _positive_int(name, getattr(self, name))
        for name in ("examples", "save_every", "decay_steps"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        _number("lr", self.lr, low=0.0, open_low=True)
        _number("final_lr_factor", self.final_lr_factor, low=0.0, high=1.0)
        _number("momentum", self.momentum, low=0.0, high=1.0, open_high=self.optimizer == "adam")
        _number("beta2", self.beta2, low=0.0, high=1.0, open_high=True)
        _number("eps", self.eps, low=0.0, open_low=True)
        _number("weight_decay", self.weight_decay, low=0.0)
        _number("damping", self.damping, low=0.0, open_low=True)
        _number("factor_decay", self.factor_decay, low=0.0, high=1.0, open_high=True)
        if self.kl_clip is not None:
            _number("kl_clip", self.kl_clip, low=0.0, open_low=True)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.save_steps):
            raise OptionError(f"--save-steps must be non-negative step numbers, got {self.save_steps}")
        if self.augment_padding is not None:
            _positive_int("augment_padding", self.augment_padding)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise OptionError(f"--seed must be a non-negative integer, got {self.seed!r}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], path: str) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                         and f.name not in data)
        if unknown or missing:
            what = f"unknown key {unknown[0]!r}" if unknown else f"missing key {missing[0]!r}"
            raise CheckpointError(f"{path}: not a curvlab training config ({what})")
        try:
            return cls(**data).resolved()
        except (TypeError, OptionError) as exc:
            raise CheckpointError(f"{path}: bad training config ({exc})") from None


def resume_options(stored: TrainConfig, given: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The options of a resumed run: the stored ones (``where``: its config.json), overridden by ``given``.

    A factory is never taken from the file (:mod:`curvlab.usercode`): a stored model or data factory,
    and a factory's arguments, must be in ``given`` (named again by the user), else one line names them.
    """
    from curvlab.errors import DataError, ModelError
    from curvlab.usercode import is_data_factory_spec, is_factory_spec, require_named

    if is_factory_spec(stored.model):
        require_named(stored.model, given.get("model"), where, args=stored.model_args, error=ModelError)
        if stored.model_args and "model_args" not in given:
            require_named(stored.model, None, where, args=stored.model_args, error=ModelError)
    if is_data_factory_spec(stored.data):
        require_named(str(stored.data), given.get("data"), where, option="--data", error=DataError)
    return {**stored.to_json(), **given}


def _choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise OptionError(f"{option} {value!r}: choose one of {', '.join(choices)}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")


def _number(name: str, value: Any, *, low: float, high: float | None = None, open_low: bool = False,
            open_high: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if open_low else value >= low) and (
            high is None or (value < high if open_high else value <= high))
    if not ok:
        left = "(" if open_low else "["
        right = ")" if open_high or high is None else "]"
        raise OptionError(
            f"--{name.replace('_', '-')} must be in {left}{low}, {'inf' if high is None else high}{right}, "
            f"got {value!r}"
        )
