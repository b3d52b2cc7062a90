"""One trial of a sweep: train with given hyper-parameters until the target holds or the budget is spent.

A trial is a ``curvlab train`` run held in memory (:func:`curvlab.optim.train.prepare`, the same
model, optimizer, F.3 schedule and data order, trained by the same :func:`curvlab.optim.train.updates`
generator) with ``steps = max_steps`` and nothing written. After each update listed by
:func:`curvlab.sweep.config.evaluation_steps` the model is evaluated in eval mode on the whole target
split (:class:`Evaluator`); the trial stops at the first checked step where the metric is at or below
the threshold, and that step is its steps-to-target. A non-finite training loss ends it as
``diverged``; a budget spent without the target, as ``not reached``. Either way the trial ends
within ``max_steps`` updates: an unreachable target is a result, not a hang.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.sweep.config import SweepConfig, evaluation_steps

#: Examples per forward pass when evaluating the target.
EVAL_BATCH = 1024


@dataclass
class TrialResult:
    """What a trial measured: ``steps`` to the target (``None`` unless ``outcome == "reached"``)."""

    outcome: str  # "reached" | "not reached" | "diverged"
    steps: int | None
    updates: int
    metric: float | None
    curve: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def reached(self) -> bool:
        return self.outcome == "reached"

    def to_attrs(self) -> dict[str, Any]:
        """The trial's user attributes in the study database (JSON-safe)."""
        return {
            "outcome": self.outcome,
            "steps": self.steps,
            "updates": self.updates,
            "metric": self.metric if self.metric is not None and math.isfinite(self.metric) else None,
            "curve": [[t, v if math.isfinite(v) else None] for t, v in self.curve],
            "seconds": round(self.seconds, 4),
        }


class Evaluator:
    """The target metric of a model on one split: mean loss (the training objective) or error."""

    def __init__(self, config: SweepConfig, data: Any) -> None:
        self.metric = config.metric
        self.data = data

    @torch.no_grad()
    def __call__(self, model: nn.Module, device: torch.device) -> float:
        from curvlab.optim.kfac import mean_cross_entropy

        was_training = model.training
        model.eval()
        try:
            total, count = 0.0, 0
            smoothing = float(getattr(model, "label_smoothing", 0.0) or 0.0)
            for start in range(0, len(self.data), EVAL_BATCH):
                x = self.data.x[start : start + EVAL_BATCH].to(device)
                y = self.data.y[start : start + EVAL_BATCH].to(device)
                logits = model(x)
                n = y.numel()
                if self.metric == "loss":
                    total += float(mean_cross_entropy(logits, y, smoothing)) * n
                else:
                    total += float(_errors(logits, y))
                count += n
            return total / count
        finally:
            model.train(was_training)


def _errors(logits: Tensor, labels: Tensor) -> Tensor:
    """Misclassified label locations (logits ``(N, C)`` or ``(N, T, C)``)."""
    return (logits.argmax(dim=-1) != labels).sum()


def load_splits(config: SweepConfig) -> tuple[Any, Any]:
    """The training data and the target's split (the training data itself for ``eval_split = train``)."""
    from curvlab.io.data import load_dataset
    from curvlab.models import data_options

    options = data_options(config.model, config.model_args)
    train = load_dataset(config.data, split="train", limit=config.examples, **options)
    held_out = train if config.split == "train" else load_dataset(config.data, split="test", **options)
    return train, held_out


def train_config(config: SweepConfig, optimizer: str, batch_size: int, fields: dict[str, Any], seed: int):
    """The ``TrainConfig`` of a trial: the sweep's model and data, the trial's hyper-parameters."""
    from curvlab.optim.config import TrainConfig

    return TrainConfig(
        model=config.model, data=config.data, optimizer=optimizer, steps=config.max_steps,
        batch_size=batch_size, model_args=dict(config.model_args), examples=config.examples, seed=seed,
        fisher=config.fisher, inverse_update_every=config.inverse_update_every,
        factor_examples=config.factor_examples, **fields,
    )


def _finite_updates(steps):
    """The updates, with outputs gone non-finite during an update (the loss's check raises
    :class:`~curvlab.errors.NonFiniteOutputError`) ending them with a NaN loss: a diverged trial."""
    from curvlab.errors import NonFiniteOutputError

    t = 0
    try:
        for t, loss, lr in steps:
            yield t, loss, lr
    except NonFiniteOutputError:
        yield t + 1, math.nan, math.nan


def run_trial(
    config: SweepConfig,
    optimizer: str,
    batch_size: int,
    fields: dict[str, Any],
    seed: int,
    *,
    device: torch.device | str = "cpu",
    data: tuple[Any, Any] | None = None,
) -> TrialResult:
    """Train until the target holds at a checked step or ``max_steps`` updates are spent (module doc).

    ``fields``: the trial's ``TrainConfig`` hyper-parameters (:func:`curvlab.sweep.space.to_train_fields`);
    ``data``: ``(train, target split)`` from :func:`load_splits`, loaded once per worker.
    """
    from curvlab.optim.train import prepare, updates

    start = time.perf_counter()
    train, held_out = data if data is not None else load_splits(config)
    device = torch.device(device)
    run = prepare(train_config(config, optimizer, batch_size, fields, seed), device, data=train)
    evaluate = Evaluator(config, held_out)
    checks = set(evaluation_steps(config.max_steps, config.eval_every))
    curve: list[tuple[int, float]] = []
    outcome, steps, done, metric = "not reached", None, 0, None
    try:
        for t, loss, _lr in _finite_updates(updates(run)):
            done = t
            if not math.isfinite(loss):
                outcome = "diverged"
                break
            if t not in checks:
                continue
            metric = evaluate(run.model, device)
            curve.append((t, metric))
            if not math.isfinite(metric):
                outcome = "diverged"
                break
            if metric <= config.threshold:
                outcome, steps = "reached", t
                break
    finally:
        run.optimizer.close()
    return TrialResult(outcome, steps, done, metric, curve, time.perf_counter() - start)
