"""The K-FAC optimizer against dense references.

The dense references build ``(S̃ + √λ/π I) ⊗ (A + π√λ I)`` explicitly and solve with it (numpy), with
factors from :func:`collect_factors` (tested against torch.func in test_factors.py / test_tied.py) and
gradients from plain autograd. Everything runs in float64: the eigenbasis route and the dense solve
differ by the conditioning of the damped matrix times machine epsilon (condition numbers here are
below 1e4, so ~1e-12), far below rtol 1e-8.
"""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from curvlab.capture.factors import collect_factors, save_factors
from curvlab.errors import CheckpointError, OptionError
from curvlab.io.checkpoint import load
from curvlab.io.data import iterate_batches, load_dataset
from curvlab.models import build_model
from curvlab.optim.kfac import KFAC, mean_cross_entropy

RTOL = 1e-8
V, D = 6, 4


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: OpenMP hand-offs cost more than the arithmetic on a shared CPU; use one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyTiedLM(nn.Module):
    """Embedding (tied to the pre-softmax Linear), a LayerNorm (exact per-channel blocks), a Linear."""

    def __init__(self, bias: bool = False):
        super().__init__()
        self.embedding = nn.Embedding(V, D)
        self.norm = nn.LayerNorm(D)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=bias)
        self.head.weight = self.embedding.weight

    def forward(self, x):
        e = self.embedding(x)
        steps = torch.arange(1, x.shape[1] + 1, dtype=e.dtype).reshape(1, -1, 1)
        return self.head(torch.tanh(self.mix(self.norm(e.cumsum(1) / steps))))


def _mlp():
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3, bias=False))


def _cnn():
    return nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3))


def _batch(kind: str, n: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return torch.randn(n, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)
    if kind == "cnn":
        x = torch.randn(n, 2, 4, 4, generator=gen, dtype=torch.float64)
        return x, torch.randint(0, 3, (n,), generator=gen)
    return torch.randint(0, V, (n, 5), generator=gen), torch.randint(0, V, (n, 5), generator=gen)


def _model(kind: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model = {"mlp": _mlp, "cnn": _cnn, "tied": TinyTiedLM}[kind](**kwargs)
    return model.double()


def _reference_update(model, x, y, damping, *, kl_clip=None, lr=1.0):
    """``ν · dense-solve((S̃ + √λ/π I) ⊗ (A + π√λ I), vec G)`` per factored layer, and ``ν``."""
    factors = collect_factors(model, [(x, y)], fisher="empirical")
    model.zero_grad()
    logits = model(x)
    mean_cross_entropy(logits, y).backward()
    t_loss = math.prod(logits.shape[1:-1])
    params = dict(model.named_modules())
    out, vg = {}, 0.0
    for name, f in factors.items():
        module = params[name]
        if f.module_type == "NormAffine":
            # the exact per-channel blocks, inverted with plain Tikhonov damping: (F / T + λ I)^-1 G
            G = torch.stack([module.weight.grad, module.bias.grad], dim=1).reshape(1, -1).numpy()
            dense = f.S[0] * scipy.linalg.block_diag(*f.A) / t_loss + damping * np.eye(G.size)
            out[name] = np.linalg.solve(dense, G.reshape(-1)).reshape(G.shape)
            vg += float((out[name] * G).sum())
            continue
        G = module.weight.grad.T if f.module_type == "Embedding" else module.weight.grad.flatten(1)
        if getattr(module, "bias", None) is not None:
            G = torch.cat([G, module.bias.grad[:, None]], dim=1)
        G = G.numpy()
        A = np.diag(f.A) if f.A.ndim == 1 else f.A
        S = (np.diag(f.S) if f.S.ndim == 1 else f.S) / t_loss
        pi = math.sqrt((np.trace(A) / len(A)) / (np.trace(S) / len(S)))
        root = math.sqrt(damping)
        dense = np.kron(S + root / pi * np.eye(len(S)), A + pi * root * np.eye(len(A)))
        delta = np.linalg.solve(dense, G.reshape(-1)).reshape(G.shape)
        out[name] = delta
        vg += float((delta * G).sum())
    nu = 1.0 if kl_clip is None else min(1.0, math.sqrt(kl_clip / (lr**2 * vg)))
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return out, nu, grads


def _as_matrix(module: nn.Module, kind: str, delta_w, delta_b):
    if kind == "Embedding":
        return delta_w.T.numpy()
    if isinstance(module, nn.LayerNorm):
        return torch.stack([delta_w, delta_b], dim=1).reshape(1, -1).numpy()
    matrix = delta_w.flatten(1)
    if delta_b is not None:
        matrix = torch.cat([matrix, delta_b[:, None]], dim=1)
    return matrix.numpy()


@pytest.mark.parametrize("kind", ["mlp", "cnn", "tied"])
@pytest.mark.parametrize("damping", [1e-3, 0.3])
def test_update_equals_dense_damped_natural_gradient(kind, damping):
    """One step (momentum 0, lr 1, no clipping) moves each factored layer by the dense-solve update (the
    tied model's LayerNorm by its exact damped blocks) and every other parameter by its gradient."""
    model = _model(kind)
    x, y = _batch(kind)
    reference, _, grads = _reference_update(copy.deepcopy(model), x, y, damping)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = KFAC(model, lr=1.0, damping=damping, momentum=0.0, kl_clip=None, fisher="empirical")
    with opt:
        opt.train_step(x, y)
    after = dict(model.named_parameters())
    modules = dict(model.named_modules())
    assert set(opt.entries) == set(reference)
    covered = set()
    for name, expected in reference.items():
        entry = opt.entries[name]
        weight_name = next(n for n, p in after.items() if p is entry.weight)
        bias_name = next((n for n, p in after.items() if p is entry.bias), None)
        covered |= {weight_name, bias_name}
        dw = before[weight_name] - after[weight_name].detach()
        db = None if bias_name is None else before[bias_name] - after[bias_name].detach()
        module_type = "Embedding" if isinstance(modules[name], nn.Embedding) else "matrix"
        np.testing.assert_allclose(_as_matrix(modules[name], module_type, dw, db), expected,
                                   rtol=RTOL, atol=1e-12 * np.abs(expected).max())
    for name, p in after.items():
        if name not in covered:  # no factors: plain gradient step
            torch.testing.assert_close(before[name] - p.detach(), grads[name], rtol=1e-12, atol=1e-15)
    if kind == "tied":
        assert opt.loss_locations == 5 and {"norm.weight", "norm.bias"} <= covered


def test_kl_clipping_scales_the_preconditioned_step():
    """``ν = min(1, sqrt(κ / (η² Σ⟨Δ, G⟩)))`` multiplies the factored updates only."""
    lr, damping = 0.5, 1e-2
    for kl_clip in (1e-6, 1e3):
        model = _model("tied")
        x, y = _batch("tied", seed=1)
        reference, nu, grads = _reference_update(copy.deepcopy(model), x, y, damping, kl_clip=kl_clip, lr=lr)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = KFAC(model, lr=lr, damping=damping, momentum=0.0, kl_clip=kl_clip, fisher="empirical")
        opt.train_step(x, y)
        opt.close()
        assert opt.last_nu == pytest.approx(nu, rel=1e-10)
        assert (nu < 1e-2) if kl_clip == 1e-6 else (nu == 1.0)
        step = (before["mix.weight"] - model.mix.weight.detach()) / lr
        np.testing.assert_allclose(step.numpy(), nu * reference["mix"][:, :-1], rtol=RTOL)
        norm_step = (before["norm.weight"] - model.norm.weight.detach()) / lr
        np.testing.assert_allclose(norm_step.numpy(), nu * reference["norm"].reshape(-1, 2)[:, 0], rtol=RTOL)


def test_factor_moving_average_and_update_interval():
    """``A ← Â_1``, then ``A ← ε A + (1-ε) Â_k`` on the steps where a factor update is due."""
    model = _model("tied", bias=True)
    batches = [_batch("tied", seed=s) for s in range(4)]
    decay = 0.9
    # lr = 0: the weights stay put, so each Â_k is collect_factors on batch k at the same weights
    estimates = [collect_factors(model, [b], fisher="exact") for b in batches]
    opt = KFAC(model, lr=0.0, damping=1e-3, factor_decay=decay, factor_update_every=2, fisher="exact")
    expected = {}
    for k, (x, y) in enumerate(batches):
        opt.train_step(x, y)
        for name, f in estimates[k].items():
            if k % 2:
                continue
            previous = expected.get(name)
            expected[name] = (f.A, f.S) if previous is None else tuple(
                decay * p + (1 - decay) * e for p, e in zip(previous, (f.A, f.S), strict=True)
            )
    running = opt.running_factors()
    for name, (A, S) in expected.items():
        np.testing.assert_allclose(running[name].A, A, rtol=1e-12)
        np.testing.assert_allclose(running[name].S, S, rtol=1e-12)
    assert running.num_examples == 16 and running.attrs["ema_decay"] == decay
    # initialize_factors sets the running factors to the mean over its batches
    opt.initialize_factors(batches[:2])
    both = collect_factors(model, batches[:2], fisher="exact")
    for name in both:
        np.testing.assert_allclose(opt.running_factors()[name].A, both[name].A, rtol=1e-12)
    opt.close()
    assert all(not m._forward_hooks for m in model.modules())


def test_eigenbases_are_refreshed_every_inverse_update_every_steps():
    model = _model("mlp")
    opt = KFAC(model, lr=0.1, damping=1e-2, inverse_update_every=3, fisher="exact")
    bases = []
    for k in range(4):
        opt.train_step(*_batch("mlp", seed=k))
        bases.append(opt.entries["0"].QA.clone())
    assert torch.equal(bases[0], bases[1]) and torch.equal(bases[1], bases[2])
    assert not torch.equal(bases[2], bases[3])


def test_state_dict_round_trip_resumes_exactly():
    """Three steps, state through torch.save / torch.load(weights_only=True), three more steps: the same
    weights as six uninterrupted steps (MC labels included: the generator state is saved)."""
    batches = [_batch("tied", seed=s) for s in range(6)]

    def run(split: int | None):
        model = _model("tied")
        opt = KFAC(model, lr=0.2, damping=1e-2, inverse_update_every=2, seed=5)
        for k, (x, y) in enumerate(batches):
            if k == split:
                buffer = io.BytesIO()
                torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
                opt.close()
                buffer.seek(0)
                saved = torch.load(buffer, weights_only=True)
                model = _model("tied", seed=99)
                model.load_state_dict(saved["model"])
                opt = KFAC(model, lr=0.2, damping=1e-2, inverse_update_every=2, seed=0)
                opt.load_state_dict(saved["opt"])
            opt.train_step(x, y)
        opt.close()
        return model.state_dict()

    whole, resumed = run(None), run(3)
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key


def test_state_that_does_not_fit_is_a_one_line_error():
    opt = KFAC(_model("mlp"), lr=0.1, damping=1e-2)
    opt.train_step(*_batch("mlp"))
    state = opt.state_dict()
    other = KFAC(_model("cnn"), lr=0.1, damping=1e-2)
    with pytest.raises(CheckpointError, match="not a K-FAC layer|do not fit"):
        other.load_state_dict(state)
    with pytest.raises(CheckpointError, match="missing"):
        other.load_state_dict({"steps": 1})


@pytest.mark.parametrize(
    "kwargs", [{"damping": 0.0}, {"lr": -1.0}, {"momentum": 1.5}, {"factor_decay": 2.0},
               {"kl_clip": 0.0}, {"inverse_update_every": 0}, {"fisher": "true"}, {"mc_samples": 0}]
)
def test_bad_options(kwargs):
    options = {"lr": 0.1, "damping": 1e-3, **kwargs}
    with pytest.raises(OptionError):
        KFAC(_model("mlp"), **options)


def _full_loss(model, data):
    with torch.no_grad():
        return float(mean_cross_entropy(model(data.x), data.y))


def test_kfac_trains_an_mlp_on_digits():
    data = load_dataset("digits", limit=512)
    torch.manual_seed(0)
    model = build_model("mlp", data.input_shape, data.num_classes, {"widths": [32]})
    initial = _full_loss(model, data)
    opt = KFAC(model, lr=0.1, damping=1e-2, kl_clip=1e-2, inverse_update_every=5)
    for epoch in range(4):
        for x, y in iterate_batches(data, 64, shuffle=True, seed=epoch):
            loss = opt.train_step(x, y)
            assert torch.isfinite(loss)
    final = _full_loss(model, data)
    assert final < 0.25 * initial, (initial, final)


def test_kfac_trains_a_tiny_tied_language_model():
    """Sequences where token t+1 = token t + 1 (mod V): K-FAC on the tied weight learns it, stably."""
    torch.manual_seed(0)
    model = TinyTiedLM().float()
    gen = torch.Generator().manual_seed(0)
    start = torch.randint(0, V, (256, 1), generator=gen)
    seq = (start + torch.arange(7)) % V
    x, y = seq[:, :-1], seq[:, 1:]
    with torch.no_grad():
        initial = float(mean_cross_entropy(model(x), y))
    opt = KFAC(model, lr=0.1, damping=1e-2, kl_clip=1e-2)
    for _ in range(60):
        idx = torch.randint(0, 256, (32,), generator=gen)
        assert torch.isfinite(opt.train_step(x[idx], y[idx]))
    with torch.no_grad():
        final = float(mean_cross_entropy(model(x), y))
    assert final < 0.5 * initial, (initial, final)
    assert opt.entries["head"].S.dim() == 1  # the tied weight's V-side factor stays diagonal


def test_running_factors_make_a_valid_checkpoint(tmp_path):
    model = _model("tied", bias=True).float()
    opt = KFAC(model, lr=0.05, damping=1e-2)
    for k in range(3):
        x, y = _batch("tied", seed=k)
        opt.train_step(x, y)
    path = tmp_path / "k.h5"
    save_factors(str(path), opt.running_factors(), step=3, model=model, model_name="tiny")
    step = load(str(path)).steps[3]
    assert step.fisher_type == "mc" and step.num_examples == 24
    assert step.factors["head"].module_type == "TiedEmbedding" and step.factors["head"].S.ndim == 1
    assert step.attrs["source"] == "kfac-running-average"
