"""N-d convolutions (Conv1d, Conv3d; Conv2d in test_layers.py): the normal form against PyTorch's own
convolution and explicit loops, and their factors against torch.func per-example gradients.

Float64 throughout: patches are copies (exact), ``W a_t`` reproduces the convolution up to summation
order (1e-12), factors agree with brute force to rtol 1e-10 (as in test_factors.py).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from brute_force import per_example_grads
from torch import nn

from curvlab.capture import conv as conv_math
from curvlab.capture.coverage import measure, plan_layers
from curvlab.capture.factors import collect_factors
from curvlab.capture.layers import ConvAdapter, adapter_for, augment

RTOL, ATOL = 1e-10, 1e-12

CONVS = {
    1: [
        {"kernel_size": 3, "padding": 1},
        {"kernel_size": 2, "stride": 2, "dilation": 2, "bias": False},
        {"kernel_size": 3, "padding": "same", "padding_mode": "reflect"},
        {"kernel_size": 4, "padding": 2, "padding_mode": "circular"},
    ],
    3: [
        {"kernel_size": 2, "padding": 1},
        {"kernel_size": (1, 2, 3), "stride": (2, 1, 1), "dilation": (1, 2, 1), "bias": False},
        {"kernel_size": 3, "padding": "same", "padding_mode": "replicate"},
    ],
}
CASES = [(dims, kwargs) for dims, options in CONVS.items() for kwargs in options]
SHAPES = {1: (3, 2, 9), 3: (2, 2, 4, 5, 4)}
MODULES = {1: nn.Conv1d, 3: nn.Conv3d}


def _conv(dims: int, kwargs: dict, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODULES[dims](2, 3, **kwargs).double()


def _loop_patches(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Patches by explicit indexing of the padded input (``F.pad`` exactly as the module pads), in
    weight order: channel-major, then kernel offsets row-major."""
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        padded = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    else:
        padded = F.pad(x, [p for size in reversed(conv.padding) for p in (size, size)])
    out = conv(x).shape[2:]
    rows = []
    for position in itertools.product(*[range(n) for n in out]):
        patch = []
        for c in range(conv.in_channels):
            for offset in itertools.product(*[range(k) for k in conv.kernel_size]):
                steps = zip(position, conv.stride, offset, conv.dilation, strict=True)
                index = tuple(p * s + o * d for p, s, o, d in steps)
                patch.append(padded[(slice(None), c, *index)])
        rows.append(torch.stack(patch, dim=-1))
    return torch.stack(rows, dim=1)


@pytest.mark.parametrize(("dims", "kwargs"), CASES)
def test_patches_equal_explicit_indexing_and_reproduce_the_convolution(dims, kwargs):
    conv = _conv(dims, kwargs)
    x = torch.randn(*SHAPES[dims], dtype=torch.float64)
    adapter = adapter_for(conv)
    assert isinstance(adapter, ConvAdapter) and adapter.module_type == f"Conv{dims}d"
    a = adapter.inputs(conv, x)
    torch.testing.assert_close(a, _loop_patches(conv, x), rtol=0, atol=0)
    s = a @ conv.weight.flatten(1).T + (0 if conv.bias is None else conv.bias)
    torch.testing.assert_close(s, adapter.output_grads(conv, conv(x)), rtol=1e-12, atol=1e-12)
    patches, order = adapter.inputs_any_order(conv, x)
    torch.testing.assert_close(patches[..., order], a, rtol=0, atol=0)


@pytest.mark.parametrize(("dims", "kwargs"), CASES)
def test_second_moment_and_per_example_gradients(dims, kwargs, monkeypatch):
    conv = _conv(dims, kwargs, seed=1)
    x = torch.randn(*SHAPES[dims], dtype=torch.float64)
    adapter = adapter_for(conv)
    a = adapter.inputs(conv, x)
    a1 = augment(a) if conv.bias is not None else a
    expected = torch.einsum("bti,btj->ij", a1, a1)
    torch.testing.assert_close(adapter.input_second_moment(conv, x), expected, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(conv_math, "CHUNK_BYTES", 1)  # one example per chunk: the same sums
    torch.testing.assert_close(adapter.input_second_moment(conv, x), expected, rtol=1e-12, atol=1e-12)
    grad_output = torch.randn_like(conv(x))
    g = adapter.output_grads(conv, grad_output)
    torch.testing.assert_close(adapter.per_example_gradients(conv, x, grad_output),
                               torch.bmm(g.transpose(1, 2), a), rtol=1e-12, atol=1e-12)


def _model(dims: int, kwargs: dict, spatial: tuple[int, ...]) -> nn.Sequential:
    conv = _conv(dims, kwargs, seed=2)
    with torch.no_grad():
        out = conv(torch.zeros(1, 2, *spatial, dtype=torch.float64)).numel()
    torch.manual_seed(3)
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(out, 4).double())


@pytest.mark.parametrize("dims", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_one_location_kron_equals_the_gradient_outer_product(dims, bias):
    """A kernel as large as the input has one output location: for one example ``S ⊗ A = vec G vec G^T``."""
    spatial = (3,) * dims
    model = _model(dims, {"kernel_size": 3, "bias": bias}, spatial)
    x = torch.randn(1, 2, *spatial, dtype=torch.float64)
    y = torch.tensor([1])
    factors = collect_factors(model, [(x, y)], fisher="empirical")
    grads = per_example_grads(model, x, y)
    G = grads["0.weight"][0].flatten(1)
    if bias:
        G = torch.cat([G, grads["0.bias"][0][:, None]], dim=1)
    vec = G.reshape(-1).numpy()
    kron = np.kron(factors["0"].S, factors["0"].A)
    np.testing.assert_allclose(kron, np.outer(vec, vec), rtol=RTOL, atol=ATOL)
    assert factors["0"].module_type == f"Conv{dims}d" and factors["0"].weight_shape == (3, 2, *(3,) * dims)


@pytest.mark.parametrize(("dims", "kwargs"), [(1, CONVS[1][0]), (1, CONVS[1][2]), (3, CONVS[3][1])])
def test_factors_equal_explicit_location_sums(dims, kwargs):
    """``A = (1/N) Σ_n Σ_t a a^T`` from explicit patches, ``S = (1/N) Σ_n (1/T) Σ_t g g^T`` with ``g``
    from one autograd call per example (no hooks of curvlab's)."""
    spatial = SHAPES[dims][2:]
    model = _model(dims, kwargs, spatial)
    conv = model[0]
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 2, *spatial, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (4,), generator=gen)
    factors = collect_factors(model, [(x[:3], y[:3]), (x[3:], y[3:])], fisher="empirical")
    a = _loop_patches(conv, x)
    if conv.bias is not None:
        a = augment(a)
    A = torch.einsum("nti,ntj->ij", a, a) / len(x)
    S = 0
    for n in range(len(x)):
        out = conv(x[n : n + 1])
        logits = model[3](model[2](model[1](out)))
        (g,) = torch.autograd.grad(F.cross_entropy(logits, y[n : n + 1], reduction="sum"), out)
        g = g.flatten(2)[0].T
        S = S + g.T @ g / len(g)
    np.testing.assert_allclose(factors["0"].A, A.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(factors["0"].S, (S / len(x)).detach().numpy(), rtol=RTOL, atol=ATOL)


def test_transposed_and_grouped_convolutions_are_refused_by_name():
    model = nn.Sequential(nn.ConvTranspose2d(2, 3, 2), nn.Conv1d(3, 3, 1, groups=3))
    plan = plan_layers(model)
    assert not plan.selected
    reasons = {s["name"]: s["reason"] for s in measure(model, plan, set()).skipped}
    assert reasons["0.weight"].startswith("ConvTranspose2d: a transposed convolution")
    assert "groups=3" in reasons["1.weight"] and "groups=3" in reasons["1.bias"]
