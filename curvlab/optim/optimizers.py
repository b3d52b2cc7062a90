"""The four optimizers of a run (seed F.4) behind one interface: ``sgd``, ``momentum`` and ``adam``
(:class:`TorchOptimizer`, wrapping ``torch.optim``) and ``kfac`` (:class:`curvlab.optim.kfac.KFAC`).

The training loop uses ``lr`` (set before every update from the schedule), ``train_step``,
``state_dict`` / ``load_state_dict`` (the run's state files) and ``close``. :func:`make_optimizer` builds
the one named by :attr:`TrainConfig.optimizer <curvlab.optim.config.TrainConfig>` with its
hyper-parameters: SGD ``(lr, weight_decay)``, SGD with heavy-ball ``momentum``, Adam with
``betas = (momentum, beta2)`` and ``eps``, K-FAC with damping, KL clipping, factor moving averages and
the Fisher type.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.capture.task import Task, default_task
from curvlab.errors import CheckpointError
from curvlab.optim.config import TrainConfig
from curvlab.optim.kfac import KFAC
from curvlab.optim.runfolder import _first_line


class TorchOptimizer:
    """``sgd``, ``momentum`` or ``adam`` behind the interface the loop uses (``lr``, ``train_step``).

    ``model`` is what the forward pass calls: the model, or its ``DistributedDataParallel`` wrapper;
    ``task`` how inputs go into it and where its logits are (:class:`~curvlab.capture.task.Task`).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, task: Task | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.task = default_task(task)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @lr.setter
    def lr(self, value: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = value

    def train_step(
        self, inputs: Any, labels: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None, *,
        rows: tuple[int, int] | None = None,
    ) -> Tensor:
        """One update (``loss_fn`` defaults to the task's mean loss); ``rows`` (the slice of the batch,
        see :meth:`KFAC.backward`) draws nothing here."""
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.task.forward(self.model, inputs)
        loss = (self.task.loss.mean if loss_fn is None else loss_fn)(logits, labels)
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
    config: TrainConfig, model: nn.Module, forward_module: nn.Module | None = None, task: Task | None = None
) -> KFAC | TorchOptimizer:
    """The optimizer of F.4 named by ``config.optimizer`` (hyper-parameters from ``config``).

    ``forward_module``: what the training forward pass calls (default ``model``; under ``torchrun`` its
    ``DistributedDataParallel`` wrapper); K-FAC's hooks stay on ``model``. ``task``: inputs, logits and
    loss (:class:`~curvlab.capture.task.Task`; K-FAC's Fisher is its loss's).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    forward = model if forward_module is None else forward_module
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay)
        return TorchOptimizer(forward, opt, task)
    if config.optimizer == "momentum":
        opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                              weight_decay=config.weight_decay)
        return TorchOptimizer(forward, opt, task)
    if config.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=config.lr, betas=(config.momentum, config.beta2), eps=config.eps,
                               weight_decay=config.weight_decay)
        return TorchOptimizer(forward, opt, task)
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
        task=task,
    )
