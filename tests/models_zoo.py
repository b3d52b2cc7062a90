"""Models that are not in the package, written as a user would write them: factories ``build_*(...)``.

Every factory takes keyword arguments only and returns an ``nn.Module`` (so that the command line can
build one with ``--model tests/models_zoo.py:build_cnn --model-arg width=8``):

* :func:`build_cnn` — images ``(N, C, H, W)``: Conv2d stem, BatchNorm2d (eval mode: running
  statistics), a residual block, then the feature map read as a sequence by a Conv1d with GroupNorm,
  pooled, and a Linear classifier;
* :func:`build_transformer` — tokens ``(N, T)``: token and position ``nn.Embedding``, pre-LN blocks of
  ``nn.MultiheadAttention`` (causal mask, packed ``in_proj_weight``) and an MLP, a final LayerNorm
  and a pre-softmax Linear tied to the token embedding; logits ``(N, T, V)``;
* :func:`build_conv1d` — signals ``(N, C, L)``: Conv1d, LayerNorm over channels, Conv1d, pooling,
  Linear;
* :func:`build_cross_attention` — a query sequence attending to a separate memory sequence through an
  ``nn.MultiheadAttention`` with ``kdim``/``vdim`` different from the embedding (separate q/k/v
  weights); inputs ``(N, T, d_in)`` split into query and memory halves.

:func:`build` picks one by name (``build(kind="cnn", ...)``). They are small: the tests run them in
float64 on a CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ResidualBlock(nn.Module):
    """``relu(x + bn2(conv2(relu(bn1(conv1(x))))))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.block = ResidualBlock(width)
        self.seq = nn.Conv1d(width, width, 3, padding=1)
        self.gn = nn.GroupNorm(2, width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.block(F.relu(self.bn(self.stem(x))))
        h = F.relu(self.gn(self.seq(h.flatten(2))))  # the feature map as a sequence of H*W positions
        return self.fc(h.mean(dim=2))


def build_cnn(
    *, in_channels: int = 1, num_classes: int = 10, width: int = 4, seed: int | None = None
) -> nn.Module:
    """A CNN with BatchNorm, a residual block, a Conv1d and a GroupNorm (images ``(N, C, H, W)``)."""
    if seed is not None:
        torch.manual_seed(seed)
    model = SmallCNN(in_channels, num_classes, width)
    with torch.no_grad():  # running statistics that are not the identity, as after training
        for bn in (model.bn, model.block.bn1, model.block.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return model


class Block(nn.Module):
    """Pre-LN: ``h + attn(ln1(h))`` (causal), then ``h + mlp(ln2(h))``."""

    def __init__(self, d_model: int, heads: int, batch_first: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, heads, batch_first=batch_first)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff1 = nn.Linear(d_model, 2 * d_model)
        self.ff2 = nn.Linear(2 * d_model, d_model)
        self.batch_first = batch_first

    def forward(self, h: Tensor) -> Tensor:
        length = h.shape[1]
        mask = torch.triu(torch.ones(length, length, dtype=torch.bool, device=h.device), diagonal=1)
        x = self.ln1(h)
        if not self.batch_first:
            x = x.transpose(0, 1)
        a, _ = self.attn(x, x, x, attn_mask=mask, need_weights=False, is_causal=True)
        if not self.batch_first:
            a = a.transpose(0, 1)
        h = h + a
        return h + self.ff2(F.gelu(self.ff1(self.ln2(h))))


class TinyTransformer(nn.Module):
    def __init__(
        self, vocab_size: int, d_model: int, heads: int, layers: int, max_len: int, batch_first: bool
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads, batch_first) for _ in range(layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.embedding.weight  # tied

    def forward(self, tokens: Tensor) -> Tensor:
        # positions per example (not one shared (T,) row: every hooked input has the examples first)
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape)
        h = self.embedding(tokens) + self.position(positions)
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))


def build_transformer(
    *, vocab_size: int = 11, d_model: int = 8, heads: int = 2, layers: int = 1, max_len: int = 16,
    batch_first: bool = True, seed: int | None = None,
) -> nn.Module:
    """A decoder-only Transformer with ``nn.MultiheadAttention``, LayerNorm and a tied head."""
    if seed is not None:
        torch.manual_seed(seed)
    return TinyTransformer(vocab_size, d_model, heads, layers, max_len, batch_first)


class Conv1dNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(in_channels, width, 5, padding=2)
        self.norm = nn.LayerNorm(width)
        self.conv2 = nn.Conv1d(width, width, 3, stride=2, dilation=2, padding="valid")
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.norm(self.conv1(x).transpose(1, 2)).transpose(1, 2))
        return self.fc(torch.tanh(self.conv2(h)).mean(dim=2))


def build_conv1d(
    *, in_channels: int = 2, num_classes: int = 3, width: int = 4, seed: int | None = None
) -> nn.Module:
    """A 1-D convolutional classifier of signals ``(N, C, L)``."""
    if seed is not None:
        torch.manual_seed(seed)
    return Conv1dNet(in_channels, num_classes, width)


class CrossAttention(nn.Module):
    def __init__(self, d_in: int, d_model: int, kdim: int, vdim: int, heads: int, num_classes: int):
        super().__init__()
        self.query = nn.Linear(d_in, d_model)
        self.key = nn.Linear(d_in, kdim)
        self.value = nn.Linear(d_in, vdim)
        self.attn = nn.MultiheadAttention(d_model, heads, kdim=kdim, vdim=vdim, bias=True)
        self.fc = nn.Linear(d_model, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        half = x.shape[1] // 2
        q = torch.tanh(self.query(x[:, :half])).transpose(0, 1)  # seq-first: (L, N, d)
        k = torch.tanh(self.key(x[:, half:])).transpose(0, 1)
        v = torch.tanh(self.value(x[:, half:])).transpose(0, 1)
        padding = x[:, half:, 0] > 0.5  # memory positions marked as padding by the data itself
        padding[:, 0] = False  # (never all of them)
        out, _ = self.attn(q, k, v, key_padding_mask=padding)
        return self.fc(out.mean(dim=0))


def build_cross_attention(
    *, d_in: int = 3, d_model: int = 4, kdim: int = 5, vdim: int = 3, heads: int = 2, num_classes: int = 3,
    seed: int | None = None,
) -> nn.Module:
    """Cross-attention with separate q/k/v weights (``kdim``, ``vdim`` differ from ``d_model``)."""
    if seed is not None:
        torch.manual_seed(seed)
    return CrossAttention(d_in, d_model, kdim, vdim, heads, num_classes)


FACTORIES = {
    "cnn": build_cnn,
    "transformer": build_transformer,
    "conv1d": build_conv1d,
    "cross_attention": build_cross_attention,
}


def build(*, kind: str = "cnn", **kwargs) -> nn.Module:
    """The model ``kind`` (``cnn``, ``transformer``, ``conv1d``, ``cross_attention``) with ``kwargs``."""
    return FACTORIES[kind](**kwargs)
