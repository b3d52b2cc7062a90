"""Training runs that save K-FAC factors along the way (seed E.1), with the schedules of F.3 and the
optimizers of F.4, resumable after a crash.

A run lives in one folder ``RUN/`` (docs/training.md):

* ``config.json``: the resolved :class:`TrainConfig` and the model config (written once, atomically);
* ``ckpt.h5``: a factor checkpoint (docs/format.md) with the factors and the model weights at every
  saved step, step 0 (the initial weights) included; each step is appended crash-safely
  (:func:`curvlab.io.checkpoint.append_step`: copy, write, ``complete`` last, rename);
* ``metrics.jsonl``: one JSON line per step ``{"step", "loss", "lr", "time"}`` (plus ``"nu"``, the KL
  clipping factor, for K-FAC), appended and flushed;
* ``state-<t>.pt``: everything needed to continue from the last saved step ``t`` — weights, optimizer
  state, RNG states — as tensors and plain numbers (``torch.save``; read back with
  ``torch.load(weights_only=True)``, never unpickling arbitrary objects). Written atomically *before*
  step ``t`` is appended to ``ckpt.h5``; older ones are deleted after.

Step ``t`` means "after ``t`` optimizer updates". The update from step ``t`` to ``t + 1`` uses the
learning rate ``α(t)`` (seed F.3): ``α0`` (``constant``) or, for ``linear-decay``,
``α(t) = α0 − (1 − γ) α0 t / T_decay`` for ``t ≤ T_decay`` and ``γ α0`` after. The batch of that update
is a slice of a per-epoch permutation of the training set, seeded by ``(seed, epoch)``, so it is a
function of the step alone and a resumed run sees the same batches.

Factors saved at step ``t``: with ``kfac``, the optimizer's running factors (moving averages of the
statistics of the training batches, started from an estimate at the initial weights on the fixed
factor set); with the other optimizers, factors collected at step ``t``'s weights (model in eval mode)
on the fixed factor set — the first ``factor_examples`` examples of the training split — with the
chosen Fisher type.

Several processes (``torchrun``, :mod:`curvlab.distributed`, docs/training.md "Several processes"):
the batch of every step is the same on every process, and process ``r`` of ``W`` takes a contiguous
slice of it (:func:`shard`). The model is wrapped in ``DistributedDataParallel``, which averages the
gradients over the processes in the backward pass; each process's mean loss is scaled by
:func:`loss_scale` so that the average is the gradient of the whole batch's mean loss. K-FAC adds up
the factor statistics of all processes before each factor update and draws Monte-Carlo labels for the
whole batch (:mod:`curvlab.optim.kfac`); the other optimizers' factors come from
:func:`curvlab.capture.factors.collect_factors`, which deals the factor set's batches out. Every process
computes everything; only process 0 writes the run folder, prints and shows progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from curvlab import distributed
from curvlab.capture.factors import FactorSet, collect_factors, model_weights
from curvlab.capture.loss import FISHER_TYPES
from curvlab.choices import OPTIMIZERS, SCHEDULES  # defined without torch, for the command line's parsers
from curvlab.errors import CheckpointError, CurvlabError, OptionError
from curvlab.io.atomic import atomic_output, remove_quietly
from curvlab.io.checkpoint import CheckpointReader, append_step
from curvlab.optim.kfac import KFAC, mean_cross_entropy

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "TrainConfig",
    "learning_rate",
    "loss_scale",
    "read_config",
    "save_steps",
    "shard",
    "train",
]

#: Default initial learning rate per optimizer.
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.05, "adam": 1e-3, "kfac": 0.05}
CONFIG_FILE, CHECKPOINT_FILE, METRICS_FILE = "config.json", "ckpt.h5", "metrics.jsonl"
STATE_FORMAT = "curvlab.train-state"
_STATE_NAME = re.compile(r"^state-(0|[1-9][0-9]*)\.pt$")
#: Options that may differ when a run is resumed (they change what is saved, not the trajectory).
RESUMABLE_CHANGES = ("steps", "save_every", "save_steps")


@dataclass
class TrainConfig:
    """Everything that defines a training run (see ``curvlab train --help`` and docs/training.md)."""

    model: str
    data: str
    optimizer: str
    steps: int
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
    factor_examples: int = 512
    save_every: int | None = None
    save_steps: list[int] = field(default_factory=list)
    seed: int = 0

    def resolved(self) -> TrainConfig:
        """A copy with defaults that depend on other fields filled in (lr, decay_steps), checked."""
        config = dataclasses.replace(self, model_args=dict(self.model_args), save_steps=list(self.save_steps))
        if config.lr is None:
            config.lr = DEFAULT_LR.get(config.optimizer, 0.1)
        if config.decay_steps is None:
            config.decay_steps = config.steps
        config.save_steps = sorted({int(s) for s in config.save_steps})
        config.check()
        return config

    def check(self) -> None:
        """One-line :class:`OptionError` for the first bad value."""
        _choice("--optimizer", self.optimizer, OPTIMIZERS)
        _choice("--schedule", self.schedule, SCHEDULES)
        _choice("--fisher", self.fisher, FISHER_TYPES)
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


# ------------------------------------------------------------------------------------ schedules


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


# ------------------------------------------------------------------------------------ data order


class BatchOrder:
    """The examples of each step: epoch ``e`` is a permutation seeded by ``(seed, e)``, cut into
    ``n // batch_size`` batches (the remainder of each epoch is left out, so batches are full)."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size
        self._epoch: int | None = None
        self._perm: Tensor | None = None

    def indices(self, t: int) -> Tensor:
        """The example indices of the update from step ``t`` to ``t + 1``."""
        epoch, position = divmod(t, self.per_epoch)
        if epoch != self._epoch:
            seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed))
            self._epoch = epoch
        start = position * self.batch_size
        return self._perm[start : start + self.batch_size]


def shard(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(offset, count)``: process ``rank``'s contiguous slice of a batch of ``total`` examples.

    Cut like ``numpy.array_split``: the first ``total mod W`` processes take ``⌈total / W⌉`` examples,
    the others ``⌊total / W⌋``, so the counts differ by at most one.
    """
    base, extra = divmod(total, world_size)
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)


def loss_scale(count: int, total: int, world_size: int) -> float:
    """``W n_r / B``: the factor on process ``r``'s mean loss (over its ``n_r`` of the ``B`` examples).

    With ``L_r = (1/n_r) Σ_{i ∈ r} ℓ_i``, DDP's average of the processes' gradients is
    ``(1/W) Σ_r ∇(W n_r / B · L_r) = Σ_r (n_r / B) ∇L_r = ∇ (1/B) Σ_i ℓ_i``, the gradient of the whole
    batch's mean loss; the average of the scaled losses is that mean loss. (Per example the loss is
    the mean over its label locations, the same number for every example, so this holds per location.)
    """
    return world_size * count / total


# ------------------------------------------------------------------------------------ optimizers


class TorchOptimizer:
    """``sgd``, ``momentum`` or ``adam`` behind the interface the loop uses (``lr``, ``train_step``).

    ``model`` is what the forward pass calls: the model, or its ``DistributedDataParallel`` wrapper.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @lr.setter
    def lr(self, value: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = value

    def train_step(
        self, inputs: Tensor, labels: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor], *,
        rows: tuple[int, int] | None = None,
    ) -> Tensor:
        """One update; ``rows`` (the slice of the batch, see :meth:`KFAC.backward`) draws nothing here."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(self.model(inputs), labels)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        try:
            self.optimizer.load_state_dict(state)
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"optimizer state does not fit ({_first_line(exc)})") from None

    def close(self) -> None:
        pass


def make_optimizer(
    config: TrainConfig, model: nn.Module, forward_module: nn.Module | None = None
) -> KFAC | TorchOptimizer:
    """The optimizer of F.4 named by ``config.optimizer`` (hyper-parameters from ``config``).

    ``forward_module``: what the training forward pass calls (default ``model``; under ``torchrun`` its
    ``DistributedDataParallel`` wrapper); K-FAC's hooks stay on ``model``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    forward = model if forward_module is None else forward_module
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay)
        return TorchOptimizer(forward, opt)
    if config.optimizer == "momentum":
        opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                              weight_decay=config.weight_decay)
        return TorchOptimizer(forward, opt)
    if config.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=config.lr, betas=(config.momentum, config.beta2), eps=config.eps,
                               weight_decay=config.weight_decay)
        return TorchOptimizer(forward, opt)
    return KFAC(
        model,
        lr=config.lr,
        damping=config.damping,
        momentum=config.momentum,
        factor_decay=config.factor_decay,
        kl_clip=config.kl_clip,
        factor_update_every=config.factor_update_every,
        inverse_update_every=config.inverse_update_every,
        fisher=config.fisher,
        mc_samples=config.mc_samples,
        weight_decay=config.weight_decay,
        seed=config.seed,
        forward_module=forward_module,
    )


# ------------------------------------------------------------------------------------ run folder


def read_config(run_dir: str) -> TrainConfig | None:
    """The run's stored :class:`TrainConfig` (``None`` if the folder has no config.json)."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read the run's config ({_first_line(exc)})") from None
    if not isinstance(data, dict) or not isinstance(data.get("train"), dict):
        raise CheckpointError(f"{path}: not a curvlab training config (no 'train' object)")
    return TrainConfig.from_json(data["train"], path)


def _write_json(path: str, data: Any) -> None:
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")


def _state_files(run_dir: str) -> dict[int, str]:
    out = {}
    for name in os.listdir(run_dir):
        match = _STATE_NAME.match(name)
        if match:
            out[int(match.group(1))] = os.path.join(run_dir, name)
    return out


def _remove_stale_temps(run_dir: str) -> None:
    """Temp files a killed writer left behind (``.<name>.tmp-<pid>-<hex>``, see curvlab.io.atomic)."""
    for pattern in (f".{CHECKPOINT_FILE}.tmp-*", f".{CONFIG_FILE}.tmp-*", f".{METRICS_FILE}.tmp-*",
                    ".state-*.pt.tmp-*"):
        for path in glob.glob(os.path.join(glob.escape(run_dir), pattern)):
            remove_quietly(path)


def _complete_steps(path: str) -> list[int]:
    if not os.path.exists(path):
        return []
    with CheckpointReader(path) as reader:
        return reader.step_numbers()


def _truncate_metrics(path: str, last_step: int) -> None:
    """Keep the metric lines of steps ``<= last_step`` (drops a line cut short by a kill)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            step = record.get("step") if isinstance(record, dict) else None
            if isinstance(step, int) and step <= last_step:
                kept.append(json.dumps(record))
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.writelines(line + "\n" for line in kept)


# ------------------------------------------------------------------------------------ RNG


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


@contextlib.contextmanager
def _no_side_effects(model: nn.Module) -> Iterator[None]:
    """Run in training mode but restore the buffers (batch-norm statistics) and the RNG states after."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    rng = _rng_state()
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        _set_rng_state(rng)


# ------------------------------------------------------------------------------------ the run


@dataclass
class _Run:
    """What the loop needs: model, optimizer, data, where to write, and this process's share."""

    config: TrainConfig
    run_dir: str
    model: nn.Module
    optimizer: KFAC | TorchOptimizer
    data: Any
    factor_data: Any
    model_config: dict[str, Any]
    device: torch.device
    ctx: distributed.Context = field(default_factory=distributed.Context)
    elapsed: float = 0.0

    @property
    def checkpoint(self) -> str:
        return os.path.join(self.run_dir, CHECKPOINT_FILE)

    @property
    def shard(self) -> tuple[int, int]:
        """``(offset, count)`` of this process's examples in every batch (:func:`shard`)."""
        return shard(self.config.batch_size, self.ctx.rank, self.ctx.world_size)

    def loss_fn(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The mean cross-entropy of this process's examples, times :func:`loss_scale` (1 alone)."""
        loss = mean_cross_entropy(logits, labels, float(getattr(self.model, "label_smoothing", 0.0) or 0.0))
        if not self.ctx.active:
            return loss
        return loss * loss_scale(self.shard[1], self.config.batch_size, self.ctx.world_size)

    def factor_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        from curvlab.io.data import iterate_batches

        return iterate_batches(self.factor_data, self.config.batch_size)


def _build(config: TrainConfig, run_dir: str, device: torch.device) -> _Run:
    from curvlab.io.data import load_dataset
    from curvlab.models import build_model, data_options, model_config

    options = data_options(config.model, config.model_args)
    data = load_dataset(config.data, split="train", limit=config.examples, **options)
    if config.batch_size > len(data):
        raise OptionError(
            f"--batch-size {config.batch_size} exceeds the {len(data)} training examples of {config.data}"
        )
    ctx = distributed.context()
    if config.batch_size < ctx.world_size:
        raise OptionError(f"--batch-size {config.batch_size} is smaller than the {ctx.world_size} processes: "
                          "every process needs at least one example of each batch")
    torch.manual_seed(config.seed)
    model = build_model(config.model, data.input_shape, data.num_classes, config.model_args).to(device)
    model.train()
    described = model_config(config.model, data.input_shape, data.num_classes, config.model_args)
    described["data"] = config.data
    factor_count = min(config.factor_examples, len(data))
    factor_data = dataclasses.replace(data, x=data.x[:factor_count], y=data.y[:factor_count])
    optimizer = make_optimizer(config, model, _data_parallel(model, device, ctx))
    return _Run(config, run_dir, model, optimizer, data, factor_data, described, device, ctx)


def _data_parallel(model: nn.Module, device: torch.device, ctx: distributed.Context) -> nn.Module:
    """What the training forward pass calls: under ``torchrun`` the model wrapped in
    ``DistributedDataParallel`` (gradients averaged over the processes during ``backward``, buffers
    broadcast from process 0 before each forward pass); alone, the model itself."""
    if not ctx.active:
        return model
    device_ids = None
    if device.type == "cuda":
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()]
    with distributed.collective("wrapping the model for data-parallel training"):
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def _factors_at(run: _Run, step: int) -> FactorSet:
    """kfac: the running factors; others: factors on the fixed factor set at the current weights (a
    collective under ``torchrun``: every process takes part)."""
    if isinstance(run.optimizer, KFAC):
        return run.optimizer.running_factors()
    run.model.eval()
    try:
        factors = collect_factors(
            run.model, run.factor_batches(), fisher=run.config.fisher, mc_samples=run.config.mc_samples,
            seed=run.config.seed + step,
        )
    finally:
        run.model.train()
    factors.attrs["source"] = "factor-set"
    return factors


def _save_step(run: _Run, step: int) -> None:
    """State file (atomic), then the checkpoint step (crash-safe append), then older state files go.

    Every process computes the factors (see :func:`_factors_at`); only process 0 writes."""
    factors = _factors_at(run, step)
    if not run.ctx.is_main:
        return
    state = {
        "format": STATE_FORMAT,
        "step": step,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "rng": _rng_state(),
        "elapsed": run.elapsed,
    }
    state_path = os.path.join(run.run_dir, f"state-{step}.pt")
    with atomic_output(state_path) as tmp:
        torch.save(state, tmp)
    factors.attrs.update({"optimizer": run.config.optimizer, "lr": learning_rate(run.config, step)})
    record = factors.to_step(step, model_weights(run.model))
    append_step(run.checkpoint, record, model_name=run.config.model, model_config=run.model_config)
    for old, path in _state_files(run.run_dir).items():
        if old < step:
            remove_quietly(path)


def _restore(run: _Run, step: int) -> None:
    path = _state_files(run.run_dir).get(step)
    if path is None:
        raise CheckpointError(
            f"{os.path.join(run.run_dir, f'state-{step}.pt')}: missing: cannot resume from step {step}"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (any unreadable or refused file is one user-facing error)
        raise CheckpointError(f"{path}: cannot read the training state ({_first_line(exc)})") from None
    if not isinstance(state, dict) or (state.get("format"), state.get("step")) != (STATE_FORMAT, step):
        raise CheckpointError(f"{path}: not the training state of step {step}")
    try:
        run.model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{path}: weights do not fit the model ({_first_line(exc)})") from None
    try:
        run.optimizer.load_state_dict(state["optimizer"])
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    _set_rng_state(state["rng"])
    run.elapsed = float(state.get("elapsed", 0.0))


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _start(config: TrainConfig, run_dir: str, resume: bool) -> int | None:
    """Check the folder; the step to resume from (``None``: start from scratch)."""
    ckpt = os.path.join(run_dir, CHECKPOINT_FILE)
    if not resume:
        if os.path.exists(ckpt):  # a config.json alone is a run that died before saving step 0
            raise OptionError(f"{run_dir}: holds a run already (pass --resume to continue it, or choose "
                              "another -o)")
        return None
    stored = read_config(run_dir)
    if stored is None:
        if os.path.exists(ckpt):
            raise CheckpointError(f"{run_dir}: has {CHECKPOINT_FILE} but no {CONFIG_FILE}: cannot resume")
        return None
    differing = [f.name for f in dataclasses.fields(TrainConfig)
                 if f.name not in RESUMABLE_CHANGES and getattr(stored, f.name) != getattr(config, f.name)]
    if differing:
        name = differing[0]
        raise OptionError(
            f"{run_dir}: --resume with {name.replace('_', '-')}={getattr(config, name)!r} but the run was "
            f"started with {getattr(stored, name)!r}"
        )
    steps = _complete_steps(ckpt)
    return steps[-1] if steps else None


def train(
    config: TrainConfig,
    run_dir: str,
    *,
    resume: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Train, saving factors and weights at :func:`save_steps` into ``run_dir`` (see the module doc).

    ``resume=True`` continues from the last complete step of ``run_dir/ckpt.h5`` (weights, optimizer
    and RNG states from its ``state-<t>.pt``), or starts afresh if the folder holds no run; a
    continued run equals an uninterrupted one. Returns a summary dict.

    Under ``torchrun`` every process calls this (see the module doc); every process reads the run
    folder (to resume, it must be on a file system they all see) and only process 0 writes it.
    """
    config = config.resolved()
    ctx = distributed.context()
    run_dir = os.path.abspath(run_dir)
    parent = os.path.dirname(run_dir)
    if not os.path.isdir(parent):
        raise OptionError(f"{run_dir}: cannot create the run folder: {parent} does not exist")
    if ctx.is_main:
        os.makedirs(run_dir, exist_ok=True)
        if resume:
            _remove_stale_temps(run_dir)
    start = _start(config, run_dir, resume)
    # every process has seen the folder as it was before process 0 writes to it
    distributed.barrier("checking the run folder")
    device = torch.device(device)
    run = _build(config, run_dir, device)
    try:
        summary = _loop(run, start, progress and ctx.is_main)
    finally:
        run.optimizer.close()
    summary["resumed_from"] = start
    return summary


def _loop(run: _Run, start: int | None, progress: bool) -> dict[str, Any]:
    config = run.config
    main = run.ctx.is_main
    metrics_path = os.path.join(run.run_dir, METRICS_FILE)
    saves = save_steps(config)
    if start is None:
        if main:
            _write_json(os.path.join(run.run_dir, CONFIG_FILE),
                        {"train": config.to_json(), "model": run.model_config})
            _truncate_metrics(metrics_path, -1)
        if isinstance(run.optimizer, KFAC):
            with _no_side_effects(run.model):
                run.optimizer.initialize_factors(run.factor_batches())
        _save_step(run, 0)
        start = 0
    else:
        _restore(run, start)
        if main:
            _truncate_metrics(metrics_path, start)
    order = BatchOrder(len(run.data), config.batch_size, config.seed)
    offset, count = run.shard
    last_loss: float | None = None
    clock = time.perf_counter() - run.elapsed
    bar = _progress_bar(config.steps, start, progress)
    with open(metrics_path, "a", encoding="utf-8") if main else contextlib.nullcontext() as metrics:
        for t in range(start, config.steps):
            lr = learning_rate(config, t)
            run.optimizer.lr = lr
            index = order.indices(t)[offset : offset + count]
            inputs, labels = run.data.x[index].to(run.device), run.data.y[index].to(run.device)
            with _collective(run, f"step {t + 1}"):
                loss = run.optimizer.train_step(inputs, labels, run.loss_fn, rows=(offset, config.batch_size))
            loss = _batch_loss(loss, run.ctx, f"step {t + 1}: adding up the batch loss")
            _project_weights(run.model)
            if not math.isfinite(loss):
                raise CurvlabError(f"{run.run_dir}: step {t + 1}: the training loss is {loss} (diverged); "
                                   "lower --lr or raise --damping")
            last_loss = loss
            run.elapsed = time.perf_counter() - clock
            record: dict[str, Any] = {"step": t + 1, "loss": loss, "lr": lr, "time": round(run.elapsed, 4)}
            if isinstance(run.optimizer, KFAC) and run.optimizer.last_nu is not None:
                record["nu"] = run.optimizer.last_nu
            if metrics is not None:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}")
            if t + 1 in saves:
                _save_step(run, t + 1)
    bar.close()
    return {
        "run": run.run_dir,
        "model": config.model,
        "data": config.data,
        "optimizer": config.optimizer,
        "steps": config.steps,
        "saved_steps": _complete_steps(run.checkpoint) if main else None,
        "final_loss": last_loss,
        "device": str(run.device),
        "seconds": round(run.elapsed, 3),
    }


def _collective(run: _Run, what: str) -> contextlib.AbstractContextManager:
    """Under ``torchrun``, a lost peer during ``what`` (DDP's gradient all-reduce, K-FAC's factor
    sums) is one :class:`~curvlab.distributed.DistributedError` line."""
    return distributed.collective(what) if run.ctx.active else contextlib.nullcontext()


def _batch_loss(loss: Tensor, ctx: distributed.Context, what: str) -> float:
    """The mean loss of the whole batch: the average over the processes of their scaled losses
    (:func:`loss_scale`); the loss itself alone."""
    if not ctx.active:
        return float(loss)
    total = loss.detach().reshape(1).to(torch.float64)
    distributed.all_reduce_sum([total], what)
    return float(total) / ctx.world_size


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr,
                disable=not enabled, leave=False)


def _project_weights(model: nn.Module) -> None:
    """Keep model constraints after a step (channel-wise weight normalisation of resnet32/vgg11)."""
    try:
        from curvlab.models.layers import project_weights_
    except ImportError:  # pragma: no cover (the models without constraints)
        return
    project_weights_(model)


def default_data(model: str, model_args: Mapping[str, Any] | None = None) -> str:
    """``pystdlib`` for a model that takes token sequences (it dictates ``vocab``), else ``digits``."""
    from curvlab.models import data_options

    return "pystdlib" if "vocab" in data_options(model, model_args or {}) else "digits"
