"""``curvlab fit`` end to end: on a checkpoint made by ``curvlab factors``, on a spectrum file, on a
checkpoint written by hand with known eigenvalues, and on bad inputs (one line, exit 2)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from curvlab.analysis.powerlaw import fit_rank_law, kronecker_floor
from curvlab.commands import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fit") / "x.h5"
    args = ["factors", "--model", "mlp", "--model-arg", "widths=32", "--examples", "128"]
    assert main([*args, "--fisher", "exact", "--quiet", "-o", str(out)]) == 0
    return out


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def with_spectrum(eigenvalues, seed: int) -> np.ndarray:
    """``Q diag(λ) Q^T`` for a random orthogonal Q: a factor with exactly chosen eigenvalues."""
    n = len(eigenvalues)
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    x = (q * np.asarray(eigenvalues, dtype=np.float64)) @ q.T
    return (x + x.T) / 2


def write_checkpoint(path: Path, layers: dict, step: int = 3) -> None:
    """A factor checkpoint written with plain h5py (docs/format.md), no curvlab writer involved."""
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "curvlab.kfac"
        f.attrs["format_version"] = 1
        g = f.create_group(f"steps/{step}")
        g.attrs["step"] = step
        g.attrs["fisher_type"] = "empirical"
        g.attrs["num_examples"] = 100
        for name, (weight_shape, has_bias, a, s) in layers.items():
            lg = g.create_group(f"factors/{name}")
            lg.attrs["module_type"] = "Linear"
            lg.attrs["weight_shape"] = np.array(weight_shape)
            lg.attrs["has_bias"] = has_bias
            lg["A"] = a
            lg["S"] = s
        g.attrs["complete"] = True


def test_fit_json_plot_and_per_factor(ckpt, tmp_path, capsys):
    before = _digest(ckpt)
    plot = tmp_path / "fig12.png"
    argv = ["fit", str(ckpt), "--json", "--per-factor", "--plot", str(plot), "--bootstrap", "200"]
    assert main([*argv, "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("exponent", "ci_low", "ci_high", "window", "ks", "exponent_ols", "bootstrap_low",
                "bootstrap_high", "models", "preferred_model", "factors", "step", "plot"):
        assert key in out, key
    assert out["ci_low"] < out["exponent"] < out["ci_high"]
    assert out["bootstrap_low"] < out["bootstrap_high"]
    k_lo, k_hi = out["window"]
    assert 1 <= k_lo < k_hi <= out["n_fit"] <= out["n"]
    assert out["n"] == 65 * 32 + 33 * 10 and out["step"] == 0 and out["num_layers"] == 2
    assert [(f["layer"], f["factor"]) for f in out["factors"]] == [
        ("hidden.0", "A"), ("hidden.0", "S"), ("fc", "A"), ("fc", "S")
    ]
    assert "error" in out["factors"][3]  # S of the 10-class output layer: 10 eigenvalues, too few
    assert all("exponent" in f for f in out["factors"][:3])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    assert _digest(ckpt) == before  # the input is never modified


def test_fit_human_summary_and_fixed_window(ckpt, capsys):
    assert main(["fit", str(ckpt), "--window", "2:60", "--bootstrap", "0", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "exponent s =" in text and "window ranks 2..60" in text and "given" in text
    assert "bootstrap" not in text.splitlines()[1]
    assert main(["fit", str(ckpt), "--window", "3:", "--json", "--bootstrap", "0", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["window"][0] == 3 and out["window_auto"] is True


def test_fit_reads_a_spectrum_file_the_same(ckpt, tmp_path, capsys):
    spec = tmp_path / "x.spectrum.h5"
    assert main(["spectrum", str(ckpt), "-o", str(spec), "--no-vectors", "--quiet", "--json"]) == 0
    capsys.readouterr()
    results = []
    for source in (ckpt, spec):
        assert main(["fit", str(source), "--json", "--bootstrap", "100", "--quiet"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    a, b = results
    assert a["window"] == b["window"] and a["n"] == b["n"]
    assert a["exponent"] == pytest.approx(b["exponent"], rel=1e-9)


def test_hand_written_checkpoint_matches_the_known_products(tmp_path, capsys):
    """Factors with eigenvalues 1/i (A, 60 x 60) and 1/j^0.5 (S, 40 x 40): the fit of the checkpoint
    must equal the fit of the known products (independent of eigh up to its ~1e-15 relative error,
    so 1e-8 leaves room for the spacings' sensitivity to it)."""
    la, ls = 1.0 / np.arange(1, 61), np.arange(1, 41) ** -0.5
    path = tmp_path / "hand.h5"
    write_checkpoint(path, {"fc": ((40, 59), True, with_spectrum(la, 1), with_spectrum(ls, 2))})
    assert main(["fit", str(path), "--json", "--bootstrap", "0", "--device", "cpu", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    ref = fit_rank_law(np.outer(ls, la).ravel(), bootstrap=0, floor=kronecker_floor([(ls, la)]))
    assert out["step"] == 3 and out["n"] == 2400
    assert out["window"] == list(ref.window)
    assert out["exponent"] == pytest.approx(ref.exponent, rel=1e-8)
    assert out["exponent_ols"] == pytest.approx(ref.exponent_ols, rel=1e-8)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--step", "9"], "step 9"),
        (["--step", "x"], "--step x"),
        (["--window", "0:50"], "window start 0 is out of range"),
        (["--window", "5:100000"], "window end 100000 is out of range"),
        (["--window", "a:b"], "--window"),
        (["--layers", "nope*"], "nope"),
        (["--bootstrap", "-1"], "--bootstrap"),
        (["--confidence", "1.5"], "--confidence"),
    ],
)
def test_bad_options_give_one_line_and_exit_2(ckpt, capsys, argv, message):
    assert main(["fit", str(ckpt), "--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("curvlab: error:") and "\n" not in err and message in err
    assert "Traceback" not in err


def test_bad_files_give_one_line_and_exit_2(tmp_path, capsys):
    text = tmp_path / "not.h5"
    text.write_text("hello")
    zero = tmp_path / "zero.h5"
    write_checkpoint(zero, {"fc": ((4, 3), False, np.zeros((3, 3)), np.zeros((4, 4)))})
    tiny = tmp_path / "tiny.h5"
    write_checkpoint(tiny, {"fc": ((2, 3), False, np.eye(3), np.eye(2))})
    cases = [
        (tmp_path / "missing.h5", "missing.h5"),
        (text, "not.h5"),
        (zero, "no positive eigenvalue"),
        (tiny, "only 6 eigenvalues"),
    ]
    for path, message in cases:
        assert main(["fit", str(path), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("curvlab: error:") and "\n" not in err and message in err, err
    plot_into_folder_that_is_missing = tmp_path / "nope" / "p.png"
    assert main(["fit", str(tiny), "--plot", str(plot_into_folder_that_is_missing), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
