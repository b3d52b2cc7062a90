"""What defines a sweep: :class:`SweepConfig`, the target, the evaluation cadence and their checks.

A sweep measures, for every optimizer and batch size, the steps a network needs to reach a target
(the protocol of Shallue et al. 2018 that Zhang et al. 2019 follow: every batch size tuned separately).
The target is ``loss=X`` (the training objective, mean cross-entropy with the model's label smoothing)
or ``error=X`` (the classification error), measured in eval mode on a whole split — the training split
by default for ``loss``, the held-out ``test`` split for ``error`` (``eval_split`` overrides).

**Cadence.** The target is checked after the updates listed by :func:`evaluation_steps`: every
``K`` steps (``eval_every = "K"``), or on a geometric grid (``"R%"``, default ``5%``): every step up to
``1/R``, then each check ``⌈R · t⌉`` steps after the previous one, so a measured step count is at most
a factor ``1 + R`` above the first step at which the target held; the last step of the budget is
always checked. A trial's steps-to-target is the first checked step at which the target holds: the
check uses only the model at that step, so a trial never uses its future.

Everything here is plain Python (no torch): the command line checks a sweep's options before it
imports anything heavy, and the configuration is stored as JSON in the study database, where a
``--worker`` on another machine reads it back (:meth:`SweepConfig.from_json`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from curvlab.choices import OPTIMIZERS
from curvlab.errors import OptionError

#: Target metrics and the split each is measured on by default.
TARGET_METRICS = {"loss": "train", "error": "test"}
EVAL_SPLITS = ("train", "test")


def parse_target(text: str) -> tuple[str, float]:
    """``"loss=0.1"`` → ``("loss", 0.1)``; one-line :class:`OptionError` otherwise."""
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or name not in TARGET_METRICS:
        raise OptionError(f"--target {text!r}: expected loss=VALUE or error=VALUE")
    try:
        number = float(value)
    except ValueError:
        raise OptionError(f"--target {text!r}: {value!r} is not a number") from None
    if not math.isfinite(number) or number < 0 or (name == "error" and number >= 1):
        bound = "in [0, 1)" if name == "error" else "finite and non-negative"
        raise OptionError(f"--target {text!r}: the {name} must be {bound}")
    return name, number


def parse_list(option: str, text: str, kind: type = str) -> list[Any]:
    """A comma-separated list, items stripped, empty items an error, duplicates an error."""
    items = [item.strip() for item in str(text).split(",")]
    if not text or not any(items) or any(not item for item in items):
        raise OptionError(f"{option} {text!r}: expected a non-empty comma-separated list")
    if kind is int:
        try:
            values: list[Any] = [int(item) for item in items]
        except ValueError:
            raise OptionError(f"{option} {text!r}: expected comma-separated integers") from None
    else:
        values = items
    if len(set(values)) != len(values):
        raise OptionError(f"{option} {text!r}: an entry is listed twice")
    return values


_CADENCE = re.compile(r"^\s*(?:(\d+)|(\d+(?:\.\d*)?|\.\d+)\s*%)\s*$")


def parse_cadence(text: str) -> tuple[str, float]:
    """``"50"`` → ``("every", 50)``; ``"5%"`` → ``("geometric", 0.05)``."""
    match = _CADENCE.match(str(text))
    if not match:
        raise OptionError(f"--eval-every {text!r}: expected a step count K or a percentage such as 5%")
    if match.group(1) is not None:
        every = int(match.group(1))
        if every < 1:
            raise OptionError(f"--eval-every {text!r}: the step count must be positive")
        return "every", float(every)
    ratio = float(match.group(2)) / 100
    if not 0 < ratio <= 1:
        raise OptionError(f"--eval-every {text!r}: the percentage must be in (0, 100]")
    return "geometric", ratio


def evaluation_steps(max_steps: int, cadence: str) -> list[int]:
    """The steps after which the target is checked (module doc), ascending, ending at ``max_steps``."""
    kind, value = parse_cadence(cadence)
    steps: list[int] = []
    if kind == "every":
        steps = list(range(int(value), max_steps + 1, int(value)))
    else:
        t = 1
        while t <= max_steps:
            steps.append(t)
            t += max(1, math.ceil(value * t))
    if not steps or steps[-1] != max_steps:
        steps.append(max_steps)
    return steps


@dataclass
class SweepConfig:
    """Everything that defines a sweep (``curvlab sweep --help``, docs/sweep.md)."""

    model: str
    data: str
    optimizers: list[str]
    batch_sizes: list[int]
    target: str
    trials: int
    max_steps: int
    seeds: int = 3
    model_args: dict[str, Any] = field(default_factory=dict)
    examples: int | None = None
    eval_split: str | None = None
    eval_every: str = "5%"
    seed: int = 0
    space: dict[str, str] = field(default_factory=dict)
    fisher: str = "mc"
    inverse_update_every: int = 10
    factor_examples: int = 512

    @property
    def metric(self) -> str:
        return parse_target(self.target)[0]

    @property
    def threshold(self) -> float:
        return parse_target(self.target)[1]

    @property
    def split(self) -> str:
        return self.eval_split or TARGET_METRICS[self.metric]

    def cells(self) -> list[tuple[str, int]]:
        """Every (optimizer, batch size) pair, in the order the workers take them up."""
        return [(opt, b) for opt in self.optimizers for b in self.batch_sizes]

    def check(self) -> SweepConfig:
        """One-line :class:`OptionError` for the first bad value; returns ``self``."""
        if not self.optimizers:
            raise OptionError("--optimizers: expected at least one optimizer")
        for name in self.optimizers:
            if name not in OPTIMIZERS:
                raise OptionError(f"--optimizers: unknown optimizer {name!r} (choose from "
                                  f"{', '.join(OPTIMIZERS)})")
        if len(set(self.optimizers)) != len(self.optimizers):
            raise OptionError("--optimizers: an optimizer is listed twice")
        if not self.batch_sizes:
            raise OptionError("--batch-sizes: expected at least one batch size")
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.batch_sizes):
            raise OptionError(f"--batch-sizes: every batch size must be a positive integer, got "
                              f"{self.batch_sizes}")
        if len(set(self.batch_sizes)) != len(self.batch_sizes):
            raise OptionError("--batch-sizes: a batch size is listed twice")
        parse_target(self.target)
        parse_cadence(self.eval_every)
        if self.eval_split is not None and self.eval_split not in EVAL_SPLITS:
            raise OptionError(f"--eval-split {self.eval_split!r}: choose one of {', '.join(EVAL_SPLITS)}")
        for name in ("trials", "max_steps", "seeds", "inverse_update_every", "factor_examples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        examples = self.examples
        if examples is not None and (isinstance(examples, bool) or not isinstance(examples, int)
                                     or examples < 1):
            raise OptionError(f"--examples must be a positive integer, got {self.examples!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise OptionError(f"--seed must be a non-negative integer, got {self.seed!r}")
        from curvlab.sweep.space import check_overrides

        check_overrides(self.space, self.optimizers)
        return self

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> SweepConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, Mapping) or set(data) - names:
            raise OptionError(f"{where}: not a curvlab sweep configuration")
        try:
            return cls(**data).check()
        except (TypeError, OptionError) as exc:
            raise OptionError(f"{where}: bad sweep configuration ({exc})") from None
