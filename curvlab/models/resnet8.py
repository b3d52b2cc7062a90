"""``resnet8``: the ResNet-8 of seed F.2 (Shallue et al. 2018), without batch normalisation.

Eight weight layers: seven 3x3 ``nn.Conv2d`` and one ``nn.Linear`` classifier. Module paths:

* ``conv1``: the stem, 3x3 stride 1, ``C -> widths[0]``, then ReLU;
* ``blocks.0``, ``blocks.1``, ``blocks.2``: one basic residual block per stage, each with
  ``conv1`` (3x3, stride 1 in the first stage and 2 in the others, then ReLU) and ``conv2``
  (3x3, stride 1); the block's output is ``relu(shortcut(x) + conv2(relu(conv1(x))))``;
* ``fc``: global average pooling, then the linear classifier.

The shortcuts carry no parameters (He et al. 2016, option A): where a block downsamples or widens,
the shortcut takes every second pixel (``x[:, :, ::2, ::2]``, the centres of the stride-2 3x3
windows) and zero-pads the new channels. So the network has exactly 7 convolutions, all of them
3x3 and weight-carrying, as in the seed; ``widths`` must therefore be non-decreasing.

Initialisation (no batch norm to keep activations in range): every conv weight is He-normal
(``kaiming_normal_``, fan-in, ReLU gain), conv biases are zero, and the last conv of each residual
branch (``blocks.*.conv2``) is then scaled by ``1/sqrt(number of blocks)`` (= ``BRANCH_SCALE``),
so each block adds about a third of the signal's second moment instead of doubling it; no weight is
zero, so every parameter gets a gradient. ``fc`` keeps PyTorch's default ``nn.Linear`` init.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULTS: dict[str, object] = {"widths": [16, 32, 64], "bias": True}
NUM_STAGES = 3
BRANCH_SCALE = 1.0 / math.sqrt(NUM_STAGES)
NUM_CONVS = 1 + 2 * NUM_STAGES  # = 7: the stem and two per residual block


def shortcut(x: Tensor, out_channels: int, stride: int) -> Tensor:
    """Parameter-free (option A) shortcut: subsample by ``stride``, zero-pad the new channels."""
    if stride != 1:
        x = x[:, :, ::stride, ::stride]
    extra = out_channels - x.shape[1]
    if extra > 0:
        x = F.pad(x, (0, 0, 0, 0, 0, extra))
    return x


class BasicBlock(nn.Module):
    """Two 3x3 convs on the residual branch, a parameter-free shortcut, ReLU after the sum."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, bias: bool) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.stride = stride
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """``relu(shortcut(x) + conv2(relu(conv1(x))))``."""
        branch = self.conv2(F.relu(self.conv1(x)))
        return F.relu(shortcut(x, self.out_channels, self.stride) + branch)


class ResNet8(nn.Module):
    """Stem conv, three one-block stages (strides 1, 2, 2), global average pool, classifier."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        widths: Sequence[int] = (16, 32, 64),
        bias: bool = True,
    ) -> None:
        super().__init__()
        in_channels = input_shape[0]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=bias)
        blocks = []
        previous = widths[0]
        for stage, width in enumerate(widths):
            blocks.append(BasicBlock(previous, width, stride=1 if stage == 0 else 2, bias=bias))
            previous = width
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(previous, num_classes, bias=bias)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """He-normal convs with zero biases; the last conv of each branch scaled by BRANCH_SCALE."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            block.conv2.weight.mul_(BRANCH_SCALE)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` of a batch ``(N, C, H, W)``."""
        h = F.relu(self.conv1(x))
        for block in self.blocks:
            h = block(h)
        return self.fc(h.mean(dim=(2, 3)))


def validate_stage_widths(widths: Sequence[int]) -> str | None:
    """One width per stage, non-decreasing (the parameter-free shortcuts can only add channels)."""
    if len(widths) != NUM_STAGES:
        return f"widths must have {NUM_STAGES} entries (one per stage), got {widths}"
    if any(b < a for a, b in zip(widths[:-1], widths[1:], strict=True)):
        return f"widths must be non-decreasing (parameter-free shortcuts), got {widths}"
    return None


def validate(args: dict[str, object]) -> str | None:
    """``None`` if the arguments are valid, else why not."""
    return validate_stage_widths(args["widths"])


def build(input_shape: Sequence[int], num_classes: int, widths: list[int], bias: bool) -> ResNet8:
    """The registry's builder (arguments already validated)."""
    return ResNet8(input_shape, num_classes, widths=widths, bias=bias)
