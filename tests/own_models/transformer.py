"""A user's small Transformer language model: nn.Embedding, nn.MultiheadAttention, LayerNorm, a feed-forward
block and a head tied to the embedding; with its token data factory.

`--model tests/own_models/transformer.py:build --data tests/own_models/transformer.py:tokens`.
"""

import torch
from torch import nn


class TinyLM(nn.Module):
    def __init__(self, vocab: int, seq_len: int, d: int, heads: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, d)
        self.position = nn.Parameter(torch.zeros(seq_len, d))
        self.norm1 = nn.LayerNorm(d)
        self.attention = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.final_norm = nn.LayerNorm(d)
        self.pre_softmax = nn.Linear(d, vocab, bias=False)
        self.pre_softmax.weight = self.embedding.weight  # tied head
        mask = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, tokens):
        t = tokens.shape[1]
        h = self.embedding(tokens) + self.position[:t]
        q = self.norm1(h)
        a, _ = self.attention(q, q, q, attn_mask=self.mask[:t, :t], need_weights=False)
        h = h + a
        h = h + self.ff(self.norm2(h))
        return self.pre_softmax(self.final_norm(h))


def build(input_shape, num_classes, d=16, heads=2):
    (seq_len,) = input_shape
    return TinyLM(num_classes, seq_len, d, heads)


def tokens(split="train"):
    """Sequences of a noisy counting language over 12 tokens: x[t+1] = x[t] + 1 (mod 12) mostly."""
    generator = torch.Generator().manual_seed(0 if split != "test" else 1)
    n, seq_len, vocab = 64, 9, 12
    start = torch.randint(vocab, (n, 1), generator=generator)
    seq = (start + torch.arange(seq_len + 1)) % vocab
    noise = torch.rand(n, seq_len + 1, generator=generator) < 0.1
    seq = torch.where(noise, torch.randint(vocab, (n, seq_len + 1), generator=generator), seq)
    return {"x": seq[:, :-1], "y": seq[:, 1:], "num_classes": vocab}
