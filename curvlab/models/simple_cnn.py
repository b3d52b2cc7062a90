"""``simple_cnn``: the "Simple CNN" of seed F.2 (Shallue et al. 2018, "base" configuration).

``conv1`` (5x5, stride 1, "same" padding, ReLU) -> 2x2 max-pool stride 2 -> ``conv2`` (same) ->
2x2 max-pool stride 2 -> flatten -> ``hidden`` (``nn.Linear``, ReLU) -> ``fc`` (``nn.Linear``, the
classifier). No dropout (seed F.2 drops Shallue et al.'s dropout), no batch norm. Weights use
PyTorch's default ``nn.Conv2d``/``nn.Linear`` initialisation.

The flattened size is computed from the input shape: "same" padding keeps ``H x W`` and each
max-pool floors, so it is ``channels[1] * (H // 2 // 2) * (W // 2 // 2)`` (8x8 digits -> 2x2,
32x32 CIFAR -> 8x8). Inputs need ``H, W >= 4``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

DEFAULTS: dict[str, object] = {"channels": [32, 64], "hidden": 1024}
KERNEL_SIZE = 5
PADDING = KERNEL_SIZE // 2  # "same" for an odd kernel at stride 1


def pooled_size(size: int) -> int:
    """Spatial size after the two 2x2/stride-2 max-pools (floor division, as ``nn.MaxPool2d``)."""
    return size // 2 // 2


class SimpleCNN(nn.Module):
    """Two 5x5 conv + max-pool stages, one fully connected hidden layer, a linear classifier."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (32, 64),
        hidden: int = 1024,
    ) -> None:
        super().__init__()
        in_channels, height, width = input_shape
        c1, c2 = channels
        self.conv1 = nn.Conv2d(in_channels, c1, KERNEL_SIZE, stride=1, padding=PADDING)
        self.conv2 = nn.Conv2d(c1, c2, KERNEL_SIZE, stride=1, padding=PADDING)
        flat = c2 * pooled_size(height) * pooled_size(width)
        self.hidden = nn.Linear(flat, hidden)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` of a batch ``(N, C, H, W)``."""
        h = F.max_pool2d(F.relu(self.conv1(x)), kernel_size=2, stride=2)
        h = F.max_pool2d(F.relu(self.conv2(h)), kernel_size=2, stride=2)
        h = F.relu(self.hidden(h.flatten(1)))
        return self.fc(h)


def check_input(input_shape: Sequence[int]) -> str | None:
    """``None`` if the model can take this input shape, else why not."""
    if min(input_shape[1:]) < 4:
        return f"needs H, W >= 4 (two 2x2 max-pools), got {tuple(input_shape)}"
    return None


def build(
    input_shape: Sequence[int], num_classes: int, channels: list[int], hidden: int
) -> SimpleCNN:
    """The registry's builder (arguments already validated)."""
    return SimpleCNN(input_shape, num_classes, channels=channels, hidden=hidden)
