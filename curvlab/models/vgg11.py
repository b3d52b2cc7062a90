"""``vgg11``: VGG-11 (Simonyan & Zisserman 2015, configuration A) as in seed F.2.

Eight 3x3 convolutions (stride 1, padding 1) with 2x2 max-pooling (stride 2) after convs 1, 2, 4, 6
and 8 (``channels`` default 64, 128, 256, 256, 512, 512, 512, 512), then the linear classifier
(seed F.2's "1 fully connected hidden layer", read as the classifier like for ResNet-8/32: 8 convs +
1 Linear). Each conv is followed by a ghost batch norm (ghost batch 32) and ReLU, is channel-wise
weight-normalised (``||W[c]||_F = 1``, no bias; :mod:`curvlab.models.layers`), and the training loss
uses label smoothing 0.1 (``model.label_smoothing``).

Small inputs: a pool is applied only while the feature map is at least 2x2, so a pool that would
shrink it below 1x1 is dropped. On 32x32 all five pools run (32 -> 1); on 8x8 only the first three
(8 -> 4 -> 2 -> 1). The final map is flattened (``channels[-1] * h * w`` features; 512 on 32x32 and
on 8x8). Module paths: ``blocks.<i>.conv``, ``blocks.<i>.bn`` (``i`` in 0..7; ``blocks.<i>.pool``
says whether a pool follows), ``fc``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.models.layers import GhostBatchNorm2d, init_weight_normalized_convs_, project_weights_

DEFAULTS: dict[str, object] = {
    "channels": [64, 128, 256, 256, 512, 512, 512, 512],
    "ghost_batch": 32,
    "label_smoothing": 0.1,
}
NUM_CONVS = 8
#: Indices (0-based) of the convs followed by a 2x2 max-pool in VGG configuration A.
POOL_AFTER = (0, 1, 3, 5, 7)


class ConvBlock(nn.Module):
    """conv (3x3, no bias) -> ghost BN -> ReLU -> optional 2x2 max-pool."""

    def __init__(self, in_channels: int, out_channels: int, ghost_batch: int, pool: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn = GhostBatchNorm2d(out_channels, ghost_batch)
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn(self.conv(x)))
        return F.max_pool2d(h, 2, 2) if self.pool else h


def pooled_size(height: int, width: int) -> tuple[list[bool], int, int]:
    """Which convs are followed by a pool on an ``height x width`` input, and the final map size."""
    pools = []
    for i in range(NUM_CONVS):
        pool = i in POOL_AFTER and min(height, width) >= 2
        if pool:
            height, width = height // 2, width // 2
        pools.append(pool)
    return pools, height, width


class VGG11(nn.Module):
    """Eight conv blocks (pools where the map allows), flatten, linear classifier ``fc``."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (64, 128, 256, 256, 512, 512, 512, 512),
        ghost_batch: int = 32,
        label_smoothing: float = 0.1,
    ) -> None:
        super().__init__()
        self.label_smoothing = float(label_smoothing)
        c, h, w = input_shape
        pools, h_out, w_out = pooled_size(h, w)
        blocks = []
        for width, pool in zip(channels, pools, strict=True):
            blocks.append(ConvBlock(c, width, ghost_batch, pool))
            c = width
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(c * h_out * w_out, num_classes)
        self.weight_normalized = init_weight_normalized_convs_(self)

    def project_weights_(self) -> None:
        """Restore unit Frobenius norm of every conv output channel (call after each optimiser step)."""
        project_weights_(self)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` of a batch ``(N, C, H, W)``."""
        h = x
        for block in self.blocks:
            h = block(h)
        return self.fc(h.flatten(1))


def validate(args: dict[str, object]) -> str | None:
    """``None`` if the arguments are valid, else why not."""
    if len(args["channels"]) != NUM_CONVS:
        return f"channels must have {NUM_CONVS} entries (one per conv), got {args['channels']}"
    if not 0.0 <= args["label_smoothing"] < 1.0:
        return f"label_smoothing must be in [0, 1), got {args['label_smoothing']}"
    return None


def build(
    input_shape: Sequence[int],
    num_classes: int,
    channels: list[int],
    ghost_batch: int,
    label_smoothing: float,
) -> VGG11:
    """The registry's builder (arguments already validated)."""
    return VGG11(input_shape, num_classes, channels, ghost_batch, label_smoothing)
