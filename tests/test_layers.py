"""Per-layer adapters: the normal form ``[batch, locations, features]`` against PyTorch's own ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvlab.capture import conv as conv_math
from curvlab.capture import layers
from curvlab.capture.layers import Conv2dAdapter, LinearAdapter, adapter_for, augment, second_moment

CONVS = [
    {"kernel_size": 3, "padding": 1},
    {"kernel_size": (3, 2), "stride": 2, "padding": (1, 0)},
    {"kernel_size": 3, "dilation": 2, "padding": 2, "bias": False},
    {"kernel_size": 5, "stride": (1, 3)},
    {"kernel_size": 1},
]


@pytest.mark.parametrize("kwargs", CONVS)
def test_conv_inputs_equal_unfold_in_weight_order(kwargs):
    """``a`` is ``F.unfold``'s patch, so ``W.flatten(1) @ a + b`` reproduces the convolution."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, **kwargs).double()
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    a = Conv2dAdapter().inputs(conv, x)
    expected = F.unfold(
        x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride
    ).transpose(1, 2)
    torch.testing.assert_close(a, expected, rtol=0, atol=0)
    out = conv(x)
    s = a @ conv.weight.flatten(1).T
    if conv.bias is not None:
        s = s + conv.bias
    g = Conv2dAdapter().output_grads(conv, out)
    torch.testing.assert_close(s, g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs", CONVS)
def test_conv_second_moment_equals_augmented_outer_products(kwargs, monkeypatch):
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, **kwargs).double()
    x = torch.randn(5, 3, 9, 8, dtype=torch.float64)
    adapter = Conv2dAdapter()
    a = adapter.inputs(conv, x)
    if conv.bias is not None:
        a = augment(a)
    expected = torch.einsum("bti,btj->ij", a, a)
    torch.testing.assert_close(adapter.input_second_moment(conv, x), expected, rtol=1e-12, atol=1e-12)
    # chunks of one example give the same sums
    monkeypatch.setattr(conv_math, "CHUNK_BYTES", 1)
    torch.testing.assert_close(adapter.input_second_moment(conv, x), expected, rtol=1e-12, atol=1e-12)


def test_linear_locations_and_bias_augmentation():
    lin = nn.Linear(3, 2).double()
    x = torch.randn(4, 5, 6, 3, dtype=torch.float64)
    a = LinearAdapter().inputs(lin, x)
    assert a.shape == (4, 30, 3)
    m = LinearAdapter().input_second_moment(lin, x)
    a1 = augment(a).reshape(-1, 4)
    torch.testing.assert_close(m, a1.T @ a1, rtol=1e-12, atol=1e-12)
    assert second_moment(a, has_bias=False).shape == (3, 3)


def test_output_second_moment_both_layouts():
    """The batched-product path (conv layout) and the plain path give ``Σ_b (1/T) Σ_t g g^T``."""
    g_conv = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    conv_form = g_conv.flatten(2).transpose(1, 2)  # transposed view of a contiguous [B, m, T]
    plain = conv_form.contiguous()
    expected = torch.einsum("bti,btj->ij", plain, plain) / 25
    torch.testing.assert_close(layers.output_second_moment(conv_form), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layers.output_second_moment(plain), expected, rtol=1e-12, atol=1e-12)


def test_adapter_lookup():
    assert isinstance(adapter_for(nn.Linear(2, 2)), LinearAdapter)
    assert isinstance(adapter_for(nn.Conv2d(2, 2, 1)), Conv2dAdapter)
    assert adapter_for(nn.ReLU()) is None
    assert Conv2dAdapter().supports(nn.Conv2d(4, 4, 1, groups=2)) is not None


@pytest.mark.parametrize("kwargs", CONVS)
def test_conv_inputs_any_order_is_a_permutation_of_inputs(kwargs):
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, **kwargs).double()
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    patches, order = Conv2dAdapter().inputs_any_order(conv, x)
    torch.testing.assert_close(patches[..., order], Conv2dAdapter().inputs(conv, x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        *CONVS,
        {"kernel_size": 3, "padding": "same"},
        {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
    ],
)
def test_conv_per_example_gradients_equal_patch_products(kwargs):
    """The weight-gradient kernel gives ``Σ_t g_t a_t^T`` per example, in the weight's order."""
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 4, **kwargs).double()
    x = torch.randn(3, 3, 9, 8, dtype=torch.float64)
    grad_output = torch.randn_like(conv(x))
    adapter = Conv2dAdapter()
    expected = torch.bmm(adapter.output_grads(conv, grad_output).transpose(1, 2), adapter.inputs(conv, x))
    torch.testing.assert_close(
        adapter.per_example_gradients(conv, x, grad_output), expected, rtol=1e-12, atol=1e-12
    )
