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


def build_own_within_budget(what: str, build: Callable[[], nn.Module]) -> nn.Module:
    """:func:`build_within_budget` for a user's factory (``--model PATH.py:FUNC``), whose code may not
    run on the ``meta`` device (it reads a tensor's values, loads weights, ...): a probe that raises or
    returns something else is skipped and the model is built as it is (its own code's failures are
    then reported by the caller, as before). A probe that succeeds and is over the budget is refused."""
    try:
        with torch.device("meta"):
            probe = build()
    except Exception:  # noqa: BLE001 (the user's code: whatever fails on meta is decided by the real build)
        probe = None
    if isinstance(probe, nn.Module):
        count, nbytes = model_bytes(probe)
        del probe
        check_size(f"{what} ({count:,} parameters)", nbytes, ModelError)
    return build()

