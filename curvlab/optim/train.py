"""Training runs that save K-FAC factors along the way (seed E.1), with the schedules of F.3 and the
optimizers of F.4, resumable after a crash: the run itself — build it, loop over the steps, save and
restore its state.

The pieces a run is made of have their own modules: the config (:mod:`curvlab.optim.config`), the
learning rate and the saved steps (:mod:`curvlab.optim.schedules`), the data order and each process's
share of a batch (:mod:`curvlab.optim.batches`), the optimizers (:mod:`curvlab.optim.optimizers`) and
the run folder ``RUN/`` with ``config.json``, ``ckpt.h5``, ``metrics.jsonl`` and ``state-<t>.pt``
(:mod:`curvlab.optim.runfolder`, docs/training.md). Their public names are importable from here too.

Step ``t`` means "after ``t`` optimizer updates". At every saved step ``t`` the state file
``state-<t>.pt`` (weights, optimizer state, RNG states) is written atomically *before* step ``t`` is
appended to ``ckpt.h5``, and older state files are deleted after; ``resume`` continues from the last
complete step of ``ckpt.h5`` and equals an uninterrupted run, since the learning rate and the batch of
every update are functions of the step alone.

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
import json
import math
import os
import pickle
import re
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from curvlab import distributed
from curvlab.capture.factors import FactorSet, collect_factors, model_weights
from curvlab.capture.loss import make_loss
from curvlab.capture.task import Task
from curvlab.errors import CheckpointError, CurvlabError, OptionError
from curvlab.io.atomic import atomic_output, remove_quietly
from curvlab.io.checkpoint import append_step
from curvlab.limits import check_regular_file, check_size
from curvlab.optim.augment import Augmenter, black_level, check_augment, default_padding
from curvlab.optim.batches import BatchOrder, loss_scale, shard
from curvlab.optim.config import DEFAULT_LR as DEFAULT_LR
from curvlab.optim.config import OPTIMIZERS, SCHEDULES, TrainConfig
from curvlab.optim.kfac import KFAC
from curvlab.optim.optimizers import TorchOptimizer, make_optimizer
from curvlab.optim.runfolder import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    STATE_FORMAT,
    _complete_steps,
    _first_line,
    _remove_stale_temps,
    _state_files,
    _truncate_metrics,
    _write_json,
    read_config,
)
from curvlab.optim.schedules import learning_rate, save_steps

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "TrainConfig",
    "learning_rate",
    "loss_scale",
    "prepare",
    "read_config",
    "save_steps",
    "shard",
    "train",
    "updates",
]

#: Options that may differ when a run is resumed (they change what is saved, not the trajectory).
RESUMABLE_CHANGES = ("steps", "save_every", "save_steps")


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
    task: Task = field(default_factory=Task)
    ctx: distributed.Context = field(default_factory=distributed.Context)
    elapsed: float = 0.0
    augmenter: Augmenter | None = None

    @property
    def checkpoint(self) -> str:
        return os.path.join(self.run_dir, CHECKPOINT_FILE)

    @property
    def shard(self) -> tuple[int, int]:
        """``(offset, count)`` of this process's examples in every batch (:func:`shard`)."""
        return shard(self.config.batch_size, self.ctx.rank, self.ctx.world_size)

    def loss_fn(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The task's mean loss of this process's examples (torch's ``reduction="mean"``), times
        :func:`loss_scale` (1 alone). With an ``ignore_index`` the processes hold different numbers
        of loss terms ``K_r``: the scale is then ``W K_r / K`` (``K`` added up over the processes), so
        that the average is again the mean over the whole batch's terms."""
        loss = self.task.loss.mean(logits, labels)
        if not self.ctx.active:
            return loss
        if self.task.loss.counted(labels) is None:
            return loss * loss_scale(self.shard[1], self.config.batch_size, self.ctx.world_size)
        terms = self.task.loss.num_terms(logits, labels)
        total = torch.tensor([terms], dtype=torch.int64, device=logits.device)
        distributed.all_reduce_sum([total], "adding up the loss terms")
        return loss * (self.ctx.world_size * terms / int(total)) if int(total) else loss

    def factor_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        from curvlab.io.data import iterate_batches

        return iterate_batches(self.factor_data, self.config.batch_size)


def _build(config: TrainConfig, run_dir: str, device: torch.device, data: Any = None) -> _Run:
    from curvlab.io.data import data_factory_spec, load_dataset, load_factory_data
    from curvlab.models import build_model, config_of, data_options
    from curvlab.models.factory import build_factory_model, check_forward
    from curvlab.usercode import is_factory_spec

    factory = is_factory_spec(config.model)
    if data is None and data_factory_spec(config.data):
        data = load_factory_data(config.data, split="train", limit=config.examples)
    elif data is None:
        options = {} if factory else data_options(config.model, config.model_args)
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
    build = build_factory_model if factory else build_model
    model = build(config.model, data.input_shape, data.num_classes, config.model_args)
    if factory:
        check_forward(model, data, f"--model {config.model} on --data {config.data}")
    model.to(device).train()
    task = Task(make_loss(config.loss, ignore_index=config.ignore_index,
                          label_smoothing=training_label_smoothing(config, model)))
    described = {**(config_of(model) or {}), "data": config.data}
    factor_count = min(config.factor_examples, len(data))
    factor_data = dataclasses.replace(data, x=data.x[:factor_count], y=data.y[:factor_count])
    optimizer = make_optimizer(config, model, _data_parallel(model, device, ctx), task)
    return _Run(config, run_dir, model, optimizer, data, factor_data, described, device, task, ctx,
                augmenter=_augmenter(config, data))


def training_label_smoothing(config: TrainConfig, model: nn.Module) -> float:
    """``--label-smoothing`` when given, else the model's own ``label_smoothing`` (resnet32, vgg11), or 0."""
    if config.label_smoothing is not None:
        return float(config.label_smoothing)
    return float(getattr(model, "label_smoothing", 0.0) or 0.0) if config.loss == "cross-entropy" else 0.0


def _augmenter(config: TrainConfig, data: Any) -> Augmenter | None:
    """The run's data augmentation (:mod:`curvlab.optim.augment`), or None."""
    check_augment(config.augment, config.data, data.input_shape)
    if not config.augment:
        return None
    channels, height, width = data.input_shape
    padding = config.augment_padding or default_padding(height, width)
    return Augmenter(config.augment, padding, black_level(config.data, channels), config.seed)


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
            seed=run.config.seed + step, task=run.task,
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
    check_regular_file(path, CheckpointError, "training state")
    check_size(f"{path}: the training state", os.path.getsize(path), CheckpointError)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused an object: say what, suggest nothing
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" (it holds {found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path}: refused: a training state holds only tensors and plain numbers{what}"
        ) from None
    except Exception as exc:  # noqa: BLE001 (any unreadable file is one user-facing error)
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


def _check_run_folder(run_dir: str, parent: str) -> None:
    """The run folder can be written (or created): checked before anything is built or trained."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise OptionError(f"{run_dir}: not a folder (the run folder holds ckpt.h5, config.json, ...)")
    folder = run_dir if os.path.isdir(run_dir) else parent
    if not os.access(folder, os.W_OK | os.X_OK):
        what = "the run folder is not writable" if folder == run_dir else f"cannot create it in {parent}"
        raise OptionError(f"{run_dir}: {what} (permission denied)")


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
    created = False
    if ctx.is_main:
        _check_run_folder(run_dir, parent)
        created = not os.path.isdir(run_dir)
        os.makedirs(run_dir, exist_ok=True)
        if resume:
            _remove_stale_temps(run_dir)
    try:
        start = _start(config, run_dir, resume)
        # every process has seen the folder as it was before process 0 writes to it
        distributed.barrier("checking the run folder")
        device = torch.device(device)
        run = _build(config, run_dir, device)
        if start is not None:
            run.model_config = _recorded_model(run)
    except BaseException:
        if created:  # refused before the first step (a model over the budget, bad data): leave nothing
            with contextlib.suppress(OSError):
                os.rmdir(run_dir)  # only while still empty: nothing is written before the loop
        raise
    try:
        summary = _loop(run, start, progress and ctx.is_main)
    finally:
        run.optimizer.close()
    summary["resumed_from"] = start
    return summary


def _recorded_model(run: _Run) -> dict[str, Any]:
    """On resume, the model config ``ckpt.h5`` recorded (the steps appended next must agree with it);
    a factory file changed since is a one-line warning (:func:`curvlab.usercode.check_recorded`)."""
    from curvlab.io.checkpoint import CheckpointReader
    from curvlab.usercode import FactoryWarning, recorded_factory

    with CheckpointReader(run.checkpoint) as reader:
        recorded = reader.model_config
    if recorded is None:
        return run.model_config
    sha, now = recorded.get("factory_sha256"), run.model_config.get("factory_sha256")
    if recorded_factory(recorded) and isinstance(sha, str) and now and sha != now:
        warnings.warn(f"{run.checkpoint}: {run.model_config.get('factory_file')} has changed since the run "
                      f"recorded it (sha256 {now[:12]}…, recorded {sha[:12]}…)", FactoryWarning, stacklevel=2)
    return recorded


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
    last_loss: float | None = None
    clock = time.perf_counter() - run.elapsed
    bar = _progress_bar(config.steps, start, progress)
    with open(metrics_path, "a", encoding="utf-8") if main else contextlib.nullcontext() as metrics:
        for t, loss, lr in updates(run, start):
            if not math.isfinite(loss):
                raise CurvlabError(f"{run.run_dir}: step {t}: the training loss is {loss} (diverged); "
                                   "lower --lr or raise --damping")
            last_loss = loss
            run.elapsed = time.perf_counter() - clock
            record: dict[str, Any] = {"step": t, "loss": loss, "lr": lr, "time": round(run.elapsed, 4)}
            if isinstance(run.optimizer, KFAC) and run.optimizer.last_nu is not None:
                record["nu"] = run.optimizer.last_nu
            if metrics is not None:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}")
            if t in saves:
                _save_step(run, t)
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


def updates(run: _Run, start: int = 0) -> Iterator[tuple[int, float, float]]:
    """The updates of a run from step ``start`` to ``config.steps``, one at a time.

    Each update from step ``t`` to ``t + 1`` sets the learning rate ``α(t)`` of seed F.3, trains on
    the batch of step ``t`` (this process's slice of it under ``torchrun``), adds up the batch loss and
    applies the models' weight projection; then it yields ``(t + 1, batch loss, α(t))``. The loss is
    not checked: a non-finite value is the caller's to judge (``curvlab train`` stops with an error,
    ``curvlab sweep`` records the trial as diverged). Both ``curvlab train`` and the trials of
    ``curvlab sweep`` train through this generator.
    """
    config = run.config
    order = BatchOrder(len(run.data), config.batch_size, config.seed)
    offset, count = run.shard
    for t in range(start, config.steps):
        lr = learning_rate(config, t)
        run.optimizer.lr = lr
        index = order.indices(t)[offset : offset + count]
        inputs, labels = run.data.x[index], run.data.y[index]
        if run.augmenter is not None:
            inputs = run.augmenter(inputs, t, (offset, config.batch_size))
        inputs, labels = inputs.to(run.device), labels.to(run.device)
        with _collective(run, f"step {t + 1}"):
            loss = run.optimizer.train_step(inputs, labels, run.loss_fn, rows=(offset, config.batch_size))
        loss = _batch_loss(loss, run.ctx, f"step {t + 1}: adding up the batch loss")
        _project_weights(run.model)
        yield t + 1, loss, lr


def prepare(config: TrainConfig, device: torch.device | str = "cpu", data: Any = None) -> _Run:
    """A run held in memory, ready for :func:`updates` from step 0: data, model (``config.seed``),
    optimizer, and for K-FAC its factors estimated on the fixed factor set at the initial weights
    (without side effects on the model's buffers or the RNG, as in ``curvlab train``). ``data``: the
    training split already loaded (``load_dataset(config.data, split="train", limit=config.examples)``),
    to skip loading it again. Nothing is written; the caller closes ``run.optimizer``. Used by
    ``curvlab sweep``'s trials."""
    config = config.resolved()
    run = _build(config, "", torch.device(device), data)
    if isinstance(run.optimizer, KFAC):
        with _no_side_effects(run.model):
            run.optimizer.initialize_factors(run.factor_batches())
    return run


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
    from curvlab.progress import progress_bar

    return progress_bar(total=total, initial=initial, desc="train", unit="step", enabled=enabled)


def _project_weights(model: nn.Module) -> None:
    """Keep model constraints after a step (channel-wise weight normalisation of resnet32/vgg11)."""
    try:
        from curvlab.models.layers import project_weights_
    except ImportError:  # pragma: no cover (the models without constraints)
        return
    project_weights_(model)


def default_data(model: str, model_args: Mapping[str, Any] | None = None) -> str:
    """``pystdlib`` for a model that takes token sequences (it dictates ``vocab``), else ``digits`` (also
    for a factory's model)."""
    from curvlab.models import data_options
    from curvlab.usercode import is_factory_spec

    if is_factory_spec(model):
        return "digits"
    return "pystdlib" if "vocab" in data_options(model, model_args or {}) else "digits"
