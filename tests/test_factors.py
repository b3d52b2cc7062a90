"""K-FAC factor capture against independent references.

Everything runs in float64 so the comparisons can be tight: the references (torch.func per-example
gradients, explicit loops over convolution locations, dense GGN blocks) and the hooked capture differ
only by summation order, i.e. by a few ulps of the largest entry (rtol 1e-10 leaves ample room).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from curvlab.capture.coverage import measure, plan_layers
from curvlab.capture.factors import collect_factors, select_layers
from curvlab.capture.loss import loss_hessian

RTOL = 1e-10
ATOL = 1e-12


def _data(n: int, shape: tuple[int, ...], classes: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=gen)
    return x, y


def _mlp(bias: bool = True, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 4, bias=bias), nn.Tanh(), nn.Linear(4, 3, bias=bias)
    ).double()


def _cnn(seed: int = 0, **conv) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, kernel_size=3, **conv), nn.Tanh(), nn.Flatten(), nn.LazyLinear(4)
    ).double()


def _per_example_grads(model: nn.Module, x, y) -> dict[str, torch.Tensor]:
    """Brute-force per-example gradients of the per-example loss (torch.func ``vmap(grad)``)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        logits = functional_call(model, p, (xi.unsqueeze(0),))
        return F.cross_entropy(logits, yi.unsqueeze(0), reduction="sum")

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def _gradient_matrix(grads: dict, name: str, n: int) -> torch.Tensor:
    """Example ``n``'s gradient as the (m, n[+1]) matrix ``G`` of design.md (bias = last column)."""
    weight = grads[f"{name}.weight"][n]
    matrix = weight.reshape(weight.shape[0], -1)
    if f"{name}.bias" in grads:
        matrix = torch.cat([matrix, grads[f"{name}.bias"][n].unsqueeze(1)], dim=1)
    return matrix


@pytest.mark.parametrize("bias", [True, False])
def test_single_example_linear_kron_equals_gradient_outer_product(bias):
    model = _mlp(bias)
    x, y = _data(1, (5,), 3)
    factors = collect_factors(model, [(x, y)], fisher="empirical")
    grads = _per_example_grads(model, x, y)
    for name in ("0", "2"):
        vec = _gradient_matrix(grads, name, 0).flatten().numpy()
        kron = np.kron(factors[name].S, factors[name].A)
        np.testing.assert_allclose(kron, np.outer(vec, vec), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("bias", [True, False])
def test_single_example_single_location_conv_kron_equals_gradient_outer_product(bias):
    torch.manual_seed(1)
    # a 3x3 kernel on a 3x3 input has exactly one output location
    model = nn.Sequential(nn.Conv2d(2, 3, 3, bias=bias), nn.Tanh(), nn.Flatten(), nn.Linear(3, 4))
    model = model.double()
    x, y = _data(1, (2, 3, 3), 4)
    factors = collect_factors(model, [(x, y)], fisher="empirical")
    grads = _per_example_grads(model, x, y)
    vec = _gradient_matrix(grads, "0", 0).flatten().numpy()
    np.testing.assert_allclose(
        np.kron(factors["0"].S, factors["0"].A), np.outer(vec, vec), rtol=RTOL, atol=ATOL
    )


def test_linear_factors_equal_brute_force_means():
    """Without weight sharing: ``A = mean a a^T``, ``S = mean g g^T``.

    ``g_n`` is read off the per-example bias gradient (torch.func), ``a_n`` from a plain forward.
    """
    model = _mlp(bias=True)
    x, y = _data(16, (5,), 3)
    factors = collect_factors(model, [(x, y)], fisher="empirical")
    grads = _per_example_grads(model, x, y)
    inputs = {"0": x, "2": torch.tanh(model[0](x)).detach()}
    for name, a in inputs.items():
        a1 = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], dim=1)
        g = grads[f"{name}.bias"]
        np.testing.assert_allclose(factors[name].A, (a1.T @ a1 / len(a)).numpy(), rtol=RTOL)
        np.testing.assert_allclose(factors[name].S, (g.T @ g / len(g)).numpy(), rtol=RTOL)


def _loop_conv_factors(conv: nn.Conv2d, model: nn.Module, x, y):
    """Reference conv factors by an explicit loop over output locations and examples.

    Patches are cut out of the explicitly padded input with plain indexing (no unfold) and the output
    gradients come from one autograd call per example.
    """
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    ph, pw = conv.padding
    n_in = conv.in_channels * kh * kw + (conv.bias is not None)
    A = torch.zeros(n_in, n_in, dtype=torch.float64)
    S = torch.zeros(conv.out_channels, conv.out_channels, dtype=torch.float64)
    for n in range(len(x)):
        captured: dict = {}
        handle = conv.register_forward_hook(lambda m, i, o, c=captured: c.setdefault("out", o))
        logits = model(x[n : n + 1])
        handle.remove()
        loss = F.cross_entropy(logits, y[n : n + 1], reduction="sum")
        (gout,) = torch.autograd.grad(loss, captured["out"])
        padded = F.pad(x[n], (pw, pw, ph, ph))
        _, h_out, w_out = gout[0].shape
        for i in range(h_out):
            for j in range(w_out):
                rows = [i * sh + r * dh for r in range(kh)]
                cols = [j * sw + c * dw for c in range(kw)]
                patch = padded[:, rows][:, :, cols].reshape(-1)
                if conv.bias is not None:
                    patch = torch.cat([patch, torch.ones(1, dtype=patch.dtype)])
                A += torch.outer(patch, patch)
                g = gout[0, :, i, j]
                S += torch.outer(g, g) / (h_out * w_out)
    return (A / len(x)).numpy(), (S / len(x)).numpy()


@pytest.mark.parametrize(
    "conv",
    [
        {},
        {"stride": 2, "padding": 1},
        {"dilation": 2, "padding": 2, "bias": False},
        {"stride": (2, 1), "padding": (0, 1)},
    ],
)
def test_conv_factors_equal_loop_over_locations(conv):
    model = _cnn(**conv)
    x, y = _data(3, (2, 7, 6), 4)
    model(x)  # materialise the lazy layer
    factors = collect_factors(model, [(x, y)], fisher="empirical")
    A, S = _loop_conv_factors(model[0], model, x, y)
    np.testing.assert_allclose(factors["0"].A, A, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(factors["0"].S, S, rtol=RTOL, atol=ATOL)


def test_conv_same_padding_and_reflect_mode_match_explicit_padding():
    """``padding="same"`` and ``padding_mode="reflect"`` unfold the padded input Conv2d itself sees."""
    torch.manual_seed(3)
    x, y = _data(2, (2, 5, 5), 4)
    for kwargs in ({"padding": "same"}, {"padding": 1, "padding_mode": "reflect"}):
        model = _cnn(**kwargs)
        model(x)
        factors = collect_factors(model, [(x, y)], fisher="empirical")
        conv = model[0]
        # reference: the same conv applied to an explicitly padded input, no padding inside
        pad = conv._reversed_padding_repeated_twice
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        plain = nn.Conv2d(2, 3, 3).double()
        plain.load_state_dict(conv.state_dict())
        ref = nn.Sequential(_Pad(pad, mode), plain, *list(model)[1:])
        ref_factors = collect_factors(ref, [(x, y)], fisher="empirical")
        np.testing.assert_allclose(factors["0"].A, ref_factors["1"].A, rtol=RTOL)
        np.testing.assert_allclose(factors["0"].S, ref_factors["1"].S, rtol=RTOL)


class _Pad(nn.Module):
    def __init__(self, pad, mode):
        super().__init__()
        self.pad, self.mode = pad, mode

    def forward(self, x):
        return F.pad(x, self.pad, mode=self.mode)


class _TokenModel(nn.Module):
    """A Linear layer over a sequence (B, T, n): T locations; logits from the mean over tokens."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self.head = nn.Linear(3, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x)).mean(dim=1))


def test_linear_with_locations_equals_loop_over_tokens():
    torch.manual_seed(0)
    model = _TokenModel().double()
    x, y = _data(3, (6, 4), 5)
    factors = collect_factors(model, [(x, y)], fisher="empirical")
    A = np.zeros((5, 5))
    S = np.zeros((3, 3))
    for n in range(3):
        captured: dict = {}
        handle = model.proj.register_forward_hook(lambda m, i, o, c=captured: c.setdefault("out", o))
        loss = F.cross_entropy(model(x[n : n + 1]), y[n : n + 1], reduction="sum")
        handle.remove()
        (gout,) = torch.autograd.grad(loss, captured["out"])
        for t in range(6):
            a = np.append(x[n, t].numpy(), 1.0)
            A += np.outer(a, a)
            g = gout[0, t].numpy()
            S += np.outer(g, g) / 6
    np.testing.assert_allclose(factors["proj"].A, A / 3, rtol=RTOL)
    np.testing.assert_allclose(factors["proj"].S, S / 3, rtol=RTOL)


def test_exact_fisher_single_example_equals_dense_ggn_block():
    """One example, one location: exact ``S ⊗ A`` is the layer's GGN block ``J^T H J`` exactly."""
    model = _mlp()
    x, y = _data(1, (5,), 3)
    factors = collect_factors(model, [(x, y)], fisher="exact")
    params = {k: v.detach() for k, v in model.named_parameters()}
    for name in ("0", "2"):

        def logits_of(weight, bias, name=name):
            p = dict(params, **{f"{name}.weight": weight, f"{name}.bias": bias})
            return functional_call(model, p, (x,))[0]

        jw, jb = jacrev(logits_of, argnums=(0, 1))(params[f"{name}.weight"], params[f"{name}.bias"])
        # Jacobian w.r.t. the row-major vec of G = [W, b]
        jac = torch.cat([jw, jb.unsqueeze(-1)], dim=-1).reshape(jw.shape[0], -1)
        ggn = jac.T @ loss_hessian(model(x)[0].detach()) @ jac
        kron = np.kron(factors[name].S, factors[name].A)
        np.testing.assert_allclose(kron, ggn.numpy(), rtol=1e-9, atol=1e-12)


def test_exact_equals_average_of_mc_within_monte_carlo_error():
    """``E_ŷ[S_mc] = S_exact``: R independent one-sample runs, mean within 5 standard errors."""
    model = _mlp()
    x, y = _data(6, (5,), 3)
    exact = collect_factors(model, [(x, y)], fisher="exact")
    runs = [collect_factors(model, [(x, y)], fisher="mc", seed=s) for s in range(400)]
    for name in exact:
        samples = np.stack([r[name].S for r in runs])
        mean = samples.mean(0)
        stderr = samples.std(0, ddof=1) / np.sqrt(len(samples))
        assert np.all(np.abs(mean - exact[name].S) <= 5 * stderr + 1e-12)
        np.testing.assert_allclose(runs[0][name].A, exact[name].A, rtol=RTOL)
    # and a many-sample single run is close in relative terms
    many = collect_factors(model, [(x, y)], fisher="mc", mc_samples=4000, seed=1)
    for name in exact:
        scale = np.abs(exact[name].S).max()
        assert np.abs(many[name].S - exact[name].S).max() < 0.1 * scale


@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_result_does_not_depend_on_batch_split(fisher):
    model = _cnn(stride=2, padding=1)
    x, y = _data(11, (2, 6, 6), 4)
    model(x)
    whole = collect_factors(model, [(x, y)], fisher=fisher)
    splits = [(x[:1], y[:1]), (x[1:5], y[1:5]), (x[5:], y[5:])]
    split = collect_factors(model, splits, fisher=fisher)
    assert split.num_examples == whole.num_examples == 11
    for name in whole:
        np.testing.assert_allclose(split[name].A, whole[name].A, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(split[name].S, whole[name].S, rtol=RTOL, atol=ATOL)


def test_mc_is_reproducible_by_seed_and_varies_with_it():
    model = _mlp()
    x, y = _data(8, (5,), 3)
    a = collect_factors(model, [(x, y)], fisher="mc", mc_samples=2, seed=7)
    b = collect_factors(model, [(x, y)], fisher="mc", mc_samples=2, seed=7)
    c = collect_factors(model, [(x, y)], fisher="mc", mc_samples=2, seed=8)
    np.testing.assert_array_equal(a["2"].S, b["2"].S)
    assert not np.array_equal(a["2"].S, c["2"].S)
    assert a.attrs == {"mc_samples": 2, "loss": "cross-entropy"}


def test_float32_accumulation_and_metadata():
    model = _mlp().float()
    x, y = _data(4, (5,), 3)
    factors = collect_factors(model, [(x.float(), y)], fisher="empirical", dtype=torch.float32)
    layer = factors["0"]
    assert layer.A.dtype == np.float32 and layer.S.dtype == np.float32
    assert layer.module_type == "Linear" and layer.weight_shape == (4, 5) and layer.has_bias
    assert layer.A.shape == (6, 6) and layer.S.shape == (4, 4)
    assert factors.fisher_type == "empirical" and factors.num_examples == 4


def test_layer_selection_globs_and_unsupported_layers():
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2), nn.Linear(2, 2)
    )
    selected = select_layers(model)
    assert list(selected) == ["2", "3"]
    coverage = measure(model, plan_layers(model), set(selected))
    assert [s["name"] for s in coverage.skipped] == ["0.weight", "0.bias"]
    assert all("groups=2" in s["reason"] for s in coverage.skipped)
    assert list(select_layers(model, ["3"])) == ["3"]
    with pytest.raises(ValueError, match="matches no"):
        select_layers(model, ["nothing*"])


def test_empty_data_and_bad_options_are_errors():
    model = _mlp()
    with pytest.raises(ValueError, match="no examples"):
        collect_factors(model, [], fisher="exact")
    with pytest.raises(ValueError, match="Fisher type"):
        collect_factors(model, [], fisher="true")
    with pytest.raises(ValueError, match="mc_samples"):
        collect_factors(model, [], fisher="mc", mc_samples=0)


def test_hooks_are_removed_and_parameters_get_no_grad():
    model = _mlp()
    x, y = _data(4, (5,), 3)
    collect_factors(model, [(x, y)], fisher="exact")
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
