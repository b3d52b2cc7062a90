"""``resnet32``: the CIFAR ResNet-32 of seed F.2 (He et al. 2016, section 4.2), as Zhang et al. modify it.

He et al.'s CIFAR network with ``n = blocks``: a 3x3 stem conv, three stages of ``n`` basic residual
blocks (two 3x3 convs each; widths 16, 32, 64; the first block of stages 2 and 3 has stride 2),
global average pooling and the linear classifier: ``6n + 1`` convolutions + 1 Linear, so 31 convs
and 32 weight layers for ``n = 5``. Shortcuts are He et al.'s option A (parameter-free: subsample and
zero-pad the new channels), as He et al. use on CIFAR. Zhang et al.'s changes (seed F.2):

* every batch norm is a ghost batch norm with ghost batch size ``ghost_batch`` (32);
* every convolution is channel-wise weight-normalised: ``||W[c]||_F = 1`` per output channel, kept by
  projection after each optimiser step (:mod:`curvlab.models.layers`); the convs have no bias (the
  following batch norm's ``beta`` plays that role);
* label smoothing 0.1 in the training loss: ``model.label_smoothing``, read by the training loop.

Module paths: ``conv1``/``bn1`` (stem), ``stages.<s>.<b>.conv1``/``bn1``/``conv2``/``bn2`` (stage
``s`` in 0..2, block ``b`` in 0..n-1), ``fc``. A block computes
``relu(shortcut(x) + bn2(conv2(relu(bn1(conv1(x))))))``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.models.layers import GhostBatchNorm2d, init_weight_normalized_convs_, project_weights_
from curvlab.models.resnet8 import shortcut, validate_stage_widths

DEFAULTS: dict[str, object] = {"widths": [16, 32, 64], "blocks": 5, "ghost_batch": 32, "label_smoothing": 0.1}
NUM_STAGES = 3


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN on the branch, option-A shortcut, ReLU after the sum."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, ghost_batch: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.stride = stride
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = GhostBatchNorm2d(out_channels, ghost_batch)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = GhostBatchNorm2d(out_channels, ghost_batch)

    def forward(self, x: Tensor) -> Tensor:
        branch = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(shortcut(x, self.out_channels, self.stride) + branch)


class ResNet32(nn.Module):
    """Stem, three stages of ``blocks`` basic blocks (strides 1, 2, 2), global average pool, ``fc``."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        widths: Sequence[int] = (16, 32, 64),
        blocks: int = 5,
        ghost_batch: int = 32,
        label_smoothing: float = 0.1,
    ) -> None:
        super().__init__()
        self.label_smoothing = float(label_smoothing)
        self.conv1 = nn.Conv2d(input_shape[0], widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = GhostBatchNorm2d(widths[0], ghost_batch)
        stages = []
        previous = widths[0]
        for s, width in enumerate(widths):
            stage = []
            for b in range(blocks):
                stride = 2 if s > 0 and b == 0 else 1
                stage.append(BasicBlock(previous, width, stride, ghost_batch))
                previous = width
            stages.append(nn.ModuleList(stage))
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(previous, num_classes)
        self.weight_normalized = init_weight_normalized_convs_(self)

    def project_weights_(self) -> None:
        """Restore unit Frobenius norm of every conv output channel (call after each optimiser step)."""
        project_weights_(self)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` of a batch ``(N, C, H, W)``."""
        h = F.relu(self.bn1(self.conv1(x)))
        for stage in self.stages:
            for block in stage:
                h = block(h)
        return self.fc(h.mean(dim=(2, 3)))


def validate(args: dict[str, object]) -> str | None:
    """``None`` if the arguments are valid, else why not."""
    problem = validate_stage_widths(args["widths"])
    if problem:
        return problem
    if not 0.0 <= args["label_smoothing"] < 1.0:
        return f"label_smoothing must be in [0, 1), got {args['label_smoothing']}"
    return None


def build(
    input_shape: Sequence[int],
    num_classes: int,
    widths: list[int],
    blocks: int,
    ghost_batch: int,
    label_smoothing: float,
) -> ResNet32:
    """The registry's builder (arguments already validated)."""
    return ResNet32(input_shape, num_classes, widths, blocks, ghost_batch, label_smoothing)
