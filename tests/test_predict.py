"""``curvlab predict``: the NQM built from measured curvature, noise and mean gradient.

References are independent of the KFE and of gradcov: a linear model with squared loss is a true
quadratic, whose Hessian, per-example gradient covariance and distance to the minimum come in closed form
from torch.func (dense Hessian, vmap'd per-example gradients, the minimiser by a Newton step); its own
steps to target come from the NQM solver on the eigendecomposition of the dense Hessian, and, for one
learning rate, from the dense second-moment recursion itself.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, vmap

from curvlab.analysis.basis import LayerBasis
from curvlab.analysis.predict import (
    Measurements,
    PredictError,
    effective_batch_sizes,
    fit_noise_exponent,
    measured_problem,
    noise_scales,
    optimizer_grid,
    target_fraction,
)
from curvlab.analysis.predict_check import compare, steps_errors
from curvlab.analysis.predict_run import run_predict
from curvlab.capture.factors import collect_factors
from curvlab.capture.loss import make_loss
from curvlab.capture.task import Task
from curvlab.commands import main
from curvlab.nqm.analysis import Grid, steps_to_target
from curvlab.nqm.problem import spectrum_problem

BATCH_SIZES = [1, 2, 4, 8, 16, 32]


def _dense(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-example gradients, their mean G and unbiased covariance Σ, and the Hessian H of the mean
    per-example loss ``ℓ_n = Σ (z − y)²`` (curvlab's mse, written out here), all over the flattened
    parameters (torch.func, float64)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def unflat(w):
        return {n: t.reshape(s) for n, t, s in zip(names, torch.split(w, sizes), shapes, strict=True)}

    def ell(w, xi, yi):
        return ((functional_call(model, unflat(w), (xi,)) - yi) ** 2).sum()

    per_example = vmap(grad(ell), in_dims=(None, 0, 0))(flat0, x, y).numpy()
    h = hessian(lambda w: vmap(ell, in_dims=(None, 0, 0))(w, x, y).mean())(flat0).numpy()
    mean = per_example.mean(axis=0)
    sigma = np.cov(per_example, rowvar=False, ddof=1)
    return {"w": flat0.numpy(), "G": mean, "Sigma": sigma, "H": h, "unflat": unflat, "ell": ell}


def _quadratic(seed: int = 0, n: int = 40, d_in: int = 4, k: int = 2):
    """A linear model with squared loss (a true quadratic) on random data, its KFE from the exact Fisher."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen, dtype=torch.float64) * torch.linspace(
        0.3, 2.0, d_in, dtype=torch.float64
    )
    y = torch.randn(n, k, generator=gen, dtype=torch.float64)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, k)).double()
    task = Task(make_loss("mse"))
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    factors = collect_factors(model, batches, fisher="exact", task=task)
    bases = {name: LayerBasis.from_factors(f.S, f.A) for name, f in factors.items()}
    return model, x, y, task, batches, bases


@pytest.fixture(scope="module")
def quadratic():
    model, x, y, task, batches, bases = _quadratic()
    dense = _dense(model, x, y)
    pred = run_predict(
        model,
        batches,
        bases,
        target="fraction=0.1",
        batch_sizes=BATCH_SIZES,
        population=len(x),
        variants=("nqm",),
        route="exact",
        directions=2,
        task=task,
    )
    return model, x, y, task, dense, pred


def test_quadratic_ingredients_are_exact(quadratic):
    model, x, y, task, dense, pred = quadratic
    H, G, Sigma = dense["H"], dense["G"], dense["Sigma"]
    meas = pred.measurements
    assert meas.null_mask().sum() == 0  # random inputs: H has full rank
    # the initial excess risk of the NQM, Σ ½ g²/h, is the quadratic's L(w0) − L(w*), w* = w0 − H⁻¹G
    w_star = dense["w"] - np.linalg.solve(H, G)
    ell = vmap(dense["ell"], in_dims=(None, 0, 0))
    excess = float(ell(torch.as_tensor(dense["w"]), x, y).mean() - ell(torch.as_tensor(w_star), x, y).mean())
    problem = measured_problem(meas).problem
    # float64 sums of ~20 terms of size ~1: 1e-10 relative leaves room for the eigensolvers' rounding
    assert problem.initial_risk() == pytest.approx(excess, rel=1e-10)
    # McCandlish et al.'s noise scales, dense: tr(Σ)/|G|², tr(HΣ)/(GᵀHG); the KFE diagonalises H exactly
    scales = noise_scales(meas)
    assert scales["b_simple"] == pytest.approx(np.trace(Sigma) / (G @ G), rel=1e-10)
    assert scales["b_noise"] == pytest.approx(np.trace(H @ Sigma) / (G @ H @ G), rel=1e-10)
    assert pred.scales["b_noise"] == scales["b_noise"]


def _reference_problem(dense):
    """The quadratic's own NQM in the eigenbasis of its dense Hessian (numpy's eigh, not the KFE): the
    risk ½ tr(H M) of the second moment M only involves M's diagonal there, which evolves on its own."""
    h, U = np.linalg.eigh(dense["H"])
    theta0 = np.linalg.solve(dense["H"], dense["G"])
    c = np.einsum("ij,jk,ki->i", U.T, dense["Sigma"], U)
    return spectrum_problem(h, c, (U.T @ theta0) ** 2)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "kfac", "ema"])
def test_quadratic_steps_are_exact(quadratic, optimizer):
    model, x, y, task, dense, pred = quadratic
    ref = _reference_problem(dense)
    b_eff = effective_batch_sizes(BATCH_SIZES, len(x))
    result = steps_to_target(ref, 0.1 * ref.initial_risk(), b_eff, optimizer_grid(optimizer, ref.h))
    predicted = pred.curves["nqm"][optimizer].steps
    assert predicted == [int(s) for s in result.steps]
    assert all(s is not None and s > 0 for s in predicted)


def test_quadratic_steps_match_the_dense_recursion(quadratic):
    """SGD at the tuned learning rate of B = 1 and 4: M ← (I − αH) M (I − αH) + α² Σ (1/B − 1/N), risk
    ½ tr(H M), with the full matrices (off-diagonal noise included), against the measured NQM's steps."""
    model, x, y, task, dense, pred = quadratic
    H, Sigma = dense["H"], dense["Sigma"]
    theta0 = np.linalg.solve(H, dense["G"])
    meas = pred.measurements
    problem = measured_problem(meas).problem
    target = 0.1 * problem.initial_risk()
    curve = pred.curves["nqm"]["sgd"]
    for batch in (1, 4):
        lr = curve.lr[curve.batch_sizes.index(batch)]
        noise = Sigma * (1.0 / batch - 1.0 / len(x))
        M = np.outer(theta0, theta0)
        step = np.eye(H.shape[0]) - lr * H
        t = 0
        while 0.5 * np.trace(H @ M) >= target:
            M = step @ M @ step + lr**2 * noise
            t += 1
            assert t < 100_000
        b_eff = effective_batch_sizes([batch], len(x))
        got = steps_to_target(problem, target, b_eff, Grid("sgd", np.array([lr])))
        assert int(got.steps[0]) == t


def test_api_predict_is_the_same_computation(quadratic):
    import curvlab

    model, x, y, task, dense, pred = quadratic
    factors = collect_factors(model, [(x[:16], y[:16]), (x[16:], y[16:])], fisher="exact", task=task)
    again = curvlab.predict(model, [(x, y)], factors, target="fraction=0.1", batch_sizes=BATCH_SIZES,
                            optimizers=("sgd",), variants=("nqm",), population=len(x), curvature="exact")
    assert again.curves["nqm"]["sgd"].steps == pred.curves["nqm"]["sgd"].steps
    assert again.scales["b_noise"] == pytest.approx(pred.scales["b_noise"], rel=1e-10)


def test_target_fraction_and_loss_mapping():
    assert target_fraction("fraction=0.25") == 0.25
    assert target_fraction("loss=1.0", initial_loss=2.0, loss_floor=0.5) == pytest.approx(1 / 3)
    for bad in ("fraction=0", "fraction=1", "fraction=nan", "loss=x", "error=0.1", "0.1", "loss=2.5"):
        with pytest.raises(PredictError):
            target_fraction(bad, initial_loss=2.0)
    with pytest.raises(PredictError):
        target_fraction("loss=0.1", initial_loss=2.0, loss_floor=0.2)


def test_effective_batch_size():
    # the variance of a mean of B distinct examples out of N: c (1/B − 1/N)
    np.testing.assert_allclose(effective_batch_sizes([1, 10], 20), [20 / 19, 20.0])
    assert effective_batch_sizes([20], 20)[0] == np.finfo(np.float64).max
    np.testing.assert_array_equal(effective_batch_sizes([3, 7], None), [3, 7])


def _meas(h, c, g, n=10, population=None):
    return Measurements(
        np.asarray(h, float), np.asarray(c, float), np.asarray(g, float), (("a", len(h)),), n, population
    )


def test_measurements_refuse_bad_values_and_count_the_null_space():
    with pytest.raises(PredictError, match="NaN"):
        _meas([1.0, np.nan], [1, 1], [1, 1])
    with pytest.raises(PredictError, match="non-negative"):
        _meas([1.0, 1.0], [1, -1], [1, 1])
    # a negative Monte-Carlo curvature (tied weights' unbiased estimator): left out and counted
    negative = _meas([1.0, -0.1, 0.5], [1.0, 1.0, 1.0], [1.0, 1.0, 0.5], n=10, population=10)
    assert measured_problem(negative).info["negative_curvature_directions"] == 1
    assert measured_problem(negative).info["nqm_directions"] == 2
    assert noise_scales(negative)["tr_h_sigma"] == pytest.approx(1.5)
    with pytest.raises(PredictError, match="at least 2"):
        _meas([1.0], [1], [1], n=1)
    with pytest.raises(PredictError, match="add up"):
        Measurements(np.ones(2), np.ones(2), np.ones(2), (("a", 3),), 5)
    meas = _meas([1.0, 1e-14, 0.5], [1.0, 2.0, 1.0], [1.0, 1.0, 0.5], n=10, population=10)
    mapped = measured_problem(meas)
    assert mapped.info["null_directions"] == 1 and mapped.info["nqm_directions"] == 2
    np.testing.assert_allclose(mapped.problem.a0, [1.0, 1.0])  # θ = g/h
    scales = noise_scales(meas)
    assert scales["null_share_tr_sigma"] == pytest.approx(0.5)
    with pytest.raises(PredictError, match="starts at its minimum"):
        measured_problem(_meas([1.0, 2.0], [1, 1], [0.0, 0.0], n=10, population=10))


def test_mean_gradient_is_debiased_for_a_sample():
    # E[ĝ²] = g² + c (1/n − 1/N): subtracted when the n examples are a sample of N
    meas = _meas([1.0], [4.0], [1.0], n=8, population=16)
    assert meas.gradient_sq()[0] == pytest.approx(1.0 - 4.0 * (1 / 8 - 1 / 16))
    assert _meas([1.0], [4.0], [1.0], n=8, population=8).gradient_sq()[0] == 1.0


def test_variants_keep_the_totals():
    rng = np.random.default_rng(0)
    h = np.sort(rng.lognormal(size=50))
    meas = _meas(h, h**1.5, rng.normal(size=50), n=100, population=100)
    base = measured_problem(meas).problem
    iso = measured_problem(meas, "nqm_isotropic_theta").problem
    cph = measured_problem(meas, "nqm_c_prop_h").problem
    paper = measured_problem(meas, "nqm_1_over_i").problem
    assert iso.initial_risk() == pytest.approx(base.initial_risk())
    assert np.ptp(iso.a0) == 0
    assert cph.c.sum() == pytest.approx(base.c.sum()) and np.ptp(cph.c / cph.h) < 1e-12
    np.testing.assert_allclose(paper.h, 1 / np.arange(1, 51))
    with pytest.raises(PredictError, match="unknown"):
        measured_problem(meas, "nope")


def test_noise_exponent_interval_coverage():
    """c ∝ h^γ: the HC1 interval's coverage under its own model (independent directions, noise whose
    spread grows with log h), 300 simulated networks of 400 directions. Nominal 90 %; with 300 repeats
    the binomial standard error is 1.7 %, so [0.85, 0.95] is three standard errors."""
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(300):
        logh = rng.uniform(-8, 0, 400)
        logc = 0.3 + 0.8 * logh + rng.normal(size=400) * (0.2 + 0.1 * np.abs(logh))
        fit = fit_noise_exponent(np.exp(logh), np.exp(logc), 0.0)
        lo, hi = fit["interval"]
        hits += lo <= 0.8 <= hi
    assert 0.85 <= hits / 300 <= 0.95
    assert fit_noise_exponent(np.ones(2), np.ones(2), 0.0)["gamma"] is None


def test_steps_errors_and_compare():
    errors = steps_errors([16, 64, 256], [100, 50, None], {16: 200.0, 64: 50.0, 256: 10.0})
    assert errors["points"] == 2
    assert errors["log2_offset"] == pytest.approx(-0.5)
    assert errors["rms_log2"] == pytest.approx(math.sqrt(0.5))
    assert errors["shape_rms_log2"] == pytest.approx(0.5)
    prediction = {
        "predictors": {
            "nqm": {
                "optimizers": {
                    "sgd": {
                        "batch_sizes": [16, 64],
                        "steps": [80, 20],
                        "fit": {"b_crit": 100.0, "identified": True},
                    }
                }
            }
        },
        "noise_scales": {"b_simple": 25.0, "b_noise": None},
    }
    results = {
        "optimizers": {
            "sgd": {
                "fit": {"b_crit": 50.0, "identified": True},
                "cells": [{"batch_size": 16, "steps": 80}, {"batch_size": 64, "steps": 40}],
            },
            "adam": {"fit": {"b_crit": 5.0, "identified": True}, "cells": []},
        }
    }
    out = compare(prediction, results)
    assert list(out["optimizers"]) == ["sgd"]  # no predictor of adam
    sgd = out["optimizers"]["sgd"]["predictors"]
    assert sgd["nqm"]["log2_error"] == pytest.approx(1.0) and sgd["nqm"]["within_factor_2"]
    assert sgd["b_simple"]["log2_error"] == pytest.approx(1.0)
    assert sgd["b_noise"]["log2_error"] is None
    results["optimizers"]["sgd"]["fit"]["identified"] = False  # a B_crit at the search edge: no error
    assert compare(prediction, results)["optimizers"]["sgd"]["predictors"]["nqm"]["log2_error"] is None


# ------------------------------------------------------------------------------------------ command


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("predict") / "x.h5"
    args = ["factors", "--model", "mlp", "--model-arg", "widths=8", "--examples", "64", "--quiet"]
    assert main([*args, "--fisher", "exact", "-o", str(path)]) == 0
    return path


def test_predict_command_writes_the_file_and_plot(checkpoint, tmp_path, capsys):
    before = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    out, plot = tmp_path / "p.json", tmp_path / "p.png"
    argv = [
        "predict",
        str(checkpoint),
        "--examples",
        "64",
        "--target",
        "loss=1.5",
        "--batch-sizes",
        "4,16,64",
        "--optimizers",
        "sgd,kfac",
        "--variants",
        "nqm,nqm_1_over_i",
        "--lr-grid",
        "30",
        "--quiet",
        "-o",
        str(out),
        "--plot",
        str(plot),
        "--json",
    ]
    capsys.readouterr()
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == before
    data = json.loads(out.read_text())
    assert data["format"] == "curvlab.predict" and data["checkpoint"]["sha256"] == before
    assert data["options"]["target"] == "loss=1.5" and data["created"].endswith("+00:00")
    assert (
        data["measured"]["num_examples"] == 64 and data["measured"]["population"] == 1438
    )  # the digits training split
    assert set(data["predictors"]) == {"nqm", "nqm_1_over_i"}
    assert set(data["predictors"]["nqm"]["optimizers"]) == {"sgd", "kfac"}
    assert data["target"]["fraction"] == pytest.approx((1.5 - 0.0) / data["initial_loss"])
    assert summary["b_crit"]["b_simple"] == data["noise_scales"]["b_simple"] > 0
    assert data["measured"]["fvp_vs_exact_max_rel_err"] < 1e-6  # jvp cross-check of the curvature
    import matplotlib.image

    image = matplotlib.image.imread(plot)
    assert image.ndim == 3 and image.shape[0] > 200 and image.std() > 0.05


def _one_line_error(capsys, argv, *fragments):
    """Exit status 2, one stderr line naming the problem, no traceback (the commands' error handler)."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("curvlab: error:") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err


def test_predict_command_errors(checkpoint, tmp_path, capsys):
    out = tmp_path / "e.json"
    common = ["predict", str(checkpoint), "--examples", "16", "-o", str(out), "--quiet"]
    _one_line_error(capsys, common, "--target is required")
    _one_line_error(capsys, [*common, "--target", "error=0.1"], "classification error")
    _one_line_error(capsys, [*common, "--target", "fraction=0.1", "--optimizers", "adam"], "adam")
    _one_line_error(capsys, [*common, "--target", "loss=99"], "already meets")
    _one_line_error(capsys, ["predict", str(checkpoint), "--target", "fraction=0.1", "-o", str(checkpoint)],
                    "refusing to overwrite")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    _one_line_error(capsys, ["predict", str(bad), "--target", "fraction=0.1", "-o", str(out)], str(bad))
    assert not out.exists()


def test_predict_own_model_with_norm_blocks(tmp_path, capsys):
    """A factory-built CNN (conv, eval-mode BatchNorm as NormAffine blocks, residual) goes through predict
    when --model names the factory, and is refused with one line when it does not."""
    from pathlib import Path

    cnn = f"{Path(__file__).parent / 'own_models' / 'cnn.py'}:build"
    x, out = str(tmp_path / "cnn.h5"), tmp_path / "cnn.predict.json"
    assert main(["factors", "--model", cnn, "--model-arg", "width=3", "--examples", "24", "--fisher", "exact",
                 "-o", x, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["predict", x, "--target", "fraction=0.2", "--quiet", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("curvlab: error: ") and "--model" in err and not out.exists()
    assert main(["predict", x, "--model", cnn, "--model-arg", "width=3", "--examples", "24", "--population",
                 "inf", "--target", "fraction=0.2", "--batch-sizes", "4,32", "--optimizers", "sgd",
                 "--variants", "nqm", "--quiet", "-o", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [layer["name"] for layer in data["measured"]["layers"]] == [
        "stem", "block.conv1", "block.bn1", "block.conv2", "head"]
    assert data["measured"]["population"] is None
    assert all(s > 0 for s in data["predictors"]["nqm"]["optimizers"]["sgd"]["steps"])


def test_predict_own_transformer_mc_route(tmp_path, capsys):
    """An own Transformer (attention projections, LayerNorm blocks, a tied head) with its token data:
    the Monte-Carlo route (12 classes x 9 label locations), every entry measured."""
    from pathlib import Path

    lm = str(Path(__file__).parent / "own_models" / "transformer.py")
    x, out = str(tmp_path / "lm.h5"), tmp_path / "lm.predict.json"
    own = ["--model", f"{lm}:build", "--data", f"{lm}:tokens", "--examples", "24", "--quiet"]
    assert main(["factors", *own, "--fisher", "mc", "-o", x]) == 0
    assert main(["predict", x, *own, "--target", "fraction=0.2", "--batch-sizes", "4,16",
                 "--optimizers", "sgd", "--variants", "nqm", "-o", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["measured"]["curvature_route"] == "mc"
    assert "pre_softmax" in [layer["name"] for layer in data["measured"]["layers"]]
    info = data["predictors"]["nqm"]
    assert info["nqm_directions"] + info["null_directions"] == info["directions"]
    assert data["noise_scales"]["b_simple"] > 0
