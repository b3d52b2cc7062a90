"""``--device auto|cpu|cuda``: where the big tensors live."""

from __future__ import annotations

import os

import torch

from curvlab.choices import DEVICE_CHOICES  # noqa: F401  (--device's choices, defined without torch)
from curvlab.errors import OptionError


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when a GPU is visible, else the CPU; ``cuda`` without a GPU is an error.

    Under ``torchrun`` a bare ``cuda`` (or ``auto`` on a GPU machine) is the process's own GPU,
    ``cuda:LOCAL_RANK``.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError(f"--device {name}: no CUDA device is available (use --device auto or cpu)")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise OptionError(f"--device {name}: not a device ({exc})") from None
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            raise OptionError(f"--device {name}: process with LOCAL_RANK={local_rank} but only "
                              f"{torch.cuda.device_count()} GPUs are visible")
        device = torch.device("cuda", local_rank)
    return device
