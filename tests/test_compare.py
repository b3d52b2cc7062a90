"""K-FAC vs EKFAC vs the exact GGN (analysis/compare.py) and ``curvlab compare`` end to end.

Where K-FAC is exact — one Linear layer on the logits and one example, where the GGN block is
``H ⊗ a a^T = S ⊗ A`` — every figure must say so; on a two-layer MLP the dense GGN blocks are
checked against the jacrev GGN of tests/test_ggn.py and EKFAC's trace against the GGN's
(rotation-invariant: EKFAC keeps the GGN's diagonal in the KFE). float64; tolerances as there.
"""

from __future__ import annotations

import hashlib
import json

import matplotlib.image
import numpy as np
import pytest
import torch
from test_ggn import dense_ggn
from torch import nn

from curvlab.analysis.compare import compare_curvatures, dense_blocks
from curvlab.analysis.ggn import model_layout
from curvlab.capture.factors import collect_factors
from curvlab.commands import main


def test_kfac_is_exact_for_one_output_layer_and_one_example():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3)).double()
    # one example, twice (gradcov's statistics want two): the GGN is still H ⊗ a a^T
    x, y = torch.randn(1, 5, dtype=torch.float64).repeat(2, 1), torch.tensor([1, 1])
    factors = collect_factors(model, [(x, y)], fisher="exact")
    result = compare_curvatures(model, [(x, y)], factors, top_k=2, probes=100, trace_probes=4)
    s = result.summary
    assert s["layers"][0]["kfac_relative_frobenius_error"] < 1e-12
    assert s["layers"][0]["ekfac_relative_frobenius_error"] < 1e-12
    assert max(s["kfac"]["top_k"]["relative_errors"]) < 1e-8
    assert s["kfac"]["top_k"]["subspace_overlap"] == pytest.approx(1.0, abs=1e-8)
    assert s["kfac"]["trace"] == pytest.approx(s["ekfac"]["trace"], rel=1e-12)
    # the GGN has rank C - 1 = 2 of 18: every Krylov space is exhausted after 3 or 4 steps, the
    # quadrature is exact and only the probes' sampling error is left (SE of a weight ~ 0.33/sqrt(100))
    assert s["ggn"]["slq_steps"] == 18 and s["ggn"]["slq_matvecs"] <= 4 * 100
    # the plan for D = 18, t = 0.1, η = 0.05 wants ⌈4/20 · 100 · ln 720⌉ = 132 probes: no guarantee
    assert s["ggn"]["slq_w1_bound_over_range"] is None
    assert s["kfac"]["vs_ggn"]["ks"] < 0.15
    assert s["kfac"]["vs_ggn"]["w1_log10"] < 0.15


def test_dense_blocks_and_ekfac_trace_on_an_mlp():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(20, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (20,), generator=gen)
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    layout = model_layout(model)
    G = dense_ggn(model, x, layout)
    blocks = dense_blocks(model, batches, layout, ["0", "2"])
    for b in layout.blocks:
        ref = G[b.offset : b.offset + b.size, b.offset : b.offset + b.size]
        assert float((blocks[b.name] - ref).abs().max()) <= 1e-12 * float(ref.abs().max())
    factors = collect_factors(model, batches, fisher="exact")
    s = compare_curvatures(model, batches, factors, top_k=3, probes=3, trace_probes=8).summary
    assert s["ekfac"]["trace"] == pytest.approx(float(G.trace()), rel=1e-10)
    top = np.linalg.eigvalsh(G.numpy())[::-1][:3]
    assert s["ggn"]["lambda_max"] == pytest.approx(top[0], rel=1e-8)
    # EKFAC is the best diagonal in the KFE: never further from the GGN block than K-FAC
    for row in s["layers"]:
        assert row["ekfac_relative_frobenius_error"] <= row["kfac_relative_frobenius_error"] + 1e-12
    for label in ("kfac", "ekfac"):
        vs = s[label]["vs_ggn"]
        assert 0 <= vs["ks"] <= 1 and vs["w1_log10"] >= 0 and "ks_se" in vs
        assert 0 <= s[label]["top_k"]["subspace_overlap"] <= 1 + 1e-9


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("compare") / "x.h5"
    args = ["factors", "--model", "mlp", "--model-arg", "widths=6", "--examples", "48", "--quiet"]
    assert main([*args, "--fisher", "mc", "-o", str(path)]) == 0
    return path


def test_compare_command(checkpoint, tmp_path, capsys):
    before = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    out, plot = tmp_path / "c.json", tmp_path / "c.png"
    argv = [
        "compare",
        str(checkpoint),
        "--examples",
        "16",
        "--top-k",
        "2",
        "--accuracy",
        "0.4",
        "--probes",
        "2",
        "--trace-probes",
        "2",
        "--quiet",
        "-o",
        str(out),
        "--plot",
        str(plot),
    ]
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == before
    assert json.loads(out.read_text()) == summary
    assert summary["fisher"] == "exact" and summary["factors"] == "recompute"
    assert [row["name"] for row in summary["layers"]] == ["hidden.0", "fc"]
    assert summary["ggn"]["slq_steps"] == 31 and summary["ggn"]["slq_probes"] == 2
    assert all(row["kfac_relative_frobenius_error"] is not None for row in summary["layers"])
    image = matplotlib.image.imread(plot)
    assert image.ndim == 3 and image.shape[1] > 800 and image.std() > 0.05
    assert (
        main(
            [
                "compare",
                str(checkpoint),
                "--examples",
                "8",
                "--top-k",
                "1",
                "--probes",
                "1",
                "--accuracy",
                "0.9",
                "--trace-probes",
                "2",
                "--quiet",
                "--factors",
                "checkpoint",
                "--max-block",
                "10",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "not computed: block of" in text


def test_compare_refuses_bad_options(checkpoint, tmp_path, capsys):
    assert main(["compare", str(checkpoint), "--trace-probes", "1", "--quiet"]) == 2
    assert main(["compare", str(checkpoint), "-o", str(checkpoint), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("curvlab: error:") == 2 and "Traceback" not in err
