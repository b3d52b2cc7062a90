"""``nn.MultiheadAttention`` as four Linear layers: the q, k, v input projections and ``out_proj``.

An attention module computes, for a query sequence ``x_q`` and key/value sequences ``x_k``, ``x_v``,

    q_t = W_q x_q,t + b_q,    k_τ = W_k x_k,τ + b_k,    v_τ = W_v x_v,τ + b_v,
    o_t = concat_h softmax_τ(q_t^h · k_τ^h / √d_h + mask) v_τ^h,          y_t = W_o o_t + b_o,

so each projection is a Linear layer in the sense of docs/factors.md: ``s_t = W a_t`` at every token
``t`` of its own input. PyTorch packs ``W_q``, ``W_k``, ``W_v`` as the three row blocks of one
``in_proj_weight`` ``(3E, E)`` (biases: the three blocks of ``in_proj_bias``) when ``kdim = vdim = E``,
and keeps three weights ``q_proj_weight`` ``(E, E)``, ``k_proj_weight`` ``(E, kdim)``,
``v_proj_weight`` ``(E, vdim)`` otherwise. Either way q, k and v are three uses of three blocks of
weights on three inputs (the same tensor in self-attention, different ones in cross-attention), and
each block is one entry: ``<path>.q_proj``, ``<path>.k_proj``, ``<path>.v_proj`` — a ``Linear`` of
weight ``(E, E_in)`` with the block's bias — plus ``<path>.out_proj`` for ``W_o``.

PyTorch's forward passes the weights to a fused function (or a fused kernel), so no module hook sees
a projection. While curvlab watches an attention module (:func:`tap`), its ``forward`` is replaced by
:func:`visible_forward`: the same computation written out, with each projection's input and output
handed to the watchers. It equals PyTorch's output to float64 rounding (tests/test_attention.py), for
batch-first or not, shared or separate q/k/v inputs, attention and key-padding masks (bool or float),
``add_bias_kv``, ``add_zero_attn`` and ``need_weights``; ``is_causal`` is, as in PyTorch, a hint that
``attn_mask`` is causal, and the mask given is used. Dropout on the attention weights (training mode)
draws its own random numbers. The learned ``bias_k``/``bias_v`` rows of ``add_bias_kv`` are not a
projection of an input and get no factors (they are reported as skipped).
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.capture.normal_form import split_matrix, weight_matrix
from curvlab.errors import LayerError

ROLES = ("q", "k", "v", "out")
ENTRY_SUFFIX = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}

Watcher = Callable[[str, Tensor, Tensor], None]


@dataclass(frozen=True, eq=False)
class Projection:
    """One projection of an ``nn.MultiheadAttention``: ``role`` is ``"q"``, ``"k"``, ``"v"`` or ``"out"``."""

    attention: nn.MultiheadAttention
    role: str


def projections(attention: nn.MultiheadAttention) -> list[tuple[str, Projection]]:
    """The four entries of an attention module: ``(name suffix, projection)``, q, k, v, out."""
    return [(ENTRY_SUFFIX[role], Projection(attention, role)) for role in ROLES]


def unsupported(attention: nn.MultiheadAttention) -> str | None:
    """Why an attention module cannot be captured (``None``: it can)."""
    if type(attention).forward is not nn.MultiheadAttention.forward:
        return f"{type(attention).__name__} overrides MultiheadAttention.forward (its math is unknown)"
    return None


def projection_parameters(p: Projection) -> tuple[Tensor, slice | None, Tensor | None, slice | None]:
    """``(weight, weight rows, bias or None, bias rows)``: the Parameters a projection uses and which
    rows of them (``None``: all). The q/k/v biases are the blocks of one packed ``in_proj_bias``."""
    mha = p.attention
    if p.role == "out":
        return mha.out_proj.weight, None, mha.out_proj.bias, None
    index = ROLES.index(p.role)
    e = mha.embed_dim
    rows = slice(index * e, (index + 1) * e)
    bias_rows = None if mha.in_proj_bias is None else rows
    if mha._qkv_same_embed_dim:
        return mha.in_proj_weight, rows, mha.in_proj_bias, bias_rows
    return getattr(mha, f"{p.role}_proj_weight"), None, mha.in_proj_bias, bias_rows


def _projection_weights(mha: nn.MultiheadAttention) -> list[tuple[Tensor, Tensor | None]]:
    """``(W, b)`` of q, k and v (views of the packed Parameters, or the separate weights)."""
    e = mha.embed_dim
    biases = [None] * 3 if mha.in_proj_bias is None else list(mha.in_proj_bias.split(e))
    if mha._qkv_same_embed_dim:
        weights = list(mha.in_proj_weight.split(e))
    else:
        weights = [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight]
    return list(zip(weights, biases, strict=True))


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A bool mask (True: not allowed) as an additive float mask (``-inf``); a float mask as it is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def visible_forward(
    mha: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    *,
    watch: Watcher | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``mha(query, key, value, ...)`` with the projections computed as ``F.linear`` calls in
    batch-first layout, each reported as ``watch(role, input, output)`` (``[N, L, E_in]``, ``[N, L, E]``).
    """
    if query.dim() != 3:
        raise LayerError(
            f"MultiheadAttention called with an unbatched {query.dim()}-D query: there is no example "
            "dimension to capture per-example statistics over"
        )
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
    if not mha.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    dtype = query.dtype
    padding = _float_mask(key_padding_mask, dtype)
    mask = _float_mask(attn_mask, dtype)
    (w_q, b_q), (w_k, b_k), (w_v, b_v) = _projection_weights(mha)
    q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
    if watch is not None:
        watch("q", query, q)
        watch("k", key, k)
        watch("v", value, v)
    batch, length, embed = q.shape
    heads = mha.num_heads
    head_dim = embed // heads
    if mha.bias_k is not None:
        k = torch.cat([k, mha.bias_k.reshape(1, 1, embed).expand(batch, 1, embed)], dim=1)
        v = torch.cat([v, mha.bias_v.reshape(1, 1, embed).expand(batch, 1, embed)], dim=1)
        mask = None if mask is None else F.pad(mask, (0, 1))
        padding = None if padding is None else F.pad(padding, (0, 1))
    q = q.reshape(batch, length, heads, head_dim).transpose(1, 2)
    k = k.reshape(batch, k.shape[1], heads, head_dim).transpose(1, 2)
    v = v.reshape(batch, v.shape[1], heads, head_dim).transpose(1, 2)
    if mha.add_zero_attn:
        k = torch.cat([k, k.new_zeros(batch, heads, 1, head_dim)], dim=2)
        v = torch.cat([v, v.new_zeros(batch, heads, 1, head_dim)], dim=2)
        mask = None if mask is None else F.pad(mask, (0, 1))
        padding = None if padding is None else F.pad(padding, (0, 1))
    source = k.shape[2]
    merged = None
    if mask is not None:
        shape = (1, 1, length, source) if mask.dim() == 2 else (batch, heads, length, source)
        merged = mask.reshape(shape)
    if padding is not None:
        padding = padding.reshape(batch, 1, 1, source)
        merged = padding if merged is None else merged + padding
    dropout = mha.dropout if mha.training else 0.0
    weights = None
    if need_weights:
        scores = (q * math.sqrt(1.0 / head_dim)) @ k.transpose(-2, -1)
        if merged is not None:
            scores = scores + merged
        attention = torch.softmax(scores, dim=-1)
        if dropout > 0:
            attention = F.dropout(attention, p=dropout)
        out = attention @ v
        weights = attention.mean(dim=1) if average_attn_weights else attention
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=merged, dropout_p=dropout)
    out = out.transpose(1, 2).reshape(batch, length, embed)
    y = F.linear(out, mha.out_proj.weight, mha.out_proj.bias)
    if watch is not None:
        watch("out", out, y)
    if not mha.batch_first:
        y = y.transpose(0, 1)
    return y, weights


class _Taps:
    """The watchers of one attention module while its forward is replaced."""

    def __init__(self) -> None:
        self.watchers: list[tuple[str, Callable[[Tensor, Tensor], None], Callable[[], bool]]] = []

    def active(self) -> bool:
        return any(is_active() for _, _, is_active in self.watchers)

    def __call__(self, role: str, x: Tensor, output: Tensor) -> None:
        for watched, callback, is_active in self.watchers:
            if watched == role and is_active():
                callback(x, output)


class TapHandle:
    """Removes one watcher (:func:`tap`); the last one restores the module's own forward."""

    def __init__(self, attention: nn.MultiheadAttention, entry: tuple) -> None:
        self.attention, self.entry = attention, entry

    def remove(self) -> None:
        taps = self.attention.__dict__.get("_curvlab_taps")
        if taps is None or self.entry not in taps.watchers:
            return
        taps.watchers.remove(self.entry)
        if not taps.watchers:
            del self.attention.__dict__["_curvlab_taps"]
            self.attention.__dict__.pop("forward", None)


def tap(
    attention: nn.MultiheadAttention,
    role: str,
    callback: Callable[[Tensor, Tensor], None],
    active: Callable[[], bool] = lambda: True,
) -> TapHandle:
    """Call ``callback(input, output)`` of projection ``role`` on every forward pass while ``active()``.

    The module's ``forward`` is replaced by :func:`visible_forward` while it has watchers and one of
    them is active (otherwise PyTorch's own forward runs, fused path and all); ``remove()`` on every
    returned handle restores it.
    """
    taps = attention.__dict__.get("_curvlab_taps")
    if taps is None:
        taps = _Taps()
        attention.__dict__["_curvlab_taps"] = taps
        own = type(attention).forward

        def forward(self: nn.MultiheadAttention, *args, **kwargs):
            if not taps.active():
                return own(self, *args, **kwargs)
            return visible_forward(self, *args, watch=taps, **kwargs)

        attention.__dict__["forward"] = types.MethodType(forward, attention)
    entry = (role, callback, active)
    taps.watchers.append(entry)
    return TapHandle(attention, entry)


def to_matrix(p: Projection, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``W = [W_p | b_p]`` from tensors shaped like the projection's Parameters (e.g. their gradients);
    a missing bias gradient counts as zero."""
    _, weight_rows, bias_param, bias_rows = projection_parameters(p)
    weight = weight if weight_rows is None else weight[weight_rows]
    if bias_param is None:
        return weight_matrix(None, weight, None)
    bias = torch.zeros_like(bias_param) if bias is None else bias
    return weight_matrix(None, weight, bias if bias_rows is None else bias[bias_rows])


def from_matrix(p: Projection, matrix: Tensor) -> tuple[Tensor, Tensor | None]:
    """The inverse of :func:`to_matrix`: the projection's rows of the weight and of the bias."""
    weight, _, bias, _ = projection_parameters(p)
    return split_matrix(matrix, (p.attention.embed_dim, weight.shape[1]), bias is not None)
