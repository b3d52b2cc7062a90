"""Data augmentation of training images: random crop with padding, horizontal flip (seed F.1).

Seed F.1: "For CIFAR10 we used data augmentation (including horizontal flip and random crop)". The
usual form of both, applied to each training example independently at every update:

* **random crop with padding** ``P``: the image is padded by ``P`` pixels on every side with the value
  of a black pixel (the data set's standardised 0, :func:`black_level`), and an ``H × W`` window is
  cut at an offset ``(dy, dx)`` drawn uniformly from ``{0, …, 2P}²``; equivalently the image is
  translated by ``(dy − P, dx − P)`` and the uncovered border is black. (CIFAR-10's common ``P = 4`` is
  an eighth of the side; :func:`default_padding` keeps that fraction, at least one pixel.)
* **horizontal flip** with probability ½ — only where it preserves the label: a mirrored digit is not a
  digit (a flipped 2 or 7), so ``flip`` is refused on the ``digits`` source.

**Random state.** The draws of the update from step ``t`` to ``t + 1`` come from a generator seeded by
``(seed, t)`` (:func:`step_generator`), like the batch order (:mod:`curvlab.optim.batches`), and are
drawn for the whole batch of ``B`` examples, of which each process applies its own slice. The
augmentation is therefore a function of the step: a resumed run draws what the uninterrupted one drew
(its random state is the step, which the state file holds), and the draws do not depend on the number
of processes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from curvlab.errors import OptionError

#: The augmentations ``--augment`` accepts (comma-separated).
AUGMENTATIONS = ("crop", "flip")
#: Salt of the augmentation generator's seed, so it never shares a stream with the batch order.
_SALT = 0xA06


def parse_augment(text: str | Sequence[str] | None) -> list[str]:
    """``"crop,flip"`` → ``["crop", "flip"]``; ``"none"``, ``""`` or None → ``[]``; unknown names refused."""
    if text is None:
        return []
    items = text.split(",") if isinstance(text, str) else list(text)
    names = [item.strip() for item in items if item.strip() and item.strip() != "none"]
    for name in names:
        if name not in AUGMENTATIONS:
            raise OptionError(f"--augment {name!r}: choose from {', '.join(AUGMENTATIONS)} "
                              "(comma-separated) or none")
    return sorted(set(names), key=AUGMENTATIONS.index)


def check_augment(names: Sequence[str], data_spec: str, input_shape: Sequence[int]) -> None:
    """Refuse augmentations that do not fit the data: any on token sequences, ``flip`` on ``digits``."""
    if not names:
        return
    if len(input_shape) != 3:
        raise OptionError(f"--augment {','.join(names)}: {data_spec} holds sequences, not images "
                          f"(example shape {tuple(input_shape)})")
    if "flip" in names and data_spec.partition(":")[0] == "digits":
        raise OptionError("--augment flip: a mirrored digit is not the same digit (a flipped 2, 3 or 7 "
                          "changes class), so digits take crop only")


def default_padding(height: int, width: int) -> int:
    """An eighth of the shorter side (4 pixels on CIFAR-10's 32), at least 1."""
    return max(1, round(min(height, width) / 8))


def black_level(data_spec: str, channels: int) -> Tensor:
    """Per-channel value of a black (0) pixel after the source's standardisation (docs/data.md)."""
    source = data_spec.partition(":")[0]
    if source == "digits":
        from curvlab.io.data.images import DIGITS_MEAN, DIGITS_STD

        return torch.full((channels,), -DIGITS_MEAN / DIGITS_STD)
    if source == "cifar10":
        from curvlab.io.data.cifar10 import CIFAR10_MEAN, CIFAR10_STD

        return -torch.tensor(CIFAR10_MEAN) / torch.tensor(CIFAR10_STD)
    return torch.zeros(channels)  # npz: pixels are not standardised


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of the augmentation draws of the update from ``step`` (seeded by ``(seed, step)``)."""
    state = int(np.random.SeedSequence([seed, step, _SALT]).generate_state(1)[0])
    return torch.Generator().manual_seed(state)


def draw(batch: int, padding: int, flip: bool, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Offsets ``dy, dx`` in ``0..2P`` and flip flags for ``batch`` examples (``int64``, ``bool``)."""
    offsets = torch.randint(0, 2 * padding + 1, (2, batch), generator=generator)
    flips = torch.rand(batch, generator=generator) < 0.5
    return offsets[0], offsets[1], flips & flip


def apply(x: Tensor, dy: Tensor, dx: Tensor, flips: Tensor, padding: int, fill: Tensor) -> Tensor:
    """Crop each image of ``x`` ``(B, C, H, W)`` from its padded copy at ``(dy, dx)``, then flip it.

    Done as one gather: output pixel ``(r, c)`` of example ``b`` is input pixel ``(r + dy − P,
    c' + dx − P)`` with ``c' = W − 1 − c`` when flipped, or ``fill`` when that lies outside the image.
    """
    _, _, height, width = x.shape
    rows = torch.arange(height, device=x.device)[None, :] + (dy - padding).to(x.device)[:, None]  # (B, H)
    cols = torch.arange(width, device=x.device)[None, :].expand(len(dx), width)
    cols = torch.where(flips.to(x.device)[:, None], width - 1 - cols, cols)
    cols = cols + (dx - padding).to(x.device)[:, None]
    inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
    channels = x.shape[1]
    r = rows.clamp(0, height - 1)[:, None, :, None].expand(-1, channels, -1, width)
    c = cols.clamp(0, width - 1)[:, None, None, :].expand(-1, channels, height, -1)
    picked = x.gather(2, r).gather(3, c)
    return torch.where(inside[:, None], picked, fill.to(x)[None, :, None, None])


class Augmenter:
    """The augmentation of a run: ``names`` (of :data:`AUGMENTATIONS`), padding, black level, seed."""

    def __init__(self, names: Sequence[str], padding: int, fill: Tensor, seed: int) -> None:
        self.crop = "crop" in names
        self.flip = "flip" in names
        self.padding = padding if self.crop else 0
        self.fill = fill
        self.seed = seed

    def __call__(self, x: Tensor, step: int, rows: tuple[int, int]) -> Tensor:
        """Augment examples ``offset … offset + len(x) − 1`` of the batch of ``total`` of update ``step``."""
        offset, total = rows
        dy, dx, flips = draw(total, self.padding, self.flip, step_generator(self.seed, step))
        part = slice(offset, offset + x.shape[0])
        return apply(x, dy[part], dx[part], flips[part], self.padding, self.fill)
