"""The task: how a batch goes into the model, what its logits are, and which loss they feed.

Everything in curvlab that runs a model on a batch — factor capture (:mod:`curvlab.capture.factors`),
the KFE projections and their curvature (:mod:`curvlab.analysis.gradcov`,
:mod:`curvlab.analysis.curvature`), the K-FAC optimizer and the training loop (:mod:`curvlab.optim`) —
asks a :class:`Task` three questions and nothing else:

* :meth:`Task.split_batch`: ``batch -> (inputs, labels)``. Default: a pair ``(inputs, labels)`` (a tuple
  or a list, as a ``DataLoader`` of a ``TensorDataset`` yields it), or a mapping whose ``labels`` entry
  (``label_key``) is the labels and whose other entries are the inputs, as keywords.
* :meth:`Task.call_model`: ``(model, inputs) -> output``. Default: ``model(x)`` for a tensor,
  ``model(*x)`` for a tuple or list, ``model(**x)`` for a mapping.
* :meth:`Task.logits`: ``output -> logits`` (the tensor the loss is taken of, batch first). Default: the
  output itself when it is a tensor; its ``"logits"`` entry when it is a mapping; its ``.logits``
  attribute otherwise (a dataclass, a Hugging Face ``ModelOutput``). A tuple is refused: which of its
  elements are the logits is the user's to say.

and :attr:`Task.loss` (:mod:`curvlab.capture.loss`; default softmax cross-entropy) says what the loss of
the logits is, hence the Fisher. A custom task passes callables (``Task(loss, logits=lambda out:
out[0])``) or subclasses :class:`Task` (compare kronfluence's ``Task`` and curvlinops' ``loss_func``).

The inputs may hold tensors anywhere in tuples, lists and mappings: :meth:`Task.move` moves every tensor
to the device (and every floating-point one to a dtype) and leaves other values as they are. The batch
must be the first dimension of the logits and of the labels; the inputs' layout is the model's business.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.capture.loss import CrossEntropy, Loss
from curvlab.errors import CurvlabError, DataError, ModelError


class Task:
    """How a batch goes in and what the logits and the loss are (see the module docstring).

    ``split_batch``, ``call_model`` and ``logits`` replace the default of the method of that name;
    ``label_key`` is the labels' key in a mapping batch.
    """

    def __init__(
        self,
        loss: Loss | None = None,
        *,
        split_batch: Callable[[Any], tuple[Any, Tensor | None]] | None = None,
        call_model: Callable[[nn.Module, Any], Any] | None = None,
        logits: Callable[[Any], Tensor] | None = None,
        label_key: str = "labels",
    ) -> None:
        if loss is not None and not isinstance(loss, Loss):
            raise TypeError(f"loss must be a curvlab.capture.loss.Loss, got {type(loss).__name__}")
        self.loss = CrossEntropy() if loss is None else loss
        self.label_key = label_key
        self._split_batch = split_batch
        self._call_model = call_model
        self._logits = logits

    def __repr__(self) -> str:
        custom = [name for name in ("split_batch", "call_model", "logits") if getattr(self, f"_{name}")]
        return f"Task(loss={self.loss!r}{''.join(f', {c}=...' for c in custom)})"

    def split_batch(self, batch: Any) -> tuple[Any, Tensor | None]:
        """``(inputs, labels)`` of one batch."""
        if self._split_batch is not None:
            return self._split_batch(batch)
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        if isinstance(batch, Mapping) and self.label_key in batch:
            return {k: v for k, v in batch.items() if k != self.label_key}, batch[self.label_key]
        raise DataError(
            f"a batch must be a pair (inputs, labels) or a mapping with a {self.label_key!r} entry, got "
            f"{_describe(batch)}; pass a Task(split_batch=...) for another layout"
        )

    def call_model(self, model: nn.Module, inputs: Any) -> Any:
        """The model's output on ``inputs``."""
        if self._call_model is not None:
            return self._call_model(model, inputs)
        if isinstance(inputs, Mapping):
            return model(**inputs)
        if isinstance(inputs, (tuple, list)):
            return model(*inputs)
        return model(inputs)

    def logits(self, output: Any) -> Tensor:
        """The logits in the model's ``output``."""
        if self._logits is not None:
            found = self._logits(output)
        elif isinstance(output, Tensor):
            found = output
        elif isinstance(output, Mapping) and "logits" in output:
            found = output["logits"]
        elif not isinstance(output, (tuple, list, Mapping)) and isinstance(
            getattr(output, "logits", None), Tensor
        ):
            found = output.logits
        else:
            raise ModelError(
                f"the model returned {_describe(output)}: curvlab needs the logits as a tensor, a mapping "
                "with a 'logits' entry or an object with a .logits attribute; pass a Task(logits=...) that "
                "picks them"
            )
        if not isinstance(found, Tensor):
            raise ModelError(f"the logits the task picked are {_describe(found)}, not a tensor")
        return found

    def forward(self, model: nn.Module, inputs: Any) -> Tensor:
        """``logits(call_model(model, inputs))``."""
        return self.logits(self.call_model(model, inputs))

    @staticmethod
    def move(value: Any, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Any:
        """``value`` with every tensor moved to ``device`` and every floating-point tensor cast to
        ``dtype`` (either may be ``None``), through tuples, lists, mappings and dataclasses."""
        if isinstance(value, Tensor):
            cast = dtype if dtype is not None and value.is_floating_point() else None
            return value.to(device=device, dtype=cast)
        if isinstance(value, Mapping):  # a plain dict after the move: model(**inputs) takes any mapping
            return {k: Task.move(v, device, dtype) for k, v in value.items()}
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
            return type(value)(*(Task.move(v, device, dtype) for v in value))
        if isinstance(value, (tuple, list)):
            return type(value)(Task.move(v, device, dtype) for v in value)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            fields = {
                f.name: Task.move(getattr(value, f.name), device, dtype)
                for f in dataclasses.fields(value)
                if f.init
            }
            return dataclasses.replace(value, **fields)
        return value


def batch_size(inputs: Any) -> int | None:
    """The number of examples of a batch's inputs: the first dimension of its first tensor (through
    tuples, lists, mappings and dataclasses, in order); ``None`` when it holds no tensor with one."""
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0]) if inputs.dim() else None
    if isinstance(inputs, Mapping):
        values = list(inputs.values())
    elif isinstance(inputs, (tuple, list)):
        values = list(inputs)
    elif dataclasses.is_dataclass(inputs) and not isinstance(inputs, type):
        values = [getattr(inputs, f.name) for f in dataclasses.fields(inputs)]
    else:
        return None
    for value in values:
        size = batch_size(value)
        if size is not None:
            return size
    return None


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"


@contextlib.contextmanager
def batch_context(index: int) -> Iterator[None]:
    """Prefix the one-line message of a :class:`~curvlab.errors.CurvlabError` raised inside with
    ``batch <index>: `` (which batch of the data the loss or the task refused)."""
    try:
        yield
    except CurvlabError as exc:
        message = str(exc)
        if message.startswith("batch "):
            raise
        try:
            prefixed = type(exc)(f"batch {index}: {message}")
        except TypeError:  # an error class with another constructor: as it is
            raise exc from None
        raise prefixed from None


def default_task(task: Task | None) -> Task:
    """``task``, or the default :class:`Task` (softmax cross-entropy, ``(x, y)`` batches)."""
    if task is None:
        return Task()
    if not isinstance(task, Task):
        raise TypeError(f"task must be a curvlab.capture.task.Task, got {type(task).__name__}")
    return task
