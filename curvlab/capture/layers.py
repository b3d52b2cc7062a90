"""Per-layer adapters: the only place that knows how a module type maps onto ``s = W a``.

Every supported layer is brought into one normal form (``shared/design.md``, "Shape of the package"):
the layer's inputs become ``a`` of shape ``[batch, locations, n]`` and the gradients of the per-example
loss with respect to its outputs become ``g`` of shape ``[batch, locations, m]``, so that at every
location ``t`` the layer computes ``s_t = W a_t`` with ``W`` the ``(m, n)`` weight matrix (plus a bias
column when the layer has one). After this step every layer is the same and the downstream math —
K-FAC factors (seed eqs. 13 and 15), projections onto the Kronecker-factored eigenbasis, K-FAC
preconditioning — is written once.

* ``nn.Linear``, weight ``(m, n)``: an input of shape ``(B, n)`` has one location; an input of shape
  ``(B, T1, T2, ..., n)`` has ``T1*T2*...`` locations (tokens of a sequence, treated like the spatial
  locations of a convolution, the "expand" setting).
* ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d``, weight ``(c_out, c_in, k_1, ..., k_N)`` with
  ``groups == 1`` (:mod:`curvlab.capture.conv`): the locations are the output positions, ``a_t`` is the
  unfolded input patch at ``t`` (length ``c_in*k_1*...*k_N``, ordered like the flattened weight) and
  ``g_t`` the output gradient there (seed eq. 15, Grosse & Martens 2016).
* ``nn.MultiheadAttention`` (:mod:`curvlab.capture.attention`): its q, k, v input projections (row
  blocks of the packed ``in_proj_weight``, or the separate weights) and ``out_proj`` are four Linear
  entries (:class:`ProjectionAdapter`), each on its own input.
* The ``(γ, β)`` of ``LayerNorm``, ``RMSNorm``, ``GroupNorm``, affine ``InstanceNorm`` and eval-mode
  ``BatchNorm`` (:mod:`curvlab.capture.norms`): exact per-channel Fisher blocks, a ``NormAffine`` entry.
* ``nn.Embedding``, weight ``E`` of shape ``(V, d)``: the layer ``s = E^T a`` with ``a`` the one-hot
  token (so ``W = E^T``, ``m = d``, ``n = V``), one location per token. The one-hot inputs are never
  built: their second moment is diagonal, ``Σ_t a_t a_t^T = diag(token counts)``, and the adapter
  declares ``input_kind = "diagonal"`` and returns the counts (a length-``V`` vector).
* A weight ``E`` ``(V, d)`` shared by an ``nn.Embedding`` and a pre-softmax ``nn.Linear(d, V)`` (seed
  eq. 16) is one :class:`TiedPair`, handled by :class:`TiedEmbeddingAdapter`: ``W = E`` (the Linear's
  orientation) and its gradient is a sum of rank-one terms ``v u^T`` from both uses — ``(g_t, a_t)``
  of the Linear and ``(onehot_t, h_t)`` of the Embedding (``h_t`` its output gradient); see
  ``docs/factors.md`` for how they are pooled.

Each adapter also maps the layer's parameters to ``W`` and back (:meth:`LinearAdapter.to_matrix`,
:meth:`LinearAdapter.from_matrix`; :meth:`LinearAdapter.rows` says which rows of the Parameters an
entry uses, all but for an attention projection), which the K-FAC optimizer uses to precondition
gradients and the curvature cross-check to perturb weights.

The bias is handled by augmenting ``a`` with a trailing 1 (the bias is the last column of ``W``); the
adapters return ``a`` *without* that column, and :func:`augment` adds it where a caller needs it
(:mod:`curvlab.capture.normal_form`). :func:`watch` hooks the module(s) of an entry; :func:`why_not`
says why a module with trainable parameters gets no entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.capture import attention as attention_math
from curvlab.capture.attention import Projection
from curvlab.capture.conv import CHUNK_BYTES, Conv2dAdapter, ConvAdapter
from curvlab.capture.normal_form import (
    augment,
    output_moment_sum,
    output_second_moment,
    second_moment,
    split_matrix,
    weight_matrix,
)
from curvlab.capture.norms import NORM_TYPES, NormAdapter

__all__ = [
    "CHUNK_BYTES",
    "Conv2dAdapter",
    "ConvAdapter",
    "EmbeddingAdapter",
    "LinearAdapter",
    "NormAdapter",
    "Projection",
    "ProjectionAdapter",
    "TiedEmbeddingAdapter",
    "TiedPair",
    "adapter_for",
    "augment",
    "output_moment_sum",
    "output_second_moment",
    "second_moment",
    "split_matrix",
    "watch",
    "weight_matrix",
    "why_not",
]


@dataclass(frozen=True)
class LinearAdapter:
    """``nn.Linear``: ``s = W a + b`` at each location (leading dims beyond the batch are locations)."""

    module_type: str = "Linear"
    input_kind: str = "dense"

    def inputs(self, module: nn.Linear, x: Tensor) -> Tensor:
        """``a`` in normal form ``[B, T, n]`` from the module's input ``(B, ..., n)``."""
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def inputs_any_order(self, module: nn.Linear, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """:meth:`inputs` in the adapter's cheapest feature order, and that order (None: the weight's)."""
        return self.inputs(module, x), None

    def per_example_gradients(self, module: nn.Linear, x: Tensor, grad_output: Tensor) -> Tensor:
        """``G_n = Σ_t g_nt a_nt^T`` for every example, ``[B, m, n]`` (weight part, no bias column)."""
        return torch.bmm(self.output_grads(module, grad_output).transpose(1, 2), self.inputs(module, x))

    def input_second_moment(self, module: nn.Linear, x: Tensor) -> Tensor:
        """``Σ_{b,t} a a^T`` over a batch (bias-augmented)."""
        return second_moment(self.inputs(module, x), self.has_bias(module))

    def output_grads(self, module: nn.Linear, grad_output: Tensor) -> Tensor:
        """``g`` in normal form ``[B, T, m]`` from the gradient w.r.t. the output ``(B, ..., m)``."""
        return grad_output.reshape(grad_output.shape[0], -1, grad_output.shape[-1])

    def weight_shape(self, module: nn.Linear) -> tuple[int, ...]:
        return tuple(module.weight.shape)

    def has_bias(self, module: nn.Linear) -> bool:
        return module.bias is not None

    def supports(self, module: nn.Module) -> str | None:
        """``None`` if the module is supported, else the reason it is not."""
        return None

    def parameters(self, module: nn.Linear) -> tuple[Tensor, Tensor | None]:
        """The Parameters that make up ``W``: ``(weight, bias or None)``."""
        return module.weight, module.bias

    def rows(self, module: nn.Linear) -> tuple[slice | None, slice | None]:
        """The rows of ``(weight, bias)`` that make up ``W`` (``None``: all)."""
        return None, None

    def to_matrix(self, module: nn.Linear, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``W = [weight | bias]`` (``m × n[+1]``) from weight-shaped and bias-shaped tensors."""
        return weight_matrix(module, weight, bias)

    def from_matrix(self, module: nn.Linear, matrix: Tensor) -> tuple[Tensor, Tensor | None]:
        """Inverse of :meth:`to_matrix`: ``(weight-shaped, bias-shaped or None)``."""
        return split_matrix(matrix, module.weight.shape, module.bias is not None)


@dataclass(frozen=True)
class EmbeddingAdapter:
    """``nn.Embedding`` with weight ``E`` ``(V, d)``: ``s_t = E^T a_t``, ``a_t`` the one-hot token ``t``.

    As a layer ``s = W a`` its matrix is ``W = E^T`` (``d × V``), so the output factor ``S`` is
    ``d × d`` (dense, from the output gradients ``g_t = dL/ds_t``, one location per token) and the
    input factor is ``Σ_t a_t a_t^T = diag(c)`` with ``c_v`` the number of occurrences of token ``v``:
    :meth:`input_second_moment` returns ``c`` (length ``V``) without building a one-hot tensor.
    Tokens equal to ``padding_idx`` get no gradient in PyTorch, so they are not counted.
    """

    module_type: str = "Embedding"
    input_kind: str = "diagonal"

    def inputs(self, module: nn.Embedding, x: Tensor) -> Tensor:
        """The one-hot inputs ``[B, T, V]``, materialised (memory ``B·T·V``: for small vocabularies).

        Factor capture never calls this (it uses :meth:`input_second_moment`).
        """
        ids = self.token_ids(module, x)
        one_hot = F.one_hot(ids, module.num_embeddings).to(module.weight.dtype)
        if module.padding_idx is not None:
            one_hot[..., module.padding_idx] = 0
        return one_hot

    def inputs_any_order(self, module: nn.Embedding, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """:meth:`inputs` (the one-hot order is the weight's)."""
        return self.inputs(module, x), None

    def per_example_gradients(self, module: nn.Embedding, x: Tensor, grad_output: Tensor) -> Tensor:
        """``G_n = Σ_t g_nt onehot_nt^T``, ``[B, d, V]``."""
        return torch.bmm(self.output_grads(module, grad_output).transpose(1, 2), self.inputs(module, x))

    def token_ids(self, module: nn.Embedding, x: Tensor) -> Tensor:
        """The token ids as ``[B, T]`` (every dimension after the batch is a location)."""
        return x.reshape(x.shape[0], -1)

    def input_second_moment(self, module: nn.Embedding, x: Tensor) -> Tensor:
        """``Σ_{b,t} a a^T`` as its diagonal: the token counts ``c`` (length ``V``), float64."""
        return token_counts(module, x)

    def output_grads(self, module: nn.Embedding, grad_output: Tensor) -> Tensor:
        """``g`` in normal form ``[B, T, d]`` from the gradient w.r.t. the output ``(B, ..., d)``."""
        return grad_output.reshape(grad_output.shape[0], -1, grad_output.shape[-1])

    def weight_shape(self, module: nn.Embedding) -> tuple[int, ...]:
        """``(V, d)``, ``nn.Embedding``'s own order (docs/format.md)."""
        return tuple(module.weight.shape)

    def has_bias(self, module: nn.Embedding) -> bool:
        return False

    def supports(self, module: nn.Module) -> str | None:
        if module.sparse:
            return "sparse=True (sparse gradients)"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq=True (the gradient is no longer g a^T)"
        return None

    def parameters(self, module: nn.Embedding) -> tuple[Tensor, Tensor | None]:
        return module.weight, None

    def rows(self, module: nn.Embedding) -> tuple[slice | None, slice | None]:
        return None, None

    def to_matrix(self, module: nn.Embedding, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``W = E^T`` (``d × V``)."""
        return weight.T

    def from_matrix(self, module: nn.Embedding, matrix: Tensor) -> tuple[Tensor, Tensor | None]:
        return matrix.T, None


def token_counts(module: nn.Embedding, x: Tensor) -> Tensor:
    """How often each of the ``V`` tokens occurs in ``x`` (float64; ``padding_idx`` counts 0)."""
    counts = torch.bincount(x.reshape(-1), minlength=module.num_embeddings).to(torch.float64)
    if module.padding_idx is not None:
        counts[module.padding_idx] = 0
    return counts


@dataclass(frozen=True, eq=False)
class TiedPair:
    """A weight ``E`` ``(V, d)`` shared by an ``nn.Embedding`` and a pre-softmax ``nn.Linear(d, V)``."""

    linear: nn.Linear
    embedding: nn.Embedding


@dataclass(frozen=True)
class TiedEmbeddingAdapter:
    """The shared embedding / pre-softmax weight (seed eq. 16), in the pre-softmax Linear's orientation.

    ``W = E`` (``V × d``, plus the Linear's bias column if it has one). The gradient of one example is
    a sum of rank-one terms ``v u^T`` with a V-side vector ``v`` and a d-side vector ``u``:

    * the pre-softmax Linear at token ``t``: ``v = g_t`` (gradient of its output, the logits) and
      ``u = a_t`` (its input, augmented by 1 with a bias);
    * the Embedding at token ``t``: ``v = onehot(x_t)`` and ``u = h_t`` (gradient of its output,
      augmented by 0 with a bias: the embedding does not touch the bias column).

    The methods below give each source's sums over a batch; the factors pool them (docs/factors.md):
    ``A`` (d-side, dense) sums ``u u^T`` over all terms, ``S`` (V-side, diagonal) averages ``diag(v v^T)``
    over the terms of an example.
    """

    module_type: str = "TiedEmbedding"
    input_kind: str = "dense"
    output_kind: str = "diagonal"

    def linear_input_moment(self, pair: TiedPair, x: Tensor) -> tuple[Tensor, int]:
        """``Σ_{b,t} a a^T`` (d-side, bias-augmented) of the Linear's input, and its tokens per example."""
        a = LinearAdapter().inputs(pair.linear, x)
        return second_moment(a, pair.linear.bias is not None), a.shape[1]

    def linear_output_moment(self, pair: TiedPair, grad_output: Tensor) -> Tensor:
        """``Σ_{b,t} diag(g g^T) = Σ_{b,t} g ∘ g`` (V-side) of the logit gradients."""
        g = grad_output.reshape(-1, grad_output.shape[-1])
        return (g * g).sum(dim=0)

    def embedding_input_moment(self, pair: TiedPair, x: Tensor) -> tuple[Tensor, int]:
        """``Σ_{b,t} onehot onehot^T`` (V-side, diagonal: the token counts), and tokens per example."""
        ids = EmbeddingAdapter().token_ids(pair.embedding, x)
        return token_counts(pair.embedding, ids), ids.shape[1]

    def embedding_output_moment(self, pair: TiedPair, grad_output: Tensor) -> Tensor:
        """``Σ_{b,t} h h^T`` (d-side) of the embedding's output gradients, zero-padded for a bias."""
        h = grad_output.reshape(-1, grad_output.shape[-1])
        core = h.T @ h
        if pair.linear.bias is None:
            return core
        return F.pad(core, (0, 1, 0, 1))

    def targets(self, pair: TiedPair) -> list[tuple[nn.Module, str]]:
        """The two modules of the pair, each with its role (``"linear"`` or ``"embedding"``)."""
        return [(pair.linear, "linear"), (pair.embedding, "embedding")]

    def inputs(self, pair: TiedPair, role: str, x: Tensor) -> Tensor:
        """Normal form of one use's input: the Linear's ``a`` ``[B, T, d]`` or the token ids ``[B, T]``."""
        if role == "linear":
            return LinearAdapter().inputs(pair.linear, x)
        return EmbeddingAdapter().token_ids(pair.embedding, x)

    def output_grads(self, pair: TiedPair, role: str, grad_output: Tensor) -> Tensor:
        """Normal form of one use's output gradient: ``g`` ``[B, T, V]`` (Linear) or ``h`` ``[B, T, d]``."""
        if role == "linear":
            return LinearAdapter().output_grads(pair.linear, grad_output)
        return EmbeddingAdapter().output_grads(pair.embedding, grad_output)

    def per_example_gradients(
        self,
        pair: TiedPair,
        linear_terms: list[tuple[Tensor, Tensor]],
        embedding_terms: list[tuple[Tensor, Tensor]],
    ) -> Tensor:
        """``G_n = Σ_t g_t a_t^T + Σ_τ onehot(x_τ) u_τ^T`` for every example, ``[B, V, k]``.

        ``linear_terms``: one ``(a, g)`` per call of the Linear (``a`` ``[B, T, k]``, logit gradients
        ``g`` ``[B, T, V]``); ``embedding_terms``: one ``(ids, u)`` per call of the Embedding (token ids
        ``[B, T]``, ``u`` ``[B, T, k]``). The d-side vectors are ``[a, 1]`` and ``[h, 0]`` with a bias, or
        those times ``Q_A`` (``G`` is linear in them, so that gives ``G Q_A``). The embedding's terms are
        added to the token's row with ``index_add`` (no one-hot matrix); ``padding_idx`` adds nothing.
        """
        first = linear_terms[0][0] if linear_terms else embedding_terms[0][1]
        batch, vocab, width = first.shape[0], pair.linear.weight.shape[0], first.shape[-1]
        G = first.new_zeros(batch, vocab, width)
        for a, g in linear_terms:
            G.baddbmm_(g.transpose(1, 2), a)
        rows_of = G.view(batch * vocab, width)
        for ids, u in embedding_terms:
            if pair.embedding.padding_idx is not None:
                u = u * (ids != pair.embedding.padding_idx).unsqueeze(-1).to(u.dtype)
            rows = ids + vocab * torch.arange(batch, device=ids.device).unsqueeze(1)
            rows_of.index_add_(0, rows.reshape(-1), u.reshape(-1, width))
        return G

    def weight_shape(self, pair: TiedPair) -> tuple[int, ...]:
        """``(V, d)``: the pre-softmax Linear's ``(out, in)``."""
        return tuple(pair.linear.weight.shape)

    def has_bias(self, pair: TiedPair) -> bool:
        return pair.linear.bias is not None

    def supports(self, pair: TiedPair) -> str | None:
        return EmbeddingAdapter().supports(pair.embedding)

    def parameters(self, pair: TiedPair) -> tuple[Tensor, Tensor | None]:
        return pair.linear.weight, pair.linear.bias

    def rows(self, pair: TiedPair) -> tuple[slice | None, slice | None]:
        return None, None

    def to_matrix(self, pair: TiedPair, weight: Tensor, bias: Tensor | None) -> Tensor:
        return weight_matrix(pair.linear, weight, bias)

    def from_matrix(self, pair: TiedPair, matrix: Tensor) -> tuple[Tensor, Tensor | None]:
        return split_matrix(matrix, pair.linear.weight.shape, pair.linear.bias is not None)


@dataclass(frozen=True)
class ProjectionAdapter(LinearAdapter):
    """One projection of an ``nn.MultiheadAttention`` (:class:`~curvlab.capture.attention.Projection`):
    the Linear math on its own input, with ``W`` the projection's rows of the attention's Parameters."""

    def weight_shape(self, p: Projection) -> tuple[int, ...]:
        weight, _, _, _ = attention_math.projection_parameters(p)
        return (p.attention.embed_dim, weight.shape[1])

    def has_bias(self, p: Projection) -> bool:
        return attention_math.projection_parameters(p)[2] is not None

    def supports(self, p: Projection) -> str | None:
        return attention_math.unsupported(p.attention)

    def parameters(self, p: Projection) -> tuple[Tensor, Tensor | None]:
        weight, _, bias, _ = attention_math.projection_parameters(p)
        return weight, bias

    def rows(self, p: Projection) -> tuple[slice | None, slice | None]:
        _, weight_rows, _, bias_rows = attention_math.projection_parameters(p)
        return weight_rows, bias_rows

    def to_matrix(self, p: Projection, weight: Tensor, bias: Tensor | None) -> Tensor:
        return attention_math.to_matrix(p, weight, bias)

    def from_matrix(self, p: Projection, matrix: Tensor) -> tuple[Tensor, Tensor | None]:
        return attention_math.from_matrix(p, matrix)


LayerAdapter = LinearAdapter | ConvAdapter | EmbeddingAdapter | NormAdapter | ProjectionAdapter

_ADAPTERS: dict[type[nn.Module], Any] = {
    nn.Linear: LinearAdapter(),
    nn.Conv1d: ConvAdapter("Conv1d", 1),
    nn.Conv2d: ConvAdapter("Conv2d", 2),
    nn.Conv3d: ConvAdapter("Conv3d", 3),
    nn.Embedding: EmbeddingAdapter(),
    **{norm: NormAdapter() for norm in NORM_TYPES},
}


def adapter_for(module: nn.Module | Projection | TiedPair) -> Any:
    """The adapter of an entry's source: a module's type (exact type or a subclass), an attention
    projection or a tied pair; ``None`` if it has no factors."""
    if isinstance(module, Projection):
        return ProjectionAdapter()
    if isinstance(module, TiedPair):
        return TiedEmbeddingAdapter()
    for module_class, adapter in _ADAPTERS.items():
        if isinstance(module, module_class):
            return adapter
    return None


#: Module types with trainable parameters that are refused, and why (:func:`why_not`).
_REFUSED: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.modules.conv._ConvTransposeNd, "a transposed convolution: no K-FAC adapter"),
    (nn.RNNBase, "a recurrent layer (weights shared over time steps through a nonlinear recurrence): "
                 "no K-FAC adapter"),
    (nn.RNNCellBase, "a recurrent cell: no K-FAC adapter"),
    (nn.Bilinear, "a bilinear layer (two inputs): no K-FAC adapter"),
    (nn.EmbeddingBag, "an EmbeddingBag (bags of tokens are summed): no K-FAC adapter"),
    (nn.PReLU, "a PReLU (a learned activation slope): no K-FAC adapter"),
)


def why_not(module: nn.Module) -> str:
    """Why the trainable Parameters a module holds itself get no entry, when it has no adapter."""
    for module_class, reason in _REFUSED:
        if isinstance(module, module_class):
            return f"{type(module).__name__}: {reason}"
    return f"{type(module).__name__} uses this Parameter in its own forward: no K-FAC adapter"


def watch(
    source: nn.Module | TiedPair | Projection,
    on_use: Callable[[str, Tensor, Tensor], None],
    active: Callable[[], bool],
) -> list[Any]:
    """Call ``on_use(role, input, output)`` for every use of an entry's source in a forward pass while
    ``active()``; returns the handles to ``remove()``.

    A module is hooked (role ``"layer"``), both modules of a tied pair (``"linear"``, ``"embedding"``)
    and, for an attention projection, the attention module's visible forward
    (:func:`curvlab.capture.attention.tap`, role ``"q"``, ``"k"``, ``"v"`` or ``"out"``). ``input`` is
    detached; ``output`` is the tensor the loss depends on.
    """
    if isinstance(source, Projection):

        def tapped(x: Tensor, output: Tensor, role: str = source.role) -> None:
            on_use(role, x.detach(), output)

        return [attention_math.tap(source.attention, source.role, tapped, active)]
    targets = [(source.linear, "linear"), (source.embedding, "embedding")] if isinstance(source, TiedPair) \
        else [(source, "layer")]
    handles = []
    for module, role in targets:

        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor, role: str = role) -> None:
            if active():
                on_use(role, inputs[0].detach(), output)

        handles.append(module.register_forward_hook(hook))
    return handles
