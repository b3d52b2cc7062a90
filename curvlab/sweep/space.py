"""The search space of a sweep: the schedule of seed F.3 and the optimizer hyper-parameters of F.4.

Every (optimizer, batch size) is tuned separately over (all log-uniform, since no scale is known in
advance; ``one_minus_*`` parameters put the mass near 1 where these constants live):

================================  ====================  =============================================
parameter                          range                 becomes (``TrainConfig`` field)
================================  ====================  =============================================
``lr`` (α0, F.3)                   per optimizer below   ``lr``
``final_lr_factor`` (γ, F.3)       [1e-3, 1]             ``final_lr_factor`` (1: a constant rate)
``decay_fraction`` (T, F.3)        [0.01, 1]             ``decay_steps = max(1, round(f · max_steps))``
``one_minus_momentum``             [1e-3, 0.5]           ``momentum = 1 − x`` (momentum, K-FAC; Adam β1)
``one_minus_beta2`` (Adam)         [1e-4, 0.1]           ``beta2 = 1 − x``
``eps`` (Adam)                     [1e-10, 1]            ``eps``
``damping`` (K-FAC)                [1e-4, 1]             ``damping``
``kl_clip`` (K-FAC trust region)   [1e-5, 1e-1]          ``kl_clip``
``one_minus_factor_decay`` (K-FAC) [1e-3, 0.5]           ``factor_decay = 1 − x``
================================  ====================  =============================================

``lr`` ranges: sgd [1e-3, 10], momentum [1e-4, 1], adam [1e-5, 1e-1], kfac [1e-4, 1]. The schedule is
always F.3's linear decay (``γ = 1`` is the constant schedule, inside the range). Seed F.4: momentum
SGD tunes β; Adam β1, β2 and ε; K-FAC damping, the KL clipping term, momentum and the factor moving
average. ``--space [OPT.]NAME=LOW:HIGH`` replaces a range, ``--space [OPT.]NAME=VALUE`` fixes a
parameter (e.g. ``kfac.one_minus_momentum=0.1`` keeps K-FAC's momentum at 0.9, as F.4 did for the
Transformer).

Points are drawn by :class:`SobolSampler`: trial number ``n`` of a study takes point ``n`` of a
scrambled Sobol sequence (``scipy.stats.qmc``) seeded by the study, mapped onto the ranges. Trial
numbers are handed out by the study database, so workers sharing a study never draw the same point,
and the first trial is a quasi-random point too (Optuna's own ``QMCSampler`` samples its first trial
at random, and its sequence counter is not atomic across workers, as its source says). A Sobol
sequence is balanced at powers of two: ``--trials 8`` or ``16`` rather than ``10``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from curvlab.choices import OPTIMIZERS
from curvlab.errors import OptionError


@dataclass(frozen=True)
class Param:
    """One searched hyper-parameter: a log-uniform range ``[low, high]`` (or a fixed value)."""

    name: str
    low: float
    high: float

    @property
    def fixed(self) -> bool:
        return self.low == self.high


LR_RANGE = {"sgd": (1e-3, 10.0), "momentum": (1e-4, 1.0), "adam": (1e-5, 1e-1), "kfac": (1e-4, 1.0)}
SCHEDULE = {"final_lr_factor": (1e-3, 1.0), "decay_fraction": (1e-2, 1.0)}
SPECIFIC: dict[str, dict[str, tuple[float, float]]] = {
    "sgd": {},
    "momentum": {"one_minus_momentum": (1e-3, 0.5)},
    "adam": {"one_minus_momentum": (1e-3, 0.5), "one_minus_beta2": (1e-4, 0.1), "eps": (1e-10, 1.0)},
    "kfac": {"damping": (1e-4, 1.0), "kl_clip": (1e-5, 1e-1), "one_minus_momentum": (1e-3, 0.5),
             "one_minus_factor_decay": (1e-3, 0.5)},
}
#: Upper bounds a parameter may not reach (a momentum of 0 is allowed, one of 1 is not).
_OPEN_ONE = ("one_minus_momentum", "one_minus_beta2", "one_minus_factor_decay")


def default_space(optimizer: str) -> dict[str, Param]:
    """The default ranges of ``optimizer`` (module doc), in the order of the Sobol dimensions."""
    ranges = {"lr": LR_RANGE[optimizer], **SCHEDULE, **SPECIFIC[optimizer]}
    return {name: Param(name, *bounds) for name, bounds in ranges.items()}


def _parse_override(key: str, value: str) -> tuple[str | None, str, tuple[float, float]]:
    optimizer, _, name = key.rpartition(".")
    low_text, sep, high_text = str(value).partition(":")
    try:
        low = float(low_text)
        high = float(high_text) if sep else low
    except ValueError:
        raise OptionError(f"--space {key}={value}: expected LOW:HIGH or a single VALUE") from None
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
        raise OptionError(f"--space {key}={value}: the range must be positive, finite and LOW <= HIGH "
                          "(log-uniform)")
    if name in _OPEN_ONE and high >= 1:
        raise OptionError(f"--space {key}={value}: {name} must stay below 1")
    if name == "final_lr_factor" and high > 1:
        raise OptionError(f"--space {key}={value}: final_lr_factor must be at most 1")
    if name == "decay_fraction" and high > 1:
        raise OptionError(f"--space {key}={value}: decay_fraction must be at most 1")
    return optimizer or None, name, (low, high)


def check_overrides(overrides: Mapping[str, str], optimizers: Sequence[str]) -> None:
    """Every ``--space`` key names a parameter of at least one listed optimizer, every value parses."""
    for key, value in overrides.items():
        optimizer, name, _ = _parse_override(key, value)
        if optimizer is not None and optimizer not in OPTIMIZERS:
            raise OptionError(f"--space {key}={value}: unknown optimizer {optimizer!r}")
        targets = [optimizer] if optimizer else list(optimizers)
        if not any(name in default_space(opt) for opt in targets):
            known = sorted({n for opt in targets for n in default_space(opt)})
            raise OptionError(f"--space {key}={value}: no parameter {name!r} (known: {', '.join(known)})")


def space_for(optimizer: str, overrides: Mapping[str, str]) -> dict[str, Param]:
    """The ranges of ``optimizer`` with the ``--space`` overrides (``OPT.NAME`` wins over ``NAME``)."""
    space = default_space(optimizer)
    for specific in (False, True):
        for key, value in overrides.items():
            target, name, (low, high) = _parse_override(key, value)
            if (target is not None) != specific or (target not in (None, optimizer)) or name not in space:
                continue
            space[name] = Param(name, low, high)
    return space


def to_train_fields(params: Mapping[str, float], max_steps: int) -> dict[str, Any]:
    """Searched parameters → ``TrainConfig`` fields (the table of the module doc)."""
    fields: dict[str, Any] = {"schedule": "linear-decay"}
    for name, value in params.items():
        if name == "decay_fraction":
            fields["decay_steps"] = max(1, round(value * max_steps))
        elif name.startswith("one_minus_"):
            fields[{"one_minus_momentum": "momentum", "one_minus_beta2": "beta2",
                    "one_minus_factor_decay": "factor_decay"}[name]] = 1.0 - value
        elif name in ("seed_index",):
            continue
        else:
            fields[name] = value
    return fields


def sobol_point(dimensions: int, index: int, seed: int) -> list[float]:
    """Point ``index`` (from 0) of the scrambled Sobol sequence in ``[0, 1)^dimensions`` (``seed``)."""
    from scipy.stats import qmc

    engine = qmc.Sobol(d=max(dimensions, 1), scramble=True, seed=seed)
    if index:
        engine.fast_forward(index)
    return [float(u) for u in engine.random(1)[0][:dimensions]]


def study_seed(name: str) -> int:
    """A fixed seed per study name: every worker scrambles the same sequence."""
    return zlib.crc32(name.encode())


def make_sampler(names: Sequence[str], seed: int):
    """An Optuna sampler giving trial ``n`` the ``n``-th Sobol point over ``names`` (see module doc)."""
    import optuna
    from optuna.distributions import FloatDistribution

    class SobolSampler(optuna.samplers.BaseSampler):
        """Trial ``n`` → Sobol point ``n``; parameters outside ``names`` from a seeded random sampler."""

        def __init__(self) -> None:
            self.names = list(names)
            self.seed = seed
            self._fallback = optuna.samplers.RandomSampler(seed=seed)

        def infer_relative_search_space(self, study, trial):
            return {}

        def sample_relative(self, study, trial, search_space):
            return {}

        def sample_independent(self, study, trial, param_name, param_distribution):
            if param_name not in self.names or not isinstance(param_distribution, FloatDistribution):
                return self._fallback.sample_independent(study, trial, param_name, param_distribution)
            # a retry of a killed trial (Optuna's heartbeat callback records the first one's number as
            # "failed_trial") draws what the killed trial had not yet recorded from that trial's point
            number = int(trial.system_attrs.get("failed_trial", trial.number))
            u = sobol_point(len(self.names), number, self.seed)[self.names.index(param_name)]
            low, high = param_distribution.low, param_distribution.high
            if param_distribution.log:
                value = math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
                return float(min(high, max(low, value)))
            return float(low + u * (high - low))

    return SobolSampler()
