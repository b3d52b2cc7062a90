"""``transformer_shallow``: the "base" Transformer with 2 layers as a decoder-only language model (seed F.2).

Seed F.2: the "base" model of Vaswani et al. (2017) with two layers instead of six ("Transformer
Shallow" of Shallue et al. 2018), with the embedding and pre-softmax weights shared (seed A.1).
Paper size: ``d_model=512, d_ff=2048, heads=8, layers=2, vocab=32768``; the defaults are small
enough to train on a CPU. Input: int64 token ids ``(N, T)`` with ``T <= seq_len``; output: logits
``(N, T, V)`` for the next token at every position, where ``V`` is the model's vocabulary
(``num_classes``, at most the ``vocab`` cap).

Forward (pre-layer-norm residual blocks, as Tensor2Tensor's ``transformer_base`` that Shallue et
al. used; Vaswani et al.'s paper puts the norm after the residual sum)::

    h = embedding(x) * sqrt(d_model) + P[:T]            P: fixed sinusoidal positions (Vaswani 3.5)
    for each block:  h = h + attn(norm1(h))            causal multi-head self-attention
                     h = h + ff2(relu(ff1(norm2(h))))
    logits = pre_softmax(final_norm(h))                 pre_softmax.weight IS embedding.weight

``attn`` is ``softmax(q k^T / sqrt(d_model / heads) + causal mask) v`` per head, with separate
``nn.Linear`` projections ``q``, ``k``, ``v`` and ``out`` (no biases); ``ff1``/``ff2`` have biases.
Dropout (``dropout``, default 0; Vaswani's base used 0.1) is applied to the embedding sum, to the
attention weights and to each residual branch. Token ``t``'s logits depend only on tokens ``<= t``.

The tie: ``pre_softmax`` is an ``nn.Linear(d_model, V, bias=False)`` whose ``weight`` is the same
``Parameter`` object as ``embedding.weight`` (shape ``(V, d_model)``): ``logits = h E^T``. Its
gradient is the sum of both uses. ``named_parameters()`` lists it once, as ``embedding.weight``;
``state_dict()`` holds it under both names.

Initialisation: ``E ~ N(0, 1/d_model)`` (so ``sqrt(d_model) E`` has unit entries), Xavier-uniform
Linear weights, zero biases, LayerNorm ``gamma = 1, beta = 0``. ``model.label_smoothing`` (default
0) is the label smoothing of the training loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULTS: dict[str, object] = {
    "d_model": 64,
    "d_ff": 256,
    "heads": 4,
    "layers": 2,
    "seq_len": 32,
    "vocab": 2048,
    "dropout": 0.0,
    "label_smoothing": 0.0,
}
#: The paper's ("base", 2 layers, LM1B's 32k vocabulary) sizes.
PAPER_ARGS: dict[str, int] = {"d_model": 512, "d_ff": 2048, "heads": 8, "layers": 2, "vocab": 32768}


def sinusoidal_positions(length: int, d_model: int) -> Tensor:
    """Vaswani et al. 3.5, ``(length, d)``: ``P[t, 2i] = sin(t / 10000^(2i/d))``, ``P[t, 2i+1] = cos(..)``."""
    position = torch.arange(length, dtype=torch.float64).unsqueeze(1)
    rates = torch.exp(-math.log(10000.0) * torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    table = torch.zeros(length, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * rates)
    table[:, 1::2] = torch.cos(position * rates[: d_model // 2])
    return table.to(torch.float32)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a causal mask; ``q``, ``k``, ``v``, ``out`` are ``nn.Linear``."""

    def __init__(self, d_model: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.k = nn.Linear(d_model, d_model, bias=False)
        self.v = nn.Linear(d_model, d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def _split(self, x: Tensor) -> Tensor:
        """``(N, T, d)`` -> ``(N, heads, T, d / heads)``."""
        n, t, d = x.shape
        return x.view(n, t, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(x.shape))


class Block(nn.Module):
    """Pre-LN block: ``h + attn(norm1(h))``, then ``h + ff2(relu(ff1(norm2(h))))``."""

    def __init__(self, d_model: int, d_ff: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff1 = nn.Linear(d_model, d_ff)
        self.ff2 = nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.drop(self.attn(self.norm1(h)))
        return h + self.drop(self.ff2(F.relu(self.ff1(self.norm2(h)))))


class TransformerShallow(nn.Module):
    """Decoder-only Transformer LM with tied embedding / pre-softmax weight (see the module docstring)."""

    def __init__(
        self,
        vocab_size: int,
        *,
        d_model: int = 64,
        d_ff: int = 256,
        heads: int = 4,
        layers: int = 2,
        seq_len: int = 32,
        dropout: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.seq_len = seq_len
        self.label_smoothing = float(label_smoothing)
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.register_buffer("positions", sinusoidal_positions(seq_len, d_model), persistent=False)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, d_ff, heads, dropout) for _ in range(layers))
        self.final_norm = nn.LayerNorm(d_model)
        self.pre_softmax = nn.Linear(d_model, vocab_size, bias=False)
        self._init_weights()
        self.pre_softmax.weight = self.embedding.weight  # the tie: one Parameter, two modules

    @torch.no_grad()
    def _init_weights(self) -> None:
        nn.init.normal_(self.embedding.weight, std=self.d_model**-0.5)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, T, V)`` of token ids ``(N, T)``, ``T <= seq_len``."""
        if x.dim() != 2 or x.shape[1] > self.seq_len:
            raise ValueError(
                f"expected token ids (N, T) with T <= {self.seq_len}, got shape {tuple(x.shape)}"
            )
        h = self.embedding(x) * math.sqrt(self.d_model) + self.positions[: x.shape[1]]
        h = self.drop(h)
        for block in self.blocks:
            h = block(h)
        return self.pre_softmax(self.final_norm(h))


def validate(args: dict[str, object]) -> str | None:
    """``None`` if the arguments are valid, else why not."""
    if args["d_model"] % args["heads"]:
        return f"d_model ({args['d_model']}) must be a multiple of heads ({args['heads']})"
    if args["vocab"] < 2:
        return f"vocab must be at least 2 (<unk> and one token), got {args['vocab']}"
    for key in ("dropout", "label_smoothing"):
        if not 0.0 <= args[key] < 1.0:
            return f"{key} must be in [0, 1), got {args[key]}"
    return None


def check_config(input_shape: tuple[int, ...], num_classes: int, args: dict[str, object]) -> str | None:
    """``input_shape`` must be ``(seq_len,)`` and ``num_classes`` (the vocabulary) at most ``vocab``."""
    if input_shape != (args["seq_len"],):
        seq_len = args["seq_len"]
        return f"input_shape {input_shape} does not match seq_len={seq_len} (expected ({seq_len},))"
    if num_classes > args["vocab"]:
        vocab = args["vocab"]
        return (
            f"num_classes {num_classes} (the data's vocabulary) exceeds vocab={vocab}; "
            f"load the data with vocab={vocab}"
        )
    return None


def build(
    input_shape: tuple[int, ...],
    num_classes: int,
    d_model: int,
    d_ff: int,
    heads: int,
    layers: int,
    seq_len: int,
    vocab: int,
    dropout: float,
    label_smoothing: float,
) -> TransformerShallow:
    """The registry's builder (arguments already validated; the vocabulary is ``num_classes``)."""
    return TransformerShallow(
        num_classes,
        d_model=d_model,
        d_ff=d_ff,
        heads=heads,
        layers=layers,
        seq_len=seq_len,
        dropout=dropout,
        label_smoothing=label_smoothing,
    )
