"""Embedding and tied embedding / pre-softmax factors (seed eq. 16) against brute force.

The references never touch the capture's hooks: the one-hot inputs are the token ids, the logit
gradients of the per-example loss are ``softmax(z) - onehot(y)`` in closed form, the embedding's
output gradients and the per-example weight gradients come from torch.func (``vmap(grad)``), and the
pre-softmax inputs from a plain forward of the model's feature path. Everything runs in float64, so the
capture and the references differ only by summation order: a few ulps of the largest entry, far below
rtol 1e-10.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from curvlab.capture.coverage import measure, plan_layers
from curvlab.capture.factors import collect_factors, save_factors, select_layers
from curvlab.capture.layers import EmbeddingAdapter, TiedEmbeddingAdapter, TiedPair
from curvlab.io.checkpoint import load

RTOL = 1e-10
ATOL = 1e-13
V, D = 7, 4


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: OpenMP hand-offs cost more than the arithmetic on a shared CPU; use one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyTiedLM(nn.Module):
    """``logits = head(tanh(mix(prefix-mean of embedding(x))))`` with ``head.weight is embedding.weight``.

    ``use_head=False`` computes the logits with an untied Linear (only the embedding use of the tied
    weight is active); ``use_embedding=False`` embeds with an untied Embedding (only the pre-softmax
    use is active). The prefix mean couples the tokens of a sequence, as attention would.
    """

    def __init__(self, *, bias: bool = False, use_embedding: bool = True, use_head: bool = True):
        super().__init__()
        self.embedding = nn.Embedding(V, D)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=bias)
        self.head.weight = self.embedding.weight
        self.use_embedding, self.use_head = use_embedding, use_head
        if not use_embedding:
            self.other_embedding = nn.Embedding(V, D)
        if not use_head:
            self.other_head = nn.Linear(D, V)

    def embed(self, x):
        return (self.embedding if self.use_embedding else self.other_embedding)(x)

    def features(self, e):
        """The pre-softmax inputs ``a`` from the embedded tokens ``e`` ``(B, T, d)``."""
        steps = torch.arange(1, e.shape[1] + 1, dtype=e.dtype).reshape(1, -1, 1)
        return torch.tanh(self.mix(e.cumsum(dim=1) / steps))

    def forward(self, x):
        a = self.features(self.embed(x))
        return (self.head if self.use_head else self.other_head)(a)


def _model(seed: int = 0, **kwargs) -> TinyTiedLM:
    torch.manual_seed(seed)
    return TinyTiedLM(**kwargs).double()


def _tokens(n: int, t: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (n, t), generator=gen), torch.randint(0, V, (n, t), generator=gen)


def _per_token_loss_sum(logits, y):
    """The per-example loss: cross-entropy summed over the example's tokens (docs/factors.md)."""
    return F.cross_entropy(logits.reshape(-1, V), y.reshape(-1), reduction="sum")


def _brute_force_terms(model: TinyTiedLM, x, y):
    """Per example: pre-softmax inputs ``a``, logit gradients ``g``, embedding output gradients ``h``."""
    with torch.no_grad():
        e = model.embed(x)
        a = model.features(e)
        g = torch.softmax(model(x), dim=-1) - F.one_hot(y, V).double()
    # the embedding's output gradient: differentiate the loss through features() and the head
    def from_embedded(ei, yi):
        head = model.head if model.use_head else model.other_head
        return _per_token_loss_sum(head(model.features(ei.unsqueeze(0))), yi.unsqueeze(0))

    h = vmap(grad(from_embedded))(e, y).detach()
    return a, g, h


def _per_source_gradients(model: TinyTiedLM, x, y):
    """Per-example gradients of the tied weight: the total, and the embedding's and the head's uses."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    weight = params["embedding.weight"]

    def tied_loss(w, xi, yi):
        logits = functional_call(model, {**params, "embedding.weight": w}, (xi.unsqueeze(0),))
        return _per_token_loss_sum(logits, yi.unsqueeze(0))

    def untied_loss(w_emb, w_head, xi, yi):
        p = {**params, "embedding.weight": w_emb, "head.weight": w_head}
        return _per_token_loss_sum(functional_call(model, p, (xi.unsqueeze(0),), tie_weights=False),
                                   yi.unsqueeze(0))

    total = vmap(grad(tied_loss), in_dims=(None, 0, 0))(weight, x, y)
    g_emb, g_head = vmap(grad(untied_loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))(weight, weight, x, y)
    return total, g_emb, g_head


def test_tied_pair_is_one_entry_named_after_the_linear():
    model = _model(bias=True)
    selected = select_layers(model)
    assert list(selected) == ["mix", "head"]
    pair, adapter = selected["head"]
    assert isinstance(pair, TiedPair) and isinstance(adapter, TiedEmbeddingAdapter)
    assert pair.linear is model.head and pair.embedding is model.embedding
    assert list(select_layers(model, ["embedding"])) == ["head"]  # either module's path selects it
    untied = _model(use_embedding=False)
    entries = select_layers(untied)
    assert isinstance(entries["other_embedding"][1], EmbeddingAdapter)
    assert isinstance(entries["head"][0], TiedPair)


def test_other_weight_sharing_is_skipped_and_reported():
    shared = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), nn.Linear(3, 2))
    shared[2].weight = shared[0].weight
    assert list(select_layers(shared)) == ["3"]
    coverage = measure(shared, plan_layers(shared), {"3"})
    assert {s["name"] for s in coverage.skipped} == {"0.weight", "0.bias", "2.bias"}
    assert all("shared by layers 0, 2" in s["reason"] for s in coverage.skipped)


@pytest.mark.parametrize("bias", [False, True])
def test_tied_weight_gradient_is_the_sum_of_the_pooled_rank_one_terms(bias):
    """``G_n = Σ_t g_t a_t^T + Σ_t onehot_t h_t^T``: the terms the factors pool are the right ones."""
    model = _model(bias=bias)
    x, y = _tokens(3, 5)
    a, g, h = _brute_force_terms(model, x, y)
    total, g_emb, g_head = _per_source_gradients(model, x, y)
    onehot = F.one_hot(x, V).double()
    torch.testing.assert_close(g_head, torch.einsum("ntv,ntd->nvd", g, a), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(g_emb, torch.einsum("ntv,ntd->nvd", onehot, h), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(total, g_emb + g_head, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("bias", [False, True])
def test_tied_factors_equal_brute_force_pooling(bias):
    """``A = (1/N) Σ_n [Σ_t a a^T + Σ_t h h^T]``, ``S = (1/N) Σ_n (1/2T) [Σ_t g∘g + counts_n]``.

    With a pre-softmax bias, ``a`` is augmented by 1 and ``h`` by 0 (the embedding use does not touch
    the bias column).
    """
    model = _model(bias=bias)
    x, y = _tokens(4, 6, seed=1)
    factors = collect_factors(model, [(x[:1], y[:1]), (x[1:], y[1:])], fisher="empirical")
    a, g, h = _brute_force_terms(model, x, y)
    if bias:
        a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=a.dtype)], dim=-1)
        h = torch.cat([h, torch.zeros(*h.shape[:2], 1, dtype=h.dtype)], dim=-1)
    n, t = x.shape
    A = (torch.einsum("ntd,nte->de", a, a) + torch.einsum("ntd,nte->de", h, h)) / n
    counts = F.one_hot(x, V).double().sum(dim=(0, 1))
    S = ((g * g).sum(dim=(0, 1)) + counts) / (2 * t) / n
    tied = factors["head"]
    assert tied.module_type == "TiedEmbedding" and tied.weight_shape == (V, D) and tied.has_bias == bias
    assert tied.A.shape == (D + bias, D + bias) and tied.S.shape == (V,)
    np.testing.assert_allclose(tied.A, A.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(tied.S, S.numpy(), rtol=RTOL, atol=ATOL)


def test_tied_exact_fisher_v_side_is_the_softmax_hessian_diagonal():
    """With the exact Fisher, the pre-softmax part of ``S`` is ``Σ_t diag(H_t) = Σ_t p∘(1 - p)``."""
    model = _model()
    x, y = _tokens(3, 4, seed=2)
    factors = collect_factors(model, [(x, y)], fisher="exact")
    with torch.no_grad():
        p = torch.softmax(model(x), dim=-1)
    counts = F.one_hot(x, V).double().sum(dim=(0, 1))
    S = ((p * (1 - p)).sum(dim=(0, 1)) + counts) / (2 * x.shape[1]) / x.shape[0]
    np.testing.assert_allclose(factors["head"].S, S.numpy(), rtol=RTOL, atol=ATOL)


def test_single_token_embedding_use_only_kron_equals_gradient_outer_product():
    """Only the embedding use active, one example, one token: ``S ⊗ A = vec(G) vec(G)^T`` exactly.

    The V-side vector is one-hot, so keeping ``S`` diagonal loses nothing here.
    """
    model = _model(use_head=False)
    x, y = _tokens(1, 1, seed=3)
    factors = collect_factors(model, [(x, y)], fisher="empirical")
    total, _, _ = _per_source_gradients(model, x, y)
    vec = total[0].flatten().numpy()  # row-major vec of G (V x d), the Linear's orientation
    tied = factors["head"]
    np.testing.assert_allclose(np.kron(np.diag(tied.S), tied.A), np.outer(vec, vec), rtol=RTOL, atol=ATOL)


def test_single_token_pre_softmax_use_only_matches_the_block_diagonal():
    """Only the pre-softmax use, one example, one token: ``diag(S) ⊗ A`` is the V-block diagonal of
    ``vec(G) vec(G)^T`` (``S`` keeps ``diag(g g^T)``; the dense ``g g^T ⊗ a a^T`` would be all of it)."""
    model = _model(use_embedding=False)
    x, y = _tokens(1, 1, seed=4)
    factors = collect_factors(model, [(x, y)], fisher="empirical")
    total, _, _ = _per_source_gradients(model, x, y)
    vec = total[0].flatten().numpy()
    outer = np.outer(vec, vec)
    blocks = np.kron(np.eye(V), np.ones((D, D)))
    tied = factors["head"]
    np.testing.assert_allclose(np.kron(np.diag(tied.S), tied.A), outer * blocks, rtol=RTOL, atol=ATOL)
    # the untied embedding is an ordinary Embedding entry
    assert factors["other_embedding"].module_type == "Embedding"


def test_embedding_factors_equal_brute_force():
    """Plain ``nn.Embedding`` (``W = E^T``): ``A = counts / N`` (diagonal),
    ``S = (1/N) Σ_n (1/T) Σ_t h h^T``."""
    model = _model(use_embedding=False)
    x, y = _tokens(5, 3, seed=5)
    factors = collect_factors(model, [(x, y)], fisher="empirical")
    params = {k: v.detach() for k, v in model.named_parameters()}

    def from_embedded(ei, yi):
        return _per_token_loss_sum(model.head(model.features(ei.unsqueeze(0))), yi.unsqueeze(0))

    with torch.no_grad():
        e = model.other_embedding(x)
    h = vmap(grad(from_embedded))(e, y).detach()
    emb = factors["other_embedding"]
    assert emb.weight_shape == (V, D) and not emb.has_bias and emb.A.shape == (V,) and emb.S.shape == (D, D)
    counts = F.one_hot(x, V).double().sum(dim=(0, 1))
    np.testing.assert_allclose(emb.A, (counts / 5).numpy(), rtol=RTOL, atol=ATOL)
    S = torch.einsum("ntd,nte->de", h, h) / 3 / 5
    np.testing.assert_allclose(emb.S, S.numpy(), rtol=RTOL, atol=ATOL)

    # one example, one token: S ⊗ diag(A) = vec(G) vec(G)^T with G = (dL/dE)^T
    one = collect_factors(model, [(x[:1, :1], y[:1, :1])], fisher="empirical")["other_embedding"]

    def loss(w, xi, yi):
        out = functional_call(model, {**params, "other_embedding.weight": w}, (xi.unsqueeze(0),))
        return _per_token_loss_sum(out, yi.unsqueeze(0))

    G = grad(loss)(params["other_embedding.weight"], x[0, :1], y[0, :1]).T
    vec = G.flatten().numpy()
    np.testing.assert_allclose(np.kron(one.S, np.diag(one.A)), np.outer(vec, vec), rtol=RTOL, atol=ATOL)


def test_embedding_padding_tokens_are_not_counted():
    emb = nn.Embedding(5, 2, padding_idx=0)
    x = torch.tensor([[0, 1, 1], [0, 0, 4]])
    counts = EmbeddingAdapter().input_second_moment(emb, x)
    torch.testing.assert_close(counts, torch.tensor([0.0, 2, 0, 0, 1], dtype=torch.float64))
    assert EmbeddingAdapter().supports(nn.Embedding(5, 2, sparse=True)) is not None


def test_embedding_matrix_round_trip():
    emb = nn.Embedding(5, 3)
    adapter = EmbeddingAdapter()
    matrix = adapter.to_matrix(emb, emb.weight, None)
    assert matrix.shape == (3, 5)
    weight, bias = adapter.from_matrix(emb, matrix)
    assert bias is None and torch.equal(weight, emb.weight)
    onehot = adapter.inputs(emb, torch.tensor([[1, 4]]))
    torch.testing.assert_close(onehot @ matrix.T, emb(torch.tensor([[1, 4]])))


def test_diagonal_factors_are_saved_and_read_back(tmp_path):
    model = _model(bias=True, use_embedding=False)
    x, y = _tokens(3, 4, seed=6)
    factors = collect_factors(model, [(x, y)], fisher="mc")
    path = tmp_path / "tied.h5"
    save_factors(str(path), factors, model=model, model_name="tiny")
    step = load(str(path)).steps[0]
    assert step.factors["head"].module_type == "TiedEmbedding"
    assert step.factors["head"].S_kind == "diagonal" and step.factors["head"].A_kind == "dense"
    assert step.factors["other_embedding"].A_kind == "diagonal"
    np.testing.assert_array_equal(step.factors["head"].S, factors["head"].S)
