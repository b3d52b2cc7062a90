"""What a loaded data set is: the :class:`Dataset` type every source returns, and the two helpers
every source uses to word its one-line :class:`~curvlab.errors.DataError`.

Images: ``x`` float32 ``(N, C, H, W)``, ``y`` int64 ``(N,)``. Text (next-token prediction, see
:mod:`curvlab.io.data.text`): ``x`` int64 token ids ``(N, seq_len)`` and ``y`` int64 ``(N, seq_len)`` with
``y[t] = x[t + 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor


@dataclass(repr=False)
class Dataset:
    """A labelled data set held in memory.

    Images: ``x`` float32 ``(N, C, H, W)``, ``y`` int64 ``(N,)``. Text: ``x`` int64 token ids
    ``(N, seq_len)``, ``y`` int64 ``(N, seq_len)`` the next tokens, ``num_classes`` the vocabulary
    size, ``vocabulary`` the token strings by id and ``tokenizer`` ``"python"`` or ``"words"``.
    """

    x: Tensor
    y: Tensor
    num_classes: int
    name: str
    split: str = "all"
    vocabulary: tuple[str, ...] | None = None
    tokenizer: str | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one example: ``(C, H, W)`` for images, ``(seq_len,)`` for text."""
        return tuple(int(v) for v in self.x.shape[1:])

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})"
        )


def _describe(value: Any) -> str:
    """Short description of a value for an error message."""
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    return type(value).__name__


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

