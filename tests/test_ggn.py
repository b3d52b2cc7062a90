"""GGN-vector products and Lanczos against the dense GGN built by torch.func.jacrev.

The dense reference: ``G = (1/N) Σ_n J_n^T H_n J_n`` with ``J_n`` from ``jacrev`` and ``H_n`` the
softmax cross-entropy Hessian per location (:func:`curvlab.capture.loss.loss_hessian`, a different
route from the operator's Hessian-vector product). float64 throughout: the two are different
summation orders of the same products, equal to ~1e-15 relative; tolerance 1e-12.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from curvlab.analysis.ggn import GGNOperator, model_layout
from curvlab.analysis.lanczos import extreme_eigenpairs
from curvlab.capture.loss import loss_hessian

TOL = 1e-12


class TinyLM(nn.Module):
    """Embedding tied to the pre-softmax Linear, one hidden Linear, 3 tokens: every adapter kind."""

    def __init__(self, vocab=7, d=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.hidden = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(self.emb(x))))


def _models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    cnn = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 3 * 3, 4, bias=False)
    ).double()
    lm = TinyLM().double()
    gen = torch.Generator().manual_seed(1)
    return {
        "mlp": (mlp, torch.randn(12, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (12,))),
        "cnn": (
            cnn,
            torch.randn(10, 2, 5, 5, generator=gen, dtype=torch.float64),
            torch.randint(0, 4, (10,)),
        ),
        "lm": (lm, torch.randint(0, 7, (6, 3), generator=gen), torch.randint(0, 7, (6, 3))),
    }


def dense_ggn(model, x, layout):
    """``(1/N) Σ J^T H J`` in the layout's ``vec W`` coordinates, from jacrev w.r.t. the layer matrices."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    name_of = {id(p): k for k, p in model.named_parameters()}
    sources = layout.sources()

    def logits(flat):
        replaced = dict(params)
        for block, (source, adapter) in zip(layout.blocks, sources.values(), strict=True):
            w, b = adapter.from_matrix(
                source, flat[block.offset : block.offset + block.size].reshape(block.m, block.n)
            )
            weight, bias = adapter.parameters(source)
            replaced[name_of[id(weight)]] = w
            if bias is not None:
                replaced[name_of[id(bias)]] = b
        return functional_call(model, replaced, (x,))

    flat = torch.cat(
        [
            adapter.to_matrix(s, *[None if t is None else t.detach() for t in adapter.parameters(s)]).reshape(
                -1
            )
            for s, adapter in sources.values()
        ]
    )
    z = logits(flat)
    J = jacrev(logits)(flat).reshape(-1, z.shape[-1], flat.numel())  # (N * L, C, D)
    H = loss_hessian(z.reshape(-1, z.shape[-1]))  # (N * L, C, C)
    return torch.einsum("lcd,lce,lef->df", J, H, J) / x.shape[0]


@pytest.mark.parametrize("name", ["mlp", "cnn", "lm"])
def test_ggn_products_match_the_dense_ggn(name):
    model, x, y = _models()[name]
    layout = model_layout(model)
    op = GGNOperator(model, [(x[:5], y[:5]), (x[5:], y[5:])], layout=layout)
    G = dense_ggn(model, x, layout)
    gen = torch.Generator().manual_seed(2)
    M = torch.randn(layout.dim, 3, generator=gen, dtype=torch.float64)
    got = op @ M
    assert float((got - G @ M).abs().max()) <= TOL * float((G @ M).abs().max())
    assert op.matvecs == 3
    # parameter lists, as curvlinops takes them
    params = layout.parameters()
    vec = [torch.randn(*p.shape, dtype=torch.float64, generator=gen) for p in params]
    out = op.matvec(vec)
    flat_in = op.layout.to_blocks(vec)[0]
    assert set(flat_in) == {b.name for b in layout.blocks}
    ref = op.layout.from_blocks(
        op.layout.to_blocks(G @ op.layout.from_blocks(flat_in, "flat", False)[:, 0])[0], "params", True
    )
    for a, b in zip(out, ref, strict=True):
        assert float((a - b).abs().max()) <= 1e-11 * float(b.abs().max() + 1e-300)


def test_lanczos_top_and_bottom_eigenvalues_of_the_ggn():
    model, x, y = _models()["cnn"]
    layout = model_layout(model)
    op = GGNOperator(model, [(x, y)], layout=layout)
    expected = torch.linalg.eigvalsh(dense_ggn(model, x, layout)).numpy()
    top = extreme_eigenpairs(op, 4, tol=1e-10)
    assert top.converged
    np.testing.assert_allclose(top.values, expected[::-1][:4], rtol=1e-9)
    Gv = op @ top.vectors
    assert float((Gv - top.vectors * torch.as_tensor(top.values)).abs().max()) <= 1e-8 * expected[-1]
    bottom = extreme_eigenpairs(op, 2, which="smallest", tol=1e-10, max_steps=layout.dim)
    np.testing.assert_allclose(bottom.values, expected[:2], atol=1e-9 * expected[-1])
