"""A user's 1-D convolutional net for signals (N, C, L), and the data factory that makes its signals.

`--model tests/own_models/conv1d.py:build --data tests/own_models/conv1d.py:signals`: two classes
of noisy sine waves of two frequencies (deterministic: a fixed generator).
"""

import math

import torch
from torch import nn


def build(input_shape, num_classes, channels=6, kernel=5):
    c, length = input_shape
    return nn.Sequential(
        nn.Conv1d(c, channels, kernel, padding=kernel // 2),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(4),
        nn.Flatten(),
        nn.Linear(4 * channels, 16),
        nn.Tanh(),
        nn.Linear(16, num_classes),
    )


def signals(split="train"):
    generator = torch.Generator().manual_seed(0 if split != "test" else 1)
    n, length = 96, 32
    y = torch.arange(n) % 2
    t = torch.arange(length) / length
    freq = torch.where(y == 0, 2.0, 5.0)[:, None]
    phase = torch.rand(n, 1, generator=generator) * 2 * math.pi
    x = torch.sin(2 * math.pi * freq * t + phase) + 0.3 * torch.randn(n, length, generator=generator)
    return x[:, None, :], y
