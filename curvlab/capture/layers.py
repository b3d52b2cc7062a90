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
* ``nn.Conv2d``, weight ``(c_out, c_in, kh, kw)`` with ``groups == 1``: the locations are the output
  pixels, ``a_t`` is the unfolded input patch at pixel ``t`` (length ``c_in*kh*kw``, ordered like the
  flattened weight) and ``g_t`` the output gradient there (seed eq. 15, Grosse & Martens 2016).
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
:meth:`LinearAdapter.from_matrix`), which the K-FAC optimizer uses to precondition gradients.

The bias is handled by augmenting ``a`` with a trailing 1 (the bias is the last column of ``W``); the
adapters return ``a`` *without* that column, and :func:`augment` adds it where a caller needs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
        """The tensors that make up ``W``: ``(weight, bias or None)``."""
        return module.weight, module.bias

    def to_matrix(self, module: nn.Linear, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``W = [weight | bias]`` (``m × n[+1]``) from weight-shaped and bias-shaped tensors."""
        return weight_matrix(module, weight, bias)

    def from_matrix(self, module: nn.Linear, matrix: Tensor) -> tuple[Tensor, Tensor | None]:
        """Inverse of :meth:`to_matrix`: ``(weight-shaped, bias-shaped or None)``."""
        return _split_matrix(matrix, module.weight.shape, module.bias is not None)


@dataclass(frozen=True)
class Conv2dAdapter:
    """``nn.Conv2d`` (``groups == 1``): unfolded patches, one location per output pixel (eq. 15).

    Patches are cut from the padded input in channels-last layout, one strided view per kernel offset
    ``k = (i, j)``, and concatenated: that gives them "offset-major" (feature ``k * c_in + c``), one
    copy and cache-friendly. :meth:`inputs` reorders them to the weight's order ``c * (kh*kw) + k``;
    :meth:`input_second_moment` instead permutes the small ``n × n`` result.
    """

    module_type: str = "Conv2d"
    input_kind: str = "dense"

    def _padded_channels_last(self, module: nn.Conv2d, x: Tensor) -> Tensor:
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            # padding="same"/"valid" or a non-zero padding mode: pad exactly as Conv2d does.
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        else:
            ph, pw = module.padding
            x = F.pad(x, (pw, pw, ph, ph))
        return x.permute(0, 2, 3, 1).contiguous()

    def _offset_major_patches(self, module: nn.Conv2d, padded: Tensor) -> Tensor:
        """``[B, H_out*W_out, kh*kw*c_in]`` patches, feature ``k * c_in + c``, from channels-last input."""
        (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
        h_out = (padded.shape[1] - dh * (kh - 1) - 1) // sh + 1
        w_out = (padded.shape[2] - dw * (kw - 1) - 1) // sw + 1
        rows = [slice(i * dh, i * dh + sh * (h_out - 1) + 1, sh) for i in range(kh)]
        cols = [slice(j * dw, j * dw + sw * (w_out - 1) + 1, sw) for j in range(kw)]
        views = [padded[:, r, c] for r in rows for c in cols]
        return torch.cat(views, dim=-1).reshape(padded.shape[0], h_out * w_out, -1)

    def _weight_order(self, module: nn.Conv2d) -> Tensor:
        """Index ``perm`` with ``weight_order_feature = offset_major_feature[perm]``."""
        offsets = module.kernel_size[0] * module.kernel_size[1]
        channel = torch.arange(module.in_channels).repeat_interleave(offsets)
        offset = torch.arange(offsets).repeat(module.in_channels)
        return offset * module.in_channels + channel

    def inputs(self, module: nn.Conv2d, x: Tensor) -> Tensor:
        """Unfolded patches ``[B, H_out*W_out, c_in*kh*kw]``, in the order of ``W.flatten(1)``."""
        patches = self._offset_major_patches(module, self._padded_channels_last(module, x))
        return patches[..., self._weight_order(module).to(patches.device)]

    def inputs_any_order(self, module: nn.Conv2d, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Offset-major patches and ``order`` with ``inputs(module, x) = patches[..., order]``: one copy
        fewer than :meth:`inputs`; a consumer permutes its small ``n × n`` matrices instead."""
        patches = self._offset_major_patches(module, self._padded_channels_last(module, x))
        return patches, self._weight_order(module).to(patches.device)

    def per_example_gradients(self, module: nn.Conv2d, x: Tensor, grad_output: Tensor) -> Tensor:
        """``G_n = Σ_t g_nt a_nt^T`` for every example, ``[B, m, n]`` in weight order (no bias column).

        Taken from the convolution's own weight-gradient kernel, one example at a time under ``vmap``:
        no unfolded patches are built (4× faster than patches and a batched product on a 16-channel
        32×32 layer).
        """
        padding = module.padding
        if isinstance(padding, str) or module.padding_mode != "zeros":
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
            padding = 0
        shape = module.weight.shape

        def one(xi: Tensor, gi: Tensor) -> Tensor:
            return torch.nn.grad.conv2d_weight(
                xi[None], shape, gi[None], stride=module.stride, padding=padding, dilation=module.dilation
            )

        return torch.func.vmap(one)(x, grad_output).flatten(2)

    def input_second_moment(self, module: nn.Conv2d, x: Tensor) -> Tensor:
        """``Σ_{b,t} a a^T`` (bias-augmented), computed in chunks of examples of about 4 MiB of patches.

        Chunking keeps each patch block in cache between the copy that makes it and the product that
        uses it; the result is permuted from offset-major to weight order at the end.
        """
        padded = self._padded_channels_last(module, x)
        has_bias = self.has_bias(module)
        total = None
        chunk = _examples_per_chunk(padded[:1], module)
        for start in range(0, padded.shape[0], chunk):
            patches = self._offset_major_patches(module, padded[start : start + chunk])
            moment = second_moment(patches, has_bias)
            total = moment if total is None else total.add_(moment)
        order = self._weight_order(module).to(total.device)
        if has_bias:
            order = torch.cat([order, order.new_tensor([len(order)])])
        return total[order][:, order]

    def output_grads(self, module: nn.Conv2d, grad_output: Tensor) -> Tensor:
        """``g`` as ``[B, H_out*W_out, c_out]``."""
        return grad_output.flatten(2).transpose(1, 2)

    def weight_shape(self, module: nn.Conv2d) -> tuple[int, ...]:
        return tuple(module.weight.shape)

    def has_bias(self, module: nn.Conv2d) -> bool:
        return module.bias is not None

    def supports(self, module: nn.Module) -> str | None:
        if module.groups != 1:
            return f"groups={module.groups} (only groups=1 is supported)"
        return None

    def parameters(self, module: nn.Conv2d) -> tuple[Tensor, Tensor | None]:
        return module.weight, module.bias

    def to_matrix(self, module: nn.Conv2d, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``W = [weight.flatten(1) | bias]`` (``c_out × (c_in·kh·kw)[+1]``)."""
        return weight_matrix(module, weight, bias)

    def from_matrix(self, module: nn.Conv2d, matrix: Tensor) -> tuple[Tensor, Tensor | None]:
        return _split_matrix(matrix, module.weight.shape, module.bias is not None)


CHUNK_BYTES = 4 * 2**20


def _examples_per_chunk(one_example: Tensor, module: nn.Conv2d) -> int:
    """How many examples' patches fit in :data:`CHUNK_BYTES` (at least one)."""
    kh, kw = module.kernel_size
    per_example = one_example.numel() * kh * kw * one_example.element_size()
    return max(1, CHUNK_BYTES // max(per_example, 1))


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

    def to_matrix(self, pair: TiedPair, weight: Tensor, bias: Tensor | None) -> Tensor:
        return weight_matrix(pair.linear, weight, bias)

    def from_matrix(self, pair: TiedPair, matrix: Tensor) -> tuple[Tensor, Tensor | None]:
        return _split_matrix(matrix, pair.linear.weight.shape, pair.linear.bias is not None)


LayerAdapter = LinearAdapter | Conv2dAdapter | EmbeddingAdapter

_ADAPTERS: dict[type[nn.Module], LayerAdapter] = {
    nn.Linear: LinearAdapter(),
    nn.Conv2d: Conv2dAdapter(),
    nn.Embedding: EmbeddingAdapter(),
}


def adapter_for(module: nn.Module) -> LayerAdapter | None:
    """The adapter of a module's type (exact type or a subclass), or ``None`` if it has no factors."""
    for module_class, adapter in _ADAPTERS.items():
        if isinstance(module, module_class):
            return adapter
    return None


def augment(a: Tensor) -> Tensor:
    """``a`` with a trailing 1 appended on its last axis: the input of the bias column of ``W``."""
    return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)


def weight_matrix(module: nn.Module, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The ``(m, n[+1])`` matrix ``W`` of design.md from a layer's weight (and bias) tensors."""
    matrix = weight.reshape(weight.shape[0], -1)
    if bias is not None:
        matrix = torch.cat([matrix, bias.reshape(-1, 1)], dim=1)
    return matrix


def _split_matrix(
    matrix: Tensor, weight_shape: tuple[int, ...], has_bias: bool
) -> tuple[Tensor, Tensor | None]:
    """``(weight-shaped, bias-shaped or None)`` from ``W = [weight.flatten(1) | bias]``."""
    if has_bias:
        return matrix[:, :-1].reshape(weight_shape), matrix[:, -1]
    return matrix.reshape(weight_shape), None


def second_moment(a: Tensor, has_bias: bool) -> Tensor:
    """``sum_{b,t} a_bt a_bt^T`` over a batch in normal form, with the bias augmentation.

    The augmented sum is assembled from ``X^T X``, ``X^T 1`` and the location count, so the
    ``[B, T, n+1]`` augmented copy of the inputs is never built.
    """
    x = a.reshape(-1, a.shape[-1])
    core = x.T @ x
    if not has_bias:
        return core
    n = core.shape[0]
    out = core.new_empty(n + 1, n + 1)
    out[:n, :n] = core
    column = x.sum(dim=0)
    out[:n, n] = column
    out[n, :n] = column
    out[n, n] = x.shape[0]
    return out


def output_second_moment(g: Tensor) -> Tensor:
    """``sum_b (1/T) sum_t g_bt g_bt^T`` over a batch in normal form (eq. 15's ``1/|I|``).

    When ``g`` is the transposed view of a contiguous ``[B, m, T]`` gradient (a convolution), the
    per-example products are batched matrix products on that layout, which avoids a transposed copy.
    """
    num_locations = g.shape[1]
    channels_first = g.transpose(1, 2)
    if num_locations > 1 and channels_first.is_contiguous():
        return torch.bmm(channels_first, g).sum(dim=0) / num_locations
    x = g.reshape(-1, g.shape[-1])
    return (x.T @ x) / num_locations
