"""Nothing in silence: every trainable parameter is covered by an entry or reported with its reason;
a module called several times per forward pass has its calls as locations (docs/factors.md).

The multi-use factors are checked against sums written out from the calls' own inputs and output
gradients (one autograd call per example, no hooks of curvlab's), in float64 to rtol 1e-10.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvlab.capture.coverage import measure, plan_layers
from curvlab.capture.factors import CoverageWarning, collect_factors
from curvlab.errors import LayerError, OptionError

RTOL, ATOL = 1e-10, 1e-12


class Twice(nn.Module):
    """One Linear used twice per forward pass on a sequence: ``h1 = tanh(lin(x))``, ``h2 = tanh(lin(h1))``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def forward(self, x):
        o1 = self.lin(x)
        h1 = torch.tanh(o1)
        o2 = self.lin(h1)
        if self.calls is not None:
            self.calls += [(x, o1), (h1, o2)]
        return self.head(torch.tanh(o2) + h1).mean(dim=1)


def test_a_module_called_twice_has_its_calls_as_locations():
    """``A = (1/N) Σ_n Σ_calls Σ_t a a^T`` and ``S = (1/N) Σ_n (1/T) Σ_calls Σ_t g g^T`` with ``T`` the
    locations of all calls (here 2 calls × 3 tokens): the calls are locations."""
    model = Twice().double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=gen)
    factors = collect_factors(model, [(x[:2], y[:2]), (x[2:], y[2:])], fisher="empirical")
    A = torch.zeros(5, 5, dtype=torch.float64)
    S = torch.zeros(4, 4, dtype=torch.float64)
    for n in range(len(x)):
        model.calls = []
        loss = F.cross_entropy(model(x[n : n + 1]), y[n : n + 1], reduction="sum")
        grads = torch.autograd.grad(loss, [out for _, out in model.calls])
        for (a, _), g in zip(model.calls, grads, strict=True):
            a1 = torch.cat([a[0], torch.ones(3, 1, dtype=a.dtype)], dim=1).detach()
            A += a1.T @ a1
            S += g[0].T @ g[0] / 6
    model.calls = None
    np.testing.assert_allclose(factors["lin"].A, (A / len(x)).numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(factors["lin"].S, (S / len(x)).numpy(), rtol=RTOL, atol=ATOL)


def test_every_parameter_is_covered_or_named_with_its_reason():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(6))  # used directly in forward
            self.rnn = nn.GRU(6, 6, batch_first=True)
            self.up = nn.ConvTranspose1d(6, 6, 1)
            self.prelu = nn.PReLU()
            self.fc = nn.Linear(6, 3)
            self.unused = nn.Linear(3, 3)
            self.frozen = nn.Linear(6, 6)
            self.frozen.requires_grad_(False)

        def forward(self, x):
            h, _ = self.rnn(x * self.scale)
            h = self.up(h.transpose(1, 2)).transpose(1, 2)
            return self.fc(self.prelu(self.frozen(h))).mean(dim=1)

    model = Mixed().double()
    x = torch.randn(4, 5, 6, dtype=torch.float64)
    with pytest.warns(CoverageWarning) as record:
        factors = collect_factors(model, [(x, torch.zeros(4, dtype=torch.long))], fisher="mc")
    assert len(record) == 1 and "\n" not in str(record[0].message)
    coverage = factors.coverage
    # the frozen Linear has factors (curvature of a layer held fixed) but no trainable parameters
    assert list(factors) == ["fc", "frozen"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert coverage.total_parameters == trainable
    assert coverage.covered_parameters == 6 * 3 + 3
    assert coverage.covered_parameters + sum(s["parameters"] for s in coverage.skipped) == trainable
    reasons = {s["name"]: s["reason"] for s in coverage.skipped}
    assert set(reasons) == {"scale", "rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0",
                            "rnn.bias_hh_l0", "up.weight", "up.bias", "prelu.weight", "unused.weight",
                            "unused.bias"}
    assert reasons["scale"] == "Mixed uses this Parameter in its own forward: no K-FAC adapter"
    assert reasons["rnn.weight_hh_l0"].startswith("GRU: a recurrent layer")
    assert reasons["up.weight"].startswith("ConvTranspose1d: a transposed convolution")
    assert reasons["prelu.weight"].startswith("PReLU")
    assert reasons["unused.weight"] == "unused: not used in the forward pass (no factors)"
    record = coverage.record()
    assert set(record) == {"covered_parameters", "total_parameters", "skipped"}
    assert coverage.to_json()["covered"] == [{"name": "fc.weight", "parameters": 18, "entries": ["fc"]},
                                             {"name": "fc.bias", "parameters": 3, "entries": ["fc"]}]


def test_a_model_without_a_layer_with_factors_is_an_error():
    model = nn.Sequential(nn.GRU(3, 3, batch_first=True))
    with pytest.raises(LayerError, match="no layer with K-FAC factors.*GRU: a recurrent layer"):
        collect_factors(model, [(torch.randn(2, 4, 3), torch.zeros(2, dtype=torch.long))])
    with pytest.raises(OptionError, match="matches no layer"):
        collect_factors(nn.Linear(2, 2), [], layers=["nothing*"])


def test_no_layer_used_is_an_error():
    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return x * 2

    with pytest.raises(LayerError, match="no layer with K-FAC factors was used.*fc: not used"):
        collect_factors(Skips(), [(torch.randn(3, 2), torch.zeros(3, dtype=torch.long))])


def test_a_layer_without_output_gradients_is_set_aside_with_its_reason():
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    model[0].requires_grad_(False)  # a frozen first layer: its output does not depend on anything trainable
    factors = collect_factors(model, [(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))], fisher="mc")
    assert list(factors) == ["2"] and factors.coverage.complete  # frozen parameters are not trainable


def test_a_broadcast_input_is_set_aside_with_its_reason():
    """A position embedding called on ``arange(T)`` (one row shared by every example) has no
    per-example statistics: reported, not averaged wrongly."""

    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.tokens = nn.Embedding(5, 4)
            self.positions = nn.Embedding(6, 4)
            self.fc = nn.Linear(4, 5)

        def forward(self, x):
            return self.fc(self.tokens(x) + self.positions(torch.arange(x.shape[1])))

    model = Positions()
    x = torch.randint(0, 5, (3, 6))
    with pytest.warns(CoverageWarning, match="positions.weight"):
        factors = collect_factors(model, [(x, x)], fisher="mc")
    assert list(factors) == ["tokens", "fc"]
    (skipped,) = factors.coverage.skipped
    assert skipped["name"] == "positions.weight"
    assert "first dimension (6) is not the batch (3 examples)" in skipped["reason"]


def test_layers_globs_report_what_they_leave_out():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    plan = plan_layers(model, ["0", "1"])
    assert list(plan.selected) == ["0", "1"]
    coverage = measure(model, plan, {"0", "1"})
    assert [(s["name"], s["reason"]) for s in coverage.skipped] == [
        ("2.weight", "2: not selected by --layers"), ("2.bias", "2: not selected by --layers")]
    assert coverage.summary() == (
        "coverage 69.2 % of 26 trainable parameters; skipped: 2.weight (6: 2: not selected by --layers); "
        "2.bias (2: 2: not selected by --layers)")
