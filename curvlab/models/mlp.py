"""``mlp``: a multilayer perceptron on flattened inputs.

Layers (module paths, which become HDF5 layer names): ``hidden.0``, ``hidden.1``, ... (``nn.Linear``
followed by ReLU, one per entry of ``widths``) and the classifier ``fc`` (``nn.Linear``, no
activation). Weights use PyTorch's default ``nn.Linear`` initialisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

DEFAULTS: dict[str, object] = {"widths": [128, 128], "bias": True}


class MLP(nn.Module):
    """Flatten ``(N, C, H, W)`` to ``(N, C*H*W)``, Linear+ReLU hidden layers, Linear classifier."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        widths: Sequence[int] = (128, 128),
        bias: bool = True,
    ) -> None:
        super().__init__()
        in_features = math.prod(input_shape)
        self.hidden = nn.ModuleList()
        for width in widths:
            self.hidden.append(nn.Linear(in_features, width, bias=bias))
            in_features = width
        self.fc = nn.Linear(in_features, num_classes, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` of a batch ``(N, C, H, W)``."""
        h = x.flatten(1)
        for layer in self.hidden:
            h = F.relu(layer(h))
        return self.fc(h)


def build(input_shape: Sequence[int], num_classes: int, widths: list[int], bias: bool) -> MLP:
    """The registry's builder (arguments already validated)."""
    return MLP(input_shape, num_classes, widths=widths, bias=bias)
