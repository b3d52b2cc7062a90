"""The affine parameters of normalisation layers (``NormAffine``): exact per-channel Fisher blocks.

The blocks are compared with the dense true Fisher (= GGN) of the whole model restricted to each
channel's ``(γ_c, β_c)`` (``exact`` Fisher type: nothing is approximated, so they must agree to
rounding, rtol 1e-10 in float64), and with the empirical Fisher from torch.func per-example
gradients. Batch statistics (batch norm in training mode) are refused in one line.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from brute_force import dense_fisher, per_example_grads
from torch import nn

from curvlab.capture.factors import collect_factors
from curvlab.errors import LayerError
from curvlab.models.layers import GhostBatchNorm2d
from curvlab.optim.kfac import KFAC

RTOL, ATOL = 1e-10, 1e-13
C = 4


def _bn_stats(norm: nn.Module) -> nn.Module:
    with torch.no_grad():
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
    return norm


NORMS = {
    "layernorm": (lambda: nn.LayerNorm(C), (5, C)),
    "layernorm_2d_shape": (lambda: nn.LayerNorm((2, C)), (2, C)),
    "layernorm_no_bias": (lambda: nn.LayerNorm(C, bias=False), (3, C)),
    "rmsnorm": (lambda: nn.RMSNorm(C, eps=1e-6), (3, C)),
    "groupnorm": (lambda: nn.GroupNorm(2, C), (C, 3, 2)),
    "instancenorm": (lambda: nn.InstanceNorm1d(C, affine=True), (C, 5)),
    "batchnorm1d_flat": (lambda: _bn_stats(nn.BatchNorm1d(C)), (C,)),
    "batchnorm2d": (lambda: _bn_stats(nn.BatchNorm2d(C)), (C, 2, 3)),
    "ghost_batchnorm_eval": (lambda: _bn_stats(GhostBatchNorm2d(C, 2)), (C, 2, 2)),
}


class Model(nn.Module):
    """``x -> tanh(x * u) -> norm -> tanh -> flatten -> Linear``: the norm sees an input that depends on
    the example, its affine parameters are not the identity."""

    def __init__(self, norm: nn.Module, shape: tuple[int, ...]):
        super().__init__()
        torch.manual_seed(0)
        self.u = nn.Parameter(torch.rand(shape) + 0.5, requires_grad=False)
        self.norm = norm
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            if getattr(norm, "bias", None) is not None:
                norm.bias.uniform_(-0.5, 0.5)
        self.fc = nn.Linear(int(np.prod(shape)), 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.norm(torch.tanh(x * self.u))).flatten(1))


def _setup(name: str, n: int = 5):
    make, shape = NORMS[name]
    model = Model(make(), shape).double().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, *shape, generator=gen, dtype=torch.float64)
    return model, x, torch.randint(0, 3, (n,), generator=gen)


def _channel_blocks(model: nn.Module, F: torch.Tensor) -> np.ndarray:
    """The ``(γ_c, β_c)`` blocks of a dense matrix over all Parameters (``named_parameters`` order)."""
    offsets, start = {}, 0
    for name, p in model.named_parameters():
        offsets[name] = start
        start += p.numel()
    channels = model.norm.weight.numel()
    shift = getattr(model.norm, "bias", None) is not None
    index = [
        [offsets["norm.weight"] + c] + ([offsets["norm.bias"] + c] if shift else []) for c in range(channels)
    ]
    return np.stack([F[i][:, i].numpy() for i in (torch.tensor(ix) for ix in index)])


@pytest.mark.parametrize("name", list(NORMS))
def test_blocks_equal_the_dense_fisher_restricted_to_each_channel(name):
    model, x, y = _setup(name)
    factors = collect_factors(model, [(x[:2], y[:2]), (x[2:], y[2:])], fisher="exact")
    entry = factors["norm"]
    k = 2 if getattr(model.norm, "bias", None) is not None else 1
    assert entry.module_type == "NormAffine" and entry.A_kind == "blocks"
    assert entry.A.shape == (model.norm.weight.numel(), k, k) and entry.S.tolist() == [1.0]
    assert entry.weight_shape == tuple(model.norm.weight.shape) and entry.has_bias == (k == 2)
    expected = _channel_blocks(model, dense_fisher(model, x))
    np.testing.assert_allclose(entry.A, expected, rtol=RTOL, atol=ATOL * np.abs(expected).max())


@pytest.mark.parametrize("name", ["layernorm", "groupnorm", "batchnorm2d"])
def test_empirical_blocks_equal_per_example_gradient_outer_products(name):
    model, x, y = _setup(name)
    factors = collect_factors(model, [(x, y)], fisher="empirical")
    grads = per_example_grads(model, x, y)
    r = torch.stack([grads["norm.weight"].flatten(1), grads["norm.bias"].flatten(1)], dim=-1)  # [N, C, 2]
    expected = torch.einsum("nci,ncj->cij", r, r) / len(x)
    np.testing.assert_allclose(factors["norm"].A, expected.numpy(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["batchnorm2d", "ghost_batchnorm_eval"])
def test_batch_norm_in_training_mode_is_a_one_line_error(name):
    model, x, y = _setup(name)
    model.train()
    with pytest.raises(LayerError, match=r"^layer norm: \w+ in training mode \(its batch statistics couple "
                                         r"the examples\): call model.eval\(\)") as err:
        collect_factors(model, [(x, y)], fisher="mc")
    assert "\n" not in str(err.value)


def test_batch_norm_without_running_statistics_is_refused():
    model = Model(nn.BatchNorm1d(C, track_running_stats=False), (C,)).double().eval()
    x = torch.randn(4, C, dtype=torch.float64)
    with pytest.raises(LayerError, match="without running statistics"):
        collect_factors(model, [(x, torch.zeros(4, dtype=torch.long))], fisher="mc")


def test_a_norm_with_a_forward_of_its_own_is_caught():
    class Shifted(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) + 1.0

    model = Model(Shifted(C), (3, C)).double()
    x = torch.randn(4, 3, C, dtype=torch.float64)
    with pytest.raises(LayerError, match="layer norm: .*not weight \\* normalise"):
        collect_factors(model, [(x, torch.zeros(4, dtype=torch.long))], fisher="mc")


def test_kfac_leaves_batch_norm_in_training_mode_to_the_gradient():
    model, x, y = _setup("batchnorm2d", n=6)
    model.train()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    with KFAC(model, lr=1.0, damping=0.1, momentum=0.0, kl_clip=None, fisher="empirical") as opt:
        opt.zero_grad()
        logits = opt.forward(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        opt.backward(logits, y, loss)
        grads = {k: v.grad.clone() for k, v in model.named_parameters() if v.grad is not None}
        opt.step()
        coverage = opt.coverage()
    for name in ("norm.weight", "norm.bias"):
        step = before[name] - model.state_dict()[name]
        torch.testing.assert_close(step, grads[name], rtol=1e-12, atol=1e-15)
    skipped = {s["name"]: s["reason"] for s in coverage.skipped}
    assert "BatchNorm2d in training mode" in skipped["norm.weight"]
    assert not torch.allclose(before["fc.weight"] - model.fc.weight.detach(), grads["fc.weight"])
