"""A model's size checked before it is built: its arguments (``--model-arg widths=1000000000``) or
its data (a label of 1e9 makes a classifier of 1e9 outputs) can ask for any number of parameters.

:func:`build_within_budget` builds the model first on PyTorch's ``meta`` device, where modules get
shapes but no memory and no random numbers are drawn, counts its parameters and buffers, and refuses
it with one line (size and limit, :func:`curvlab.limits.check_size`) when they would take more than
one array's budget; only then is the model built for real. Any builder works, the registry's and a
user's own alike.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import nn

from curvlab.errors import ModelError
from curvlab.limits import check_size


def model_bytes(model: nn.Module) -> tuple[int, int]:
    """``(parameter count, bytes of parameters and buffers)`` of a model (on any device, meta too)."""
    count = sum(p.numel() for p in model.parameters())
    nbytes = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
    return count, nbytes


def build_within_budget(what: str, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()``, after a ``meta``-device build shows its parameters fit the memory budget."""
    with torch.device("meta"):
        probe = build()
    count, nbytes = model_bytes(probe)
    del probe
    check_size(f"{what} ({count:,} parameters)", nbytes, ModelError)
    return build()
