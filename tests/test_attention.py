"""``nn.MultiheadAttention``: the visible forward against PyTorch's, and its four Linear entries against
brute force (torch.func per-example gradients through PyTorch's own forward) and against the same
attention written with four ``nn.Linear`` layers.

Everything in float64. The visible forward and PyTorch's differ only in the order of a few additions
(masks added after the product rather than by ``baddbmm``, the fused kernel's own reductions), i.e. by
a few ulps of the outputs: rtol 1e-12. Factors from the two implementations are the same sums of the
same products in different orders: rtol 1e-10 (as in test_factors.py).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from brute_force import per_example_grads
from torch import nn

from curvlab.capture.attention import tap, visible_forward
from curvlab.capture.coverage import measure, plan_layers
from curvlab.capture.factors import CoverageWarning, collect_factors, select_layers
from curvlab.errors import LayerError
from curvlab.optim.kfac import KFAC

RTOL, ATOL = 1e-10, 1e-12
E, HEADS = 4, 2


def _mha(**kwargs) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, HEADS, **kwargs).double()
    with torch.no_grad():  # non-zero biases, so that every term of the bias columns is exercised
        for name, p in mha.named_parameters():
            if "bias" in name:
                p.uniform_(-0.5, 0.5)
    return mha


def _inputs(batch_first: bool, n: int = 3, length: int = 5, source: int = 4, kdim: int = E, vdim: int = E):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(n, length, E, generator=gen, dtype=torch.float64)
    k = torch.randn(n, source, kdim, generator=gen, dtype=torch.float64)
    v = torch.randn(n, source, vdim, generator=gen, dtype=torch.float64)
    if not batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    return q, k, v


CASES = {
    "self": ({}, "self", {}),
    "self_seq_first_no_bias": ({"bias": False, "batch_first": False}, "self", {}),
    "cross_kv_shared": ({"batch_first": True}, "kv", {"need_weights": False}),
    "all_different": ({"batch_first": True}, "all", {"average_attn_weights": False}),
    "kdim_vdim": ({"kdim": 3, "vdim": 5, "batch_first": True}, "all", {}),
    "bias_kv_zero_attn": ({"add_bias_kv": True, "add_zero_attn": True}, "kv", {}),
    "bool_mask_causal": ({"batch_first": True}, "self", {"mask": "causal", "is_causal": True}),
    "float_mask_3d_padding": ({}, "all", {"mask": "float3d", "padding": True}),
    "padding_no_weights": ({"batch_first": True}, "kv", {"padding": True, "need_weights": False}),
}


def _call_args(case: str):
    kwargs, sharing, call = CASES[case]
    mha = _mha(**kwargs)
    batch_first = kwargs.get("batch_first", False)
    q, k, v = _inputs(batch_first, kdim=kwargs.get("kdim", E), vdim=kwargs.get("vdim", E))
    if sharing == "self":
        k = v = q
    elif sharing == "kv":
        k = v
    n, length, source = 3, q.shape[1 if batch_first else 0], k.shape[1 if batch_first else 0]
    extra = {key: call[key] for key in ("need_weights", "average_attn_weights", "is_causal") if key in call}
    gen = torch.Generator().manual_seed(2)
    if call.get("mask") == "causal":
        extra["attn_mask"] = torch.triu(torch.ones(length, source, dtype=torch.bool), diagonal=1)
    elif call.get("mask") == "float3d":
        extra["attn_mask"] = torch.randn(n * HEADS, length, source, generator=gen, dtype=torch.float64)
    if call.get("padding"):
        padding = torch.zeros(n, source, dtype=torch.bool)
        padding[0, -1] = padding[2, 0] = True
        extra["key_padding_mask"] = padding
    return mha, (q, k, v), extra


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("case", list(CASES))
def test_visible_forward_equals_pytorch(case):
    mha, args, extra = _call_args(case)
    expected, expected_weights = mha(*args, **extra)
    out, weights = visible_forward(mha, *args, **extra)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-13)
    if expected_weights is None:
        assert weights is None
    else:
        torch.testing.assert_close(weights, expected_weights, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("bias", [True, False])
def test_visible_forward_equals_the_fused_fast_path(bias):
    """In eval mode without autograd PyTorch runs its fused kernel (``_native_multi_head_attention``);
    the visible forward gives the same numbers."""
    mha = _mha(bias=bias, batch_first=True).eval()
    q, _, _ = _inputs(True)
    padding = torch.zeros(3, q.shape[1], dtype=torch.bool)
    padding[1, -2:] = True
    with torch.no_grad():
        expected, _ = mha(q, q, q, key_padding_mask=padding, need_weights=False)
        out, _ = visible_forward(mha, q, q, q, key_padding_mask=padding, need_weights=False)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-13)


def test_taps_see_each_projection_and_the_forward_is_restored():
    mha, (q, k, v), extra = _call_args("kdim_vdim")
    own_forward = mha.forward
    seen = {}
    handles = [tap(mha, role, lambda x, out, role=role: seen.setdefault(role, (x, out))) for role in "qkv"]
    handles.append(tap(mha, "out", lambda x, out: seen.setdefault("out", (x, out))))
    y, _ = mha(q, k, v)
    for role, (x, out) in seen.items():
        if role == "out":
            torch.testing.assert_close(out, y, rtol=0, atol=0)  # batch-first already
            continue
        weight = getattr(mha, f"{role}_proj_weight")
        bias = mha.in_proj_bias[("qkv".index(role)) * E : ("qkv".index(role) + 1) * E]
        torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=0, atol=0)
    torch.testing.assert_close(seen["q"][0], q, rtol=0, atol=0)
    for handle in handles:
        handle.remove()
    assert "forward" not in mha.__dict__ and mha.forward == own_forward


# --------------------------------------------------------------------------------------------------
# Models


class Model(nn.Module):
    """Tokens of ``E`` features -> attention (self, or the first half attending to the second) -> mean
    -> Linear classifier."""

    def __init__(self, attention: nn.Module, cross: bool, batch_first: bool, mask: bool):
        super().__init__()
        self.attn = attention
        self.cross, self.batch_first, self.mask = cross, batch_first, mask
        self.fc = nn.Linear(E, 3).double()

    def forward(self, x):
        half = x.shape[1] // 2
        q, kv = (x[:, :half], x[:, half:]) if self.cross else (x, x)
        if not self.batch_first:
            q, kv = q.transpose(0, 1), kv.transpose(0, 1)
        mask = None
        if self.mask:
            axis = 1 if self.batch_first else 0
            mask = torch.triu(torch.ones(q.shape[axis], kv.shape[axis], dtype=torch.bool), diagonal=1)
        out, _ = self.attn(q, kv, kv, attn_mask=mask)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.fc(torch.tanh(out).mean(dim=1))


class LinearAttention(nn.Module):
    """The same attention written with four ``nn.Linear`` layers (plain hooks see them all)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.heads, self.batch_first = mha.num_heads, mha.batch_first
        bias = mha.in_proj_bias is not None
        self.q_proj = nn.Linear(E, E, bias=bias).double()
        self.k_proj = nn.Linear(mha.kdim, E, bias=bias).double()
        self.v_proj = nn.Linear(mha.vdim, E, bias=bias).double()
        self.out_proj = nn.Linear(E, E, bias=mha.out_proj.bias is not None).double()
        with torch.no_grad():
            for i, proj in enumerate((self.q_proj, self.k_proj, self.v_proj)):
                if mha._qkv_same_embed_dim:
                    proj.weight.copy_(mha.in_proj_weight[i * E : (i + 1) * E])
                else:
                    proj.weight.copy_(getattr(mha, f"{'qkv'[i]}_proj_weight"))
                if bias:
                    proj.bias.copy_(mha.in_proj_bias[i * E : (i + 1) * E])
            self.out_proj.load_state_dict(mha.out_proj.state_dict())

    def forward(self, q, k, v, attn_mask=None):
        if not self.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        n, length, _ = q.shape

        def heads(t):
            return t.reshape(n, t.shape[1], self.heads, E // self.heads).transpose(1, 2)

        scores = heads(self.q_proj(q)) @ heads(self.k_proj(k)).transpose(-2, -1) / math.sqrt(E // self.heads)
        if attn_mask is not None:
            scores = scores.masked_fill(attn_mask, float("-inf"))
        out = (torch.softmax(scores, dim=-1) @ heads(self.v_proj(v))).transpose(1, 2).reshape(n, length, E)
        out = self.out_proj(out)
        return (out if self.batch_first else out.transpose(0, 1)), None


MODELS = {
    "self_packed": ({"batch_first": True}, False, True),
    "self_seq_first_no_bias": ({"bias": False}, False, False),
    "cross_packed": ({"batch_first": True}, True, False),
    "cross_separate_kdim": ({"kdim": E, "vdim": 3, "batch_first": True}, True, True),
}


def _pair(name: str):
    kwargs, cross, mask = MODELS[name]
    mha = _mha(**kwargs)
    if cross and "vdim" in kwargs:  # key/value tokens of another width: project the input first
        mha = _mha(**{**kwargs, "kdim": E, "vdim": E})
    torch.manual_seed(3)
    ours = Model(mha, cross, mha.batch_first, mask)
    reference = Model(LinearAttention(mha), cross, mha.batch_first, mask)
    reference.fc.load_state_dict(ours.fc.state_dict())
    return ours, reference


def _tokens(n=5, length=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, E, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=gen)


@pytest.mark.parametrize("name", list(MODELS))
def test_factors_equal_those_of_the_same_attention_written_with_linear_layers(name):
    ours, reference = _pair(name)
    x, y = _tokens()
    torch.testing.assert_close(ours(x), reference(x), rtol=1e-12, atol=1e-13)
    mine = collect_factors(ours, [(x, y)], fisher="exact")
    theirs = collect_factors(reference, [(x, y)], fisher="exact")
    assert list(mine) == ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "fc"] == list(theirs)
    for entry in mine:
        assert (mine[entry].module_type, mine[entry].weight_shape, mine[entry].has_bias) == (
            theirs[entry].module_type, theirs[entry].weight_shape, theirs[entry].has_bias)
        np.testing.assert_allclose(mine[entry].A, theirs[entry].A, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(mine[entry].S, theirs[entry].S, rtol=RTOL, atol=ATOL)
    assert mine.coverage.complete
    assert mine.coverage.total_parameters == sum(p.numel() for p in ours.parameters())


@pytest.mark.parametrize("name", ["self_packed", "cross_separate_kdim"])
def test_one_token_factors_equal_the_per_example_gradient_outer_product(name):
    """One example, one query and one key token: every projection has one location, so K-FAC is exact:
    ``S ⊗ A = vec(G) vec(G)^T`` with ``G`` the rows of PyTorch's parameter gradients (torch.func)."""
    ours, _ = _pair(name)
    x, y = _tokens(n=1, length=2 if ours.cross else 1, seed=4)
    factors = collect_factors(ours, [(x, y)], fisher="empirical")
    grads = per_example_grads(ours, x, y)
    entries = select_layers(ours)
    name_of = {id(p): k for k, p in ours.named_parameters()}
    for entry in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"):
        source, adapter = entries[entry]
        weight, bias = adapter.parameters(source)
        G = adapter.to_matrix(source, grads[name_of[id(weight)]][0],
                              None if bias is None else grads[name_of[id(bias)]][0])
        vec = G.reshape(-1).numpy()
        kron = np.kron(factors[entry].S, factors[entry].A)
        np.testing.assert_allclose(kron, np.outer(vec, vec), rtol=RTOL, atol=ATOL)


def test_projection_rows_of_the_packed_parameters():
    mha = _mha()
    entries = select_layers(Model(mha, False, False, False))
    for i, role in enumerate("qkv"):
        source, adapter = entries[f"attn.{role}_proj"]
        W = adapter.to_matrix(source, mha.in_proj_weight, mha.in_proj_bias)
        torch.testing.assert_close(W[:, :-1], mha.in_proj_weight[i * E : (i + 1) * E], rtol=0, atol=0)
        torch.testing.assert_close(W[:, -1], mha.in_proj_bias[i * E : (i + 1) * E], rtol=0, atol=0)
        weight, bias = adapter.from_matrix(source, W)
        torch.testing.assert_close(weight, mha.in_proj_weight[i * E : (i + 1) * E], rtol=0, atol=0)
        assert adapter.rows(source) == (slice(i * E, (i + 1) * E),) * 2


def test_selecting_some_projections_covers_their_rows_only():
    ours, _ = _pair("self_packed")
    x, y = _tokens()
    with pytest.warns(CoverageWarning, match="coverage 36.8 %"):
        factors = collect_factors(ours, [(x, y)], fisher="mc", layers=["attn.q_proj", "fc"])
    assert list(factors) == ["attn.q_proj", "fc"]
    skipped = {s["name"]: s for s in factors.coverage.skipped}
    assert skipped["attn.in_proj_weight"]["parameters"] == 2 * E * E
    assert "attn.k_proj: not selected by --layers" in skipped["attn.in_proj_weight"]["reason"]
    assert skipped["attn.out_proj.weight"]["parameters"] == E * E
    covered = {c["name"]: c for c in factors.coverage.covered}
    assert covered["attn.in_proj_weight"] == {"name": "attn.in_proj_weight", "parameters": E * E,
                                              "entries": ["attn.q_proj"]}
    # the attention's own path selects all four
    expected = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"]
    assert list(select_layers(ours, ["attn"])) == expected


def test_kfac_preconditions_the_packed_rows_like_the_linear_layers():
    """One K-FAC step on the MHA model moves ``in_proj_weight``'s rows exactly as it moves the separate
    ``nn.Linear`` weights of the same attention (same factors, same gradients)."""
    ours, reference = _pair("self_packed")
    x, y = _tokens(n=6)
    for model in (ours, reference):
        with KFAC(model, lr=1.0, damping=0.1, momentum=0.0, kl_clip=None, fisher="empirical") as opt:
            opt.train_step(x, y)
    torch.testing.assert_close(ours.attn.in_proj_weight.detach(), torch.cat(
        [reference.attn.q_proj.weight, reference.attn.k_proj.weight, reference.attn.v_proj.weight]).detach(),
        rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours.attn.in_proj_bias.detach(), torch.cat(
        [reference.attn.q_proj.bias, reference.attn.k_proj.bias, reference.attn.v_proj.bias]).detach(),
        rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours.attn.out_proj.weight, reference.attn.out_proj.weight, rtol=1e-9,
                               atol=1e-12)


def test_kfac_gives_unselected_rows_their_plain_gradient():
    ours, _ = _pair("self_packed")
    x, y = _tokens(n=6)
    before = ours.attn.in_proj_weight.detach().clone()
    with KFAC(ours, lr=1.0, damping=0.1, momentum=0.0, kl_clip=None, fisher="empirical",
              layers=["attn.k_proj", "fc"]) as opt:
        opt.zero_grad()
        logits = opt.forward(x)
        loss = F.cross_entropy(logits, y)
        opt.backward(logits, y, loss)
        grad = ours.attn.in_proj_weight.grad.clone()
        opt.step()
    step = before - ours.attn.in_proj_weight.detach()
    torch.testing.assert_close(step[:E], grad[:E], rtol=1e-12, atol=1e-15)  # q rows: the gradient
    torch.testing.assert_close(step[2 * E :], grad[2 * E :], rtol=1e-12, atol=1e-15)
    assert not torch.allclose(step[E : 2 * E], grad[E : 2 * E])  # k rows: preconditioned


def test_bias_kv_rows_are_reported_and_unbatched_input_is_an_error():
    mha = _mha(add_bias_kv=True, batch_first=True)
    model = Model(mha, False, True, False)
    x, y = _tokens()
    with pytest.warns(CoverageWarning, match="add_bias_kv"):
        factors = collect_factors(model, [(x, y)], fisher="mc")
    assert {s["name"] for s in factors.coverage.skipped} == {"attn.bias_k", "attn.bias_v"}
    assert factors.coverage.covered_parameters == factors.coverage.total_parameters - 2 * E
    with pytest.raises(LayerError, match="unbatched"):
        visible_forward(mha, x[0], x[0], x[0])


def test_a_subclass_with_its_own_forward_is_refused_by_name():
    class Custom(nn.MultiheadAttention):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    model = Model(Custom(E, HEADS).double(), False, False, False)
    plan = plan_layers(model)
    assert list(plan.selected) == ["fc"]
    coverage = measure(model, plan, {"fc"})
    assert all("overrides MultiheadAttention.forward" in s["reason"] for s in coverage.skipped)
    assert {s["name"] for s in coverage.skipped} == {"attn.in_proj_weight", "attn.in_proj_bias",
                                                     "attn.out_proj.weight", "attn.out_proj.bias"}
