"""A user's CNN, outside the package: conv stem, a residual block with BatchNorm, global pooling, Linear.

Used by the tests as `--model tests/own_models/cnn.py:build` on the bundled digits (1, 8, 8).
BatchNorm runs in eval mode during factor capture (curvlab puts the model in eval mode).
"""

from torch import nn


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(self.bn1(self.conv1(x)).relu())


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.block = Residual(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        h = self.block(self.stem(x).relu()).relu()
        return self.head(h.mean(dim=(2, 3)))


def build(input_shape, num_classes, width=8):
    return SmallCNN(input_shape[0], num_classes, width)
