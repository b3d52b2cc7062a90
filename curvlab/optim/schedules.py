"""The schedules of a run (seed F.3): the learning rate of every update and the steps that are saved.

Step ``t`` means "after ``t`` optimizer updates". The update from step ``t`` to ``t + 1`` uses the
learning rate ``α(t)`` (seed F.3): ``α0`` (``constant``) or, for ``linear-decay``,
``α(t) = α0 − (1 − γ) α0 t / T_decay`` for ``t ≤ T_decay`` and ``γ α0`` after (``γ = final_lr_factor``,
``T_decay = decay_steps``). The factors and weights are saved at step 0, every ``save_every`` steps, at
the listed ``save_steps`` and at the last step. Both are functions of the step alone, so a resumed run
follows the same schedule.
"""

from __future__ import annotations

from curvlab.optim.config import TrainConfig


def learning_rate(config: TrainConfig, t: int) -> float:
    """``α(t)`` of seed F.3 for the update from step ``t`` to ``t + 1``.

    ``constant``: ``α0``. ``linear-decay``: ``α0 − (1 − γ) α0 t / T_decay`` for ``t ≤ T_decay``, then
    ``γ α0`` (``γ = final_lr_factor``, ``T_decay = decay_steps``).
    """
    lr0 = float(config.lr)
    if config.schedule == "constant":
        return lr0
    decay = config.decay_steps or config.steps
    gamma = config.final_lr_factor
    if t <= decay:
        return lr0 - (1 - gamma) * lr0 * t / decay
    return gamma * lr0


def save_steps(config: TrainConfig) -> list[int]:
    """The steps whose factors and weights are saved: 0, every ``save_every``, ``save_steps``, the last."""
    steps = {0, config.steps}
    if config.save_every:
        steps.update(range(0, config.steps + 1, config.save_every))
    steps.update(s for s in config.save_steps if s <= config.steps)
    return sorted(steps)
