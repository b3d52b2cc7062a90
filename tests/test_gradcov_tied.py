"""KFE projection of the tied embedding / pre-softmax weight (seed eq. 16) against brute force.

The model is a tiny ``transformer_shallow`` in float64. The references never touch the projector's
hooks: per-example gradients of the shared weight come from torch.func (``vmap(grad)`` with respect
to the ONE Parameter, so both uses are summed by autograd), and the Fisher (= GGN) block of the
shared weight is built explicitly from the Jacobian of the logits. The projector, the all-direction
curvature and the jvp quadratic forms are different summation orders of the same float64 sums; they
agree to ~5e-16 of the largest value, and the tolerance 1e-10 (1e-9 for the jvp route, as in
test_gradcov.py) leaves room for the conditioning of the eigenbases.

The all-direction curvature is checked on T-token sequences against torch.func pullbacks of the
``mc`` route's own sampled logit vectors, and against the dense block with the ``exact`` route (one
backward pass per class and token: the Hessian of an example's loss is block diagonal over its tokens).
"""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvlab import distributed
from curvlab.analysis import gradcov
from curvlab.analysis.curvature import directional_curvature
from curvlab.analysis.gradcov import LayerBasis, project_gradients, run_gradcov, summarize
from curvlab.capture.factors import collect_factors
from curvlab.capture.layers import TiedEmbeddingAdapter, TiedPair
from curvlab.capture.loss import logit_gradient_samples, loss_hessian
from curvlab.commands import main
from curvlab.models.transformer import TransformerShallow

RTOL = 1e-10
RTOL_JVP = 1e-9
V, D, T = 30, 16, 8
TIED = "pre_softmax"
MODEL_ARGS = ["d_model=16", "d_ff=32", "heads=2", "layers=1", "seq_len=8", "vocab=30"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: OpenMP hand-offs cost more than the arithmetic on a shared CPU; use one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(variant: str = "plain") -> TransformerShallow:
    """The tiny Transformer; ``bias``: the pre-softmax Linear gets a bias; ``padding``: token 0 is the
    embedding's ``padding_idx`` (it gets no gradient from the embedding use)."""
    torch.manual_seed(0)
    model = TransformerShallow(V, d_model=D, d_ff=32, heads=2, layers=1, seq_len=T).double()
    if variant == "bias":
        model.pre_softmax.bias = nn.Parameter(0.1 * torch.randn(V, dtype=torch.float64))
    if variant == "padding":
        model.embedding.padding_idx = 0
    return model


def _tokens(n: int, seed: int = 0, length: int = T):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (n, length), generator=gen)
    x[::2, -1] = 0  # every other example holds token 0 (the padding token of the ``padding`` variant)
    return x, torch.randint(0, V, (n, length), generator=gen)


def _params(model):
    return {k: v.detach() for k, v in model.named_parameters()}


def _tied_keys(model):
    """The shared weight's name in ``named_parameters`` (listed once) and the bias name, if any."""
    return ["embedding.weight"] + (["pre_softmax.bias"] if model.pre_softmax.bias is not None else [])


def _per_example_gradients(model, x, y):
    """Brute force ``G_n`` ``[N, V, d(+1)]``: torch.func gradient w.r.t. the shared weight (both uses)."""
    params, keys = _params(model), _tied_keys(model)

    def loss(tensors, xi, yi):
        logits = functional_call(model, {**params, **dict(zip(keys, tensors, strict=True))}, (xi[None],))
        return F.cross_entropy(logits.reshape(-1, V), yi, reduction="sum")

    with sdpa_kernel(SDPBackend.MATH):
        grads = vmap(grad(loss), in_dims=(None, 0, 0))([params[k] for k in keys], x, y)
    if len(grads) == 2:
        return torch.cat([grads[0], grads[1][..., None]], dim=2)
    return grads[0]


def _pullbacks(model, x, u):
    """Brute force ``J_n^T u_n`` ``[N, V, d(+1)]`` for logit vectors ``u`` ``[N, T, V]`` (torch.func)."""
    params, keys = _params(model), _tied_keys(model)

    def inner(tensors, xi, ui):
        logits = functional_call(model, {**params, **dict(zip(keys, tensors, strict=True))}, (xi[None],))
        return (logits[0] * ui).sum()

    with sdpa_kernel(SDPBackend.MATH):
        grads = vmap(grad(inner), in_dims=(None, 0, 0))([params[k] for k in keys], x, u)
    if len(grads) == 2:
        return torch.cat([grads[0], grads[1][..., None]], dim=2)
    return grads[0]


def _dense_fisher(model, x):
    """The exact Fisher (GGN) block of the shared weight, ``(1/N) Σ_n Σ_t J_t^T H_t J_t``, explicitly."""
    params, keys = _params(model), _tied_keys(model)
    total = 0
    for xi in x:

        def logits(*tensors, xi=xi):
            return functional_call(model, {**params, **dict(zip(keys, tensors, strict=True))}, (xi[None],))[0]

        with sdpa_kernel(SDPBackend.MATH):
            jac = jacrev(logits, argnums=tuple(range(len(keys))))(*(params[k] for k in keys))
            z = logits(*(params[k] for k in keys)).detach()
        t = len(xi)
        blocks = [jac[0].reshape(t, V, V, D)] + ([jac[1].reshape(t, V, V, 1)] if len(keys) == 2 else [])
        j = torch.cat(blocks, dim=3).reshape(t, V, -1)  # [token, logit, vec(W) row-major]
        total = total + torch.einsum("tca,tcd,tdb->ab", j, loss_hessian(z), j)
    return total / len(x)


def _bases(model, x, y):
    factors = collect_factors(model, [(x, y)], fisher="exact")
    assert factors[TIED].module_type == "TiedEmbedding" and factors[TIED].S.ndim == 1
    return {name: LayerBasis.from_factors(f.S, f.A) for name, f in factors.items()}


def _kfe_curvature(basis: LayerBasis, fisher: torch.Tensor) -> np.ndarray:
    """``v^T F v`` for every direction ``v = Q_S[:, i] Q_A[:, j]^T`` of a dense block ``F``."""
    m, n = basis.Q_S.shape[0], basis.Q_A.shape[0]
    v = torch.einsum("ai,bj->ijab", basis.Q_S, basis.Q_A).reshape(m, n, m * n)
    return torch.einsum("ijk,kl,ijl->ij", v, fisher, v).numpy()


def test_adapter_gradient_is_the_sum_of_both_uses():
    """``G_n = Σ_t g_t [a_t, 1]^T + Σ_τ onehot(x_τ) [h_τ, 0]^T`` from the hooked tensors equals torch.func."""
    model = _model("bias")
    x, y = _tokens(3, seed=1)
    pair, adapter = TiedPair(model.pre_softmax, model.embedding), TiedEmbeddingAdapter()
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, r=r: seen.update({r: (i[0], o)}))
             for m, r in adapter.targets(pair)]
    logits = model(x)
    for h in hooks:
        h.remove()
    u = torch.softmax(logits, -1) - F.one_hot(y, V).double()
    g_out, h_out = torch.autograd.grad(logits, [seen["linear"][1], seen["embedding"][1]], grad_outputs=u)
    a = adapter.inputs(pair, "linear", seen["linear"][0])
    a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=a.dtype)], dim=-1)
    h = adapter.output_grads(pair, "embedding", h_out)
    h = torch.cat([h, torch.zeros(*h.shape[:2], 1, dtype=h.dtype)], dim=-1)
    ids = adapter.inputs(pair, "embedding", seen["embedding"][0])
    G = adapter.per_example_gradients(pair, [(a, adapter.output_grads(pair, "linear", g_out))], [(ids, h)])
    torch.testing.assert_close(G, _per_example_gradients(model, x, y), rtol=RTOL, atol=1e-13)


@pytest.mark.parametrize("variant", ["plain", "bias", "padding"])
def test_tied_projection_statistics_equal_brute_force(variant):
    """Mean, variance, second moment, and the curvature sums of the Monte-Carlo passes: the sampled
    logit vectors are redrawn from the per-batch seeds and pulled back by torch.func."""
    model = _model(variant)
    x, y = _tokens(9)
    bases = _bases(model, x, y)
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    stats = project_gradients(model, batches, bases, curvature="mc", mc_samples=3, seed=5,
                              rao_blackwell=False)
    basis, s = bases[TIED], stats[TIED]
    c = basis.Q_S.T @ _per_example_gradients(model, x, y) @ basis.Q_A  # [N, V, d(+1)] brute force
    assert s.mean.shape == (V, D + (variant == "bias"))
    scale = float(np.abs(c.numpy()).max())
    np.testing.assert_allclose(s.mean, c.mean(0).numpy(), rtol=RTOL, atol=1e-13 * scale)
    np.testing.assert_allclose(s.variance, c.var(0, unbiased=True).numpy(), rtol=RTOL, atol=1e-13 * scale**2)
    np.testing.assert_allclose(s.second_moment, (c**2).mean(0).numpy(), rtol=RTOL, atol=1e-13 * scale**2)
    curvature = 0
    for k, (xb, _) in enumerate(batches):
        generator = torch.Generator().manual_seed(distributed.batch_seed(5, k))
        with torch.no_grad():
            logits = model(xb)
        for u, weight in logit_gradient_samples(logits, None, "mc", mc_samples=3, generator=generator):
            cu = basis.Q_S.T @ _pullbacks(model, xb, u) @ basis.Q_A
            curvature = curvature + weight * (cu**2).sum(0)
    expected = (curvature / len(x)).numpy()
    np.testing.assert_allclose(s.curvature, expected, rtol=RTOL, atol=1e-13 * expected.max())


@pytest.mark.parametrize("length", [1, T])
def test_tied_curvature_equals_the_dense_fisher_block(length):
    """All-direction curvature by the ``exact`` route (one backward pass per class and token) against
    the explicitly built Fisher (GGN) block of E, and the jvp route on the selected directions against
    the all-direction route. (Backpropagating a class's column from all tokens at once, as an earlier
    version did, was off by up to 2.6x at T = 8: cross-token products.)"""
    model = _model("bias")
    x, y = _tokens(11, seed=6, length=length)
    bases = _bases(model, x, y)
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    result = run_gradcov(model, batches, {TIED: bases[TIED]}, route="exact", directions=6)
    stats, picks = result.layers[TIED], result.selected[TIED]
    dense = _kfe_curvature(bases[TIED], _dense_fisher(model, x))
    np.testing.assert_allclose(stats.curvature, dense, rtol=RTOL, atol=1e-13 * dense.max())
    expected = np.array([stats.curvature[i, j] for i, j in picks])
    assert len(picks) == 6
    # relative, except in the numerical null space (below 1e-13 of the largest value: rounding noise)
    np.testing.assert_allclose(
        result.fvp_curvature[TIED], expected, rtol=RTOL_JVP, atol=1e-13 * expected.max()
    )


def test_tied_projection_in_chunks_of_one_example(monkeypatch):
    """The per-example ``V × d`` matrices exist for a chunk of examples at a time: chunking changes
    nothing but the order of additions."""
    model = _model()
    x, y = _tokens(5, seed=2)
    bases = _bases(model, x, y)
    reference = project_gradients(model, [(x, y)], bases, curvature="exact")[TIED]
    monkeypatch.setattr(gradcov, "CHUNK_BYTES", 1)
    chunked = project_gradients(model, [(x, y)], bases, curvature="exact")[TIED]
    for key in ("mean", "variance", "second_moment", "curvature"):
        np.testing.assert_allclose(getattr(chunked, key), getattr(reference, key), rtol=1e-12, atol=0)


@pytest.mark.parametrize("variant", ["plain", "bias"])
def test_tied_jvp_curvature_equals_the_dense_fisher_block(variant):
    """``directional_curvature`` perturbs the one shared Parameter (both uses) and the bias: ``v^T F v``
    on sequences of T tokens, for KFE and random directions, against the explicitly built block."""
    model = _model(variant)
    x, y = _tokens(5, seed=3)
    bases = _bases(model, x, y)
    width = D + (variant == "bias")
    gen = torch.Generator().manual_seed(4)
    directions = [torch.randn(V, width, generator=gen, dtype=torch.float64) for _ in range(2)]
    basis = bases[TIED]
    directions += [torch.outer(basis.Q_S[:, i], basis.Q_A[:, j]) for i, j in [(V - 1, width - 1), (3, 5)]]
    fisher = _dense_fisher(model, x)
    dense = np.array([float(d.reshape(-1) @ fisher @ d.reshape(-1)) for d in directions])
    fvp = directional_curvature(model, TIED, directions, [(x[:2], y[:2]), (x[2:], y[2:])])
    np.testing.assert_allclose(fvp.numpy(), dense, rtol=RTOL_JVP)


def test_only_the_linear_path_selects_the_tied_entry():
    model = _model()
    x, y = _tokens(2)
    bases = _bases(model, x, y)
    with pytest.raises(ValueError, match="layer embedding: Embedding is not a layer with K-FAC factors"):
        project_gradients(model, [(x, y)], {"embedding": bases[TIED]})
    dense_S = LayerBasis.from_factors(np.eye(V) + 0.1, np.eye(D))
    with pytest.raises(ValueError, match="S must be diagonal"):
        project_gradients(model, [(x, y)], {TIED: dense_S})


def test_gradcov_cli_projects_the_tied_embedding(tmp_path, capsys):
    ckpt, out = tmp_path / "t.h5", tmp_path / "g.h5"
    model_args = [a for arg in MODEL_ARGS for a in ("--model-arg", arg)]
    assert main(["factors", "--model", "transformer_shallow", *model_args, "--examples", "40",
                 "--fisher", "exact", "--quiet", "-o", str(ckpt)]) == 0
    capsys.readouterr()
    assert main(["gradcov", str(ckpt), "--examples", "24", "--batch-size", "16", "--directions", "3",
                 "--curvature", "mc", "--quiet", "--json", "-o", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped_layers"] == []
    layers = {layer["name"]: layer for layer in summary["layers"]}
    assert TIED in layers and layers[TIED]["order"] == "project_first"
    assert summary["fvp_vs_mc_max_rel_err"] is not None
    with h5py.File(ckpt) as f:
        vocab = f[f"steps/0/factors/{TIED}/S"].shape[0]
    with h5py.File(out) as f:
        g = f[f"layers/{TIED}"]
        assert g["variance"].shape == g["curvature"].shape == (vocab, 16)
        assert len(g["selected_fvp_curvature"]) == 3


# ------------------------------------------------------------------ the Rao-Blackwellised mc estimator

RARE = 12  # tokens 0..11: a -9 logit bias (p ~ 1e-5) and never in the inputs, like rare words in text


def _rare_setup():
    model = _model("bias")
    with torch.no_grad():
        model.pre_softmax.bias[:RARE] = -9.0
    x, y = _tokens(24, seed=6)
    x = RARE + x % (V - RARE)
    bases = {TIED: _bases(model, x, y)[TIED]}
    batches = [(x[i : i + 6], y[i : i + 6]) for i in range(0, 24, 6)]
    exact = project_gradients(model, batches, bases, curvature="exact")[TIED].curvature
    return model, bases, batches, exact


def test_rao_blackwell_is_exact_where_plain_monte_carlo_fails_and_its_standard_error_is_calibrated():
    """Rare tokens' rows: the direct path's closed form makes the estimate exact (they have no embedding
    path here), where plain Monte Carlo almost never draws the token and reports ~p² instead of ~p
    (relative error ~1). Over 20 seeds the reported SE matches the estimates' spread (measured: median
    ratio 0.95; the band 0.75-1.25 allows for 20 seeds' sampling error of a standard deviation, ~16%)."""
    model, bases, batches, exact = _rare_setup()
    rare = np.isin(bases[TIED].Q_S.argmax(0).numpy(), np.arange(RARE))
    resolved = exact > 1e-10 * exact.max()
    runs = [project_gradients(model, batches, bases, curvature="mc", mc_samples=4, seed=s)[TIED]
            for s in range(20)]
    plain = project_gradients(model, batches, bases, curvature="mc", mc_samples=4, seed=0,
                              rao_blackwell=False)[TIED]
    assert runs[0].estimator.startswith("mc, direct path in closed form") and plain.estimator == "mc"
    np.testing.assert_allclose(runs[0].curvature[rare], exact[rare], rtol=1e-10)
    assert np.median(np.abs(plain.curvature[rare] / exact[rare] - 1)) > 0.9
    estimates = np.array([r.curvature for r in runs])
    rms_se = np.sqrt(np.mean([r.curvature_se**2 for r in runs], axis=0))
    common = resolved & ~rare[:, None]
    ratio = estimates.std(axis=0, ddof=1)[common] / rms_se[common]
    assert 0.75 < np.median(ratio) < 1.25
    np.testing.assert_allclose(estimates.mean(axis=0)[common].sum(), exact[common].sum(), rtol=0.05)
    exact_stats = project_gradients(model, batches, bases, curvature="exact")[TIED]
    assert not exact_stats.curvature_se.any()  # the exact route is exact


def test_rao_blackwell_agrees_with_the_jvp_route_on_32_directions_with_the_flattest_decile():
    model, bases, batches, exact = _rare_setup()
    result = run_gradcov(model, batches, bases, route="mc", directions=32, mc_samples=16, seed=1)
    check = summarize(result)["fvp_check"][0]
    assert check["directions"] == 32 and check["flattest_decile"] >= 3
    stats, picks = result.layers[TIED], result.selected[TIED]
    fvp = result.fvp_curvature[TIED]
    est = np.array([stats.curvature[p] for p in picks])
    se = np.array([stats.curvature_se[p] for p in picks])
    truth = np.array([exact[p] for p in picks])
    np.testing.assert_allclose(fvp, truth, rtol=1e-9, atol=1e-12 * truth.max())  # jvp is exact
    # within 4 standard errors, or exact (rare rows: closed form, SE 0) to rounding
    assert np.all(np.abs(est - fvp) <= 4 * se + 1e-9 * np.abs(fvp) + 1e-13 * truth.max())


def test_a_diagonal_factor_keeps_its_eigenbasis_as_a_permutation():
    """``LayerBasis.from_factors`` with a diagonal S never forms the V × V matrix (8.6 GB at V = 32768):
    the permutation's projections equal the dense eigenbasis's."""
    gen = torch.Generator().manual_seed(0)
    S, A = torch.rand(7, generator=gen, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
    basis = LayerBasis.from_factors(S, A)
    assert basis._dense_S is None and basis.order_S.dtype == torch.int64
    dense = LayerBasis(basis.Q_S, basis.Q_A, basis.eigenvalues_S, basis.eigenvalues_A)
    torch.testing.assert_close(basis.Q_S @ torch.diag(basis.eigenvalues_S) @ basis.Q_S.T, torch.diag(S))
    g, M = torch.randn(4, 7, dtype=torch.float64), torch.randn(2, 7, 3, dtype=torch.float64)
    torch.testing.assert_close(basis.project_S(g), dense.project_S(g), rtol=0, atol=0)
    torch.testing.assert_close(basis.rotate_S(M), dense.rotate_S(M), rtol=0, atol=0)
    torch.testing.assert_close(basis.column_S(2), dense.column_S(2), rtol=0, atol=0)
    big = LayerBasis.from_factors(np.linspace(1.0, 2.0, 32768), np.eye(4))
    assert big._dense_S is None and big.size_S == 32768
