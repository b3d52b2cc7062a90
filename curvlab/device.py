"""``--device auto|cpu|cuda``: where the big tensors live."""

from __future__ import annotations

import torch

from curvlab.errors import OptionError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when a GPU is visible, else the CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError(f"--device {name}: no CUDA device is available (use --device auto or cpu)")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise OptionError(f"--device {name}: not a device ({exc})") from None
