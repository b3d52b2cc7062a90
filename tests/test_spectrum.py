"""Eigendecomposition engine, Kronecker spectrum and ``curvlab spectrum`` (issue 3, parts 1-3).

References are independent of the code under test: ``numpy.linalg.eigh`` for the decompositions,
materialised products (``np.multiply.outer`` + sort) and numpy's own quantiles for the Kronecker
spectrum, and closed-form integer counts for the 10^9-product case.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from curvlab.analysis import spectrum as sp
from curvlab.analysis.spectrum import (
    KroneckerSpectrum,
    compute_spectrum,
    decompose_checkpoint,
    decompose_factor,
    decompose_factors,
    load_layer_eigenvalues,
    negative_tolerance,
    solver_resolution,
)
from curvlab.analysis.spectrum.engine import _attempts, _clip
from curvlab.commands import main
from curvlab.errors import CheckpointError, OptionError
from curvlab.io.checkpoint import CheckpointReader, IncompleteStepWarning

EPS64 = np.finfo(np.float64).eps


# --------------------------------------------------------------------------------------------------
# Helpers


def psd(n: int, seed: int, rows: int | None = None, dtype=np.float64) -> np.ndarray:
    """A symmetric PSD n x n second moment with distinct eigenvalues (full rank unless rows < n)."""
    x = np.random.default_rng(seed).standard_normal((rows or 3 * n, n)) * np.linspace(1, 3, n)
    m = x.T @ x / x.shape[0]
    return ((m + m.T) / 2).astype(dtype)


def with_spectrum(eigenvalues, seed: int = 0) -> np.ndarray:
    """``Q diag(λ) Q^T`` for a random orthogonal Q: a factor with exactly chosen eigenvalues."""
    n = len(eigenvalues)
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    x = (q * np.asarray(eigenvalues, dtype=np.float64)) @ q.T
    return (x + x.T) / 2


def write_checkpoint(path: Path, layers: dict, step: int = 7) -> None:
    """A factor checkpoint written with plain h5py, as a third-party tool would (docs/format.md)."""
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "curvlab.kfac"
        f.attrs["format_version"] = 1
        g = f.create_group(f"steps/{step}")
        g.attrs["step"] = step
        g.attrs["fisher_type"] = "empirical"
        g.attrs["num_examples"] = 100
        for name, (module_type, weight_shape, has_bias, a, s) in layers.items():
            lg = g.create_group(f"factors/{name}")
            lg.attrs["module_type"] = module_type
            lg.attrs["weight_shape"] = np.array(weight_shape)
            lg.attrs["has_bias"] = has_bias
            lg["A"] = a
            lg["S"] = s
        g.attrs["complete"] = True


def hand_written_layers() -> dict:
    rng = np.random.default_rng(5)
    return {
        "fc": ("Linear", (16, 8), True, psd(9, 1), psd(16, 2)),  # dense x dense
        "embed": ("Embedding", (40, 12), False, rng.random(40) + 0.05, psd(12, 3, dtype=np.float32)),
        "decoder": ("TiedEmbedding", (30, 8), False, psd(8, 4), rng.random(30) + 0.01),  # S diagonal
        "fc2": ("Linear", (9, 16), False, psd(16, 6), psd(9, 7)),  # a second 16 x 16: batched with fc.S
    }


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def materialised(pairs) -> np.ndarray:
    """All products, ascending: the reference the Kronecker spectrum must match exactly."""
    parts = [np.multiply.outer(np.asarray(s, np.float64), np.asarray(a, np.float64)) for s, a in pairs]
    return np.sort(np.concatenate([part.ravel() for part in parts]))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("curvlab: error: ") and "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------------------------------
# The engine


def test_hand_written_checkpoint_matches_numpy(tmp_path):
    """Dense, float32 and diagonal factors of a plain-h5py checkpoint, against numpy.linalg.eigh.

    Tolerances: both are backward-stable LAPACK solvers in float64, so each eigenvalue is within
    ~n * eps * λ_max (n <= 16: ~4e-15 λ_max) of the truth; 1e-12 λ_max leaves a factor ~250. The
    reconstruction Q diag(λ) Q^T has the same error. Eigenvectors: the angle error is
    ~n * eps * λ_max / gap, so |Q^T Q_np| = I to 1e-9 for the relative gaps (>= 1e-3) of these factors.
    """
    ckpt = tmp_path / "hand.h5"
    layers = hand_written_layers()
    write_checkpoint(ckpt, layers)
    out = tmp_path / "hand.spectrum.h5"
    compute_spectrum(ckpt, out, device="cpu")
    with h5py.File(out, "r") as f:
        assert f.attrs["format"] == "curvlab.spectrum" and f.attrs["format_version"] == 1
        for name, (_, _, _, a, s) in layers.items():
            g = f[f"steps/7/layers/{name}"]
            for which, x in (("A", a), ("S", s)):
                vals = g[f"{which}_eigenvalues"][()]
                if x.ndim == 1:
                    order = g[f"{which}_order"][()]
                    assert g.attrs[f"{which}_kind"] == "diagonal"
                    assert f"{which}_eigenvectors" not in g
                    np.testing.assert_array_equal(vals, np.sort(x.astype(np.float64)))
                    np.testing.assert_array_equal(x[order], vals)
                    continue
                x64 = x.astype(np.float64)
                want_vals, want_vecs = np.linalg.eigh(x64)
                scale = want_vals[-1]
                np.testing.assert_allclose(vals, want_vals, rtol=0, atol=1e-12 * scale)
                q = g[f"{which}_eigenvectors"][()]
                np.testing.assert_allclose((q * vals) @ q.T, x64, rtol=0, atol=1e-12 * scale)
                assert np.min(np.diff(want_vals)) > 1e-3 * scale  # distinct: vectors are unique up to sign
                np.testing.assert_allclose(np.abs(q.T @ want_vecs), np.eye(len(vals)), atol=1e-9)
                assert g.attrs[f"{which}_kind"] == "dense" and g.attrs[f"{which}_dtype"] == "float64"


def test_float32_decomposition_matches_numpy_to_float32_accuracy():
    x = psd(24, 11)
    eig = decompose_factor(x, dtype="float32")
    want = np.linalg.eigvalsh(x)
    # float32 backward error: ~n * eps32 * λ_max = 24 * 1.2e-7 ~ 3e-6 λ_max; allow 1e-5.
    np.testing.assert_allclose(eig.eigenvalues, want, rtol=0, atol=1e-5 * want[-1])
    assert eig.dtype == "float32" and eig.eigenvectors.dtype == np.float32


def _count_eigh_calls(monkeypatch) -> list[tuple[int, ...]]:
    calls: list[tuple[int, ...]] = []
    real = torch.linalg.eigh

    def spy(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", spy)
    return calls


def test_batched_equals_unbatched(monkeypatch):
    calls = _count_eigh_calls(monkeypatch)
    factors = [((f"l{k}", "A"), psd(20, k)) for k in range(4)] + [(("l9", "S"), psd(7, 9))]
    batched = dict(decompose_factors(factors, device="cpu"))
    assert sorted(calls) == [(1, 7, 7), (4, 20, 20)]  # the four 20 x 20 factors in one call
    calls.clear()
    alone = dict(decompose_factors(factors, device="cpu", batch_bytes=0))
    assert sorted(calls) == [(1, 7, 7)] + [(1, 20, 20)] * 4
    for key, eig in batched.items():
        # Batched CPU eigh runs the same LAPACK routine per matrix: equal to rounding (1e-13 λ_max).
        scale = eig.eigenvalues[-1]
        np.testing.assert_allclose(eig.eigenvalues, alone[key].eigenvalues, rtol=0, atol=1e-13 * scale)
        np.testing.assert_allclose(eig.reconstruct(), alone[key].reconstruct(), rtol=0, atol=1e-12 * scale)


def test_batch_budget_bounds_what_is_held(monkeypatch):
    """With a budget of one 30 x 30 factor, every dense factor is decomposed before the next one waits."""
    calls = _count_eigh_calls(monkeypatch)
    events = []

    def items():
        for k in range(3):
            events.append(f"read {k}")
            yield (f"l{k}", "A"), psd(30, k)

    for key, _ in decompose_factors(items(), device="cpu", batch_bytes=30 * 30 * 8):
        events.append(f"done {key[0]}")
    assert events == ["read 0", "done l0", "read 1", "done l1", "read 2", "done l2"]
    assert calls == [(1, 30, 30)] * 3


def test_checkpoint_is_read_layer_by_layer(tmp_path, monkeypatch):
    ckpt = tmp_path / "c.h5"
    write_checkpoint(ckpt, hand_written_layers())
    events = []
    real = CheckpointReader.read_factors

    def spy(self, step, layer):
        events.append(f"read {layer}")
        return real(self, step, layer)

    monkeypatch.setattr(CheckpointReader, "read_factors", spy)
    with CheckpointReader(ckpt) as reader:
        names = reader.layer_names(7)
        for layer, which, _ in decompose_checkpoint(reader, 7, names, batch_bytes=0):
            events.append(f"{layer}.{which}")
    # With no batching budget, each layer's factors are done before the next layer is read.
    for this, following in zip(names[:-1], names[1:], strict=True):
        assert max(events.index(f"{this}.A"), events.index(f"{this}.S")) < events.index(f"read {following}")
    assert sorted(e for e in events if not e.startswith("read")) == sorted(
        f"{n}.{w}" for n in names for w in "AS"
    )


def test_diagonal_factor_needs_no_decomposition(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("eigh called for a diagonal factor")

    monkeypatch.setattr(torch.linalg, "eigh", fail)
    monkeypatch.setattr(torch.linalg, "eigvalsh", fail)
    d = np.array([3.0, 0.5, 2.0, 0.5, 0.0, 7.0])
    eig = decompose_factor(d)
    np.testing.assert_array_equal(eig.eigenvalues, [0.0, 0.5, 0.5, 2.0, 3.0, 7.0])
    np.testing.assert_array_equal(eig.order, [4, 1, 3, 2, 0, 5])  # stable among the tied 0.5s
    q = eig.eigenvector_matrix()
    np.testing.assert_array_equal(q.T @ q, np.eye(6))  # a permutation
    np.testing.assert_array_equal(eig.reconstruct(), np.diag(d))


def test_tiny_negatives_clipped_and_unresolved_zeroed():
    n = 8
    tol, res = negative_tolerance("dense", n), solver_resolution(n, "float64")
    assert tol == pytest.approx(n * np.finfo(np.float32).eps) and res == pytest.approx(n * EPS64)
    # The rule itself, on chosen values: -1e-9 is a round-off negative (tol = 9.5e-7), 1e-16 is
    # below the resolution (1.8e-15), 1e-14 is kept.
    vals = np.array([-1e-9, 1e-16, 1e-14, 0.01, 0.1, 0.5, 0.7, 1.0])
    c = _clip(vals, "dense", "float64", path=None, step=None, layer=None, which="A")
    assert (c.num_clipped, c.num_unresolved) == (1, 1)
    np.testing.assert_array_equal(c.vals, [0, 0, 1e-14, 0.01, 0.1, 0.5, 0.7, 1.0])
    # Through the solver: a factor with eigenvalue -1e-9 (the construction adds ~1e-16 of rounding).
    eig = decompose_factor(with_spectrum([-1e-9, 1e-3, 0.01, 0.1, 0.5, 0.6, 0.7, 1.0]))
    assert eig.num_clipped == 1 and eig.eigenvalues[0] == 0.0
    np.testing.assert_allclose(eig.eigenvalues[1:], [1e-3, 0.01, 0.1, 0.5, 0.6, 0.7, 1.0], rtol=1e-10)
    # A rank-3 factor of size 12: its 9 null-space eigenvalues are round-off (~1e-16 of either
    # sign); every one of them becomes an exact 0, counted as clipped or unresolved.
    eig = decompose_factor(psd(12, 0, rows=3))
    assert eig.num_clipped + eig.num_unresolved == 9
    assert (eig.eigenvalues[:9] == 0).all() and (eig.eigenvalues[9:] > 1e-3).all()


def test_clearly_negative_dense_factor_is_an_error():
    # Passes the checkpoint's own checks (|X_ij| <= sqrt(X_ii X_jj)) but has eigenvalue -0.8.
    x = np.array([[1, 0.9, -0.9], [0.9, 1, 0.9], [-0.9, 0.9, 1]])
    with pytest.raises(CheckpointError, match=r"f\.h5: step 3: layer fc: factor S is not positive semi"):
        list(decompose_factors([(("fc", "S"), x)], path="f.h5", step=3))


def test_clearly_negative_diagonal_factor_is_an_error():
    with pytest.raises(CheckpointError, match="factor A is not positive semi-definite"):
        list(decompose_factors([(("emb", "A"), np.array([1.0, -1e-5, 0.3]))]))
    eig = decompose_factor(np.array([1.0, -1e-8, 0.3]))  # within eps32 * max: clipped
    assert eig.num_clipped == 1 and eig.eigenvalues[0] == 0.0


def test_float32_failure_is_retried_in_float64(monkeypatch):
    real = torch.linalg.eigh

    def flaky(x, *args, **kwargs):
        if x.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge (fake)")
        return real(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    factors = [(("a", "A"), psd(10, 1)), (("b", "A"), psd(10, 2))]
    out = dict(decompose_factors(factors, dtype="float32"))
    for key, x in factors:
        eig = out[key]
        assert eig.dtype == "float64" and eig.device == "cpu"
        assert "batched eigh of 2 factors in float32 on cpu failed" in eig.retries[0]
        assert "eigh in float32 on cpu failed (LinAlgError" in eig.retries[1]
        assert eig.retries[1].endswith("retried in float64 on cpu")
        want = np.linalg.eigvalsh(x)
        np.testing.assert_allclose(eig.eigenvalues, want, rtol=0, atol=1e-12 * want[-1])


def test_every_attempt_failing_names_the_factor(monkeypatch):
    def broken(x, *args, **kwargs):
        raise torch.linalg.LinAlgError("failed to converge (fake)")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    match = r"ck\.h5: step 2: layer conv: factor A: the eigendecomposition failed in every attempt"
    with pytest.raises(CheckpointError, match=match):
        list(decompose_factors([(("conv", "A"), psd(5, 0))], dtype="float32", path="ck.h5", step=2))


def test_escalation_plan_goes_to_float64_then_cpu():
    plan = _attempts("float32", torch.device("cuda"))
    want = [("float32", "cuda"), ("float64", "cuda"), ("float64", "cpu")]
    assert [(d, dev.type) for d, dev in plan] == want
    assert [(d, dev.type) for d, dev in _attempts("float64", torch.device("cpu"))] == [("float64", "cpu")]


def test_non_finite_output_is_retried(monkeypatch):
    real = torch.linalg.eigh

    def nan_in_float32(x, *args, **kwargs):
        vals, vecs = real(x, *args, **kwargs)
        return (vals * np.nan, vecs) if x.dtype == torch.float32 else (vals, vecs)

    monkeypatch.setattr(torch.linalg, "eigh", nan_in_float32)
    eig = decompose_factor(psd(6, 0), dtype="float32")
    assert eig.dtype == "float64" and "non-finite" in eig.retries[0]


# --------------------------------------------------------------------------------------------------
# The Kronecker spectrum against materialised products

_special = st.sampled_from([0.0, 0.0, 1.0, 0.5, 2.0, 3.0, 0.1, 1e-3, 7.0, 1e-170, 5e-324, 1e150])
_value = st.one_of(_special, st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False))
_factor = st.lists(_value, min_size=1, max_size=9)
_pairs = st.lists(st.tuples(_factor, _factor), min_size=1, max_size=3)


def _check_against_materialised(pairs, dense_limit: int) -> None:
    k = KroneckerSpectrum(pairs, dense_limit=dense_limit)
    p = materialised(pairs)  # ascending
    n = p.size
    assert k.count == n
    assert k.num_zeros == int((p == 0).sum())  # zero eigenvalues and products that underflow
    assert k.max() == p[-1]
    if (p > 0).any():
        assert k.min_positive() == p[p > 0][0]
        assert k.condition_number() == float(p[-1]) / float(p[p > 0][0])
    want_trace = sum(math.fsum(np.asarray(s, float)) * math.fsum(np.asarray(a, float)) for s, a in pairs)
    assert k.trace == pytest.approx(want_trace, rel=1e-15, abs=0)
    ts = np.concatenate([p, np.nextafter(p, -np.inf), np.nextafter(p, np.inf), [-1.0, 0.0, np.inf]])
    np.testing.assert_array_equal(k.count_above(ts), n - np.searchsorted(p, ts, side="right"))
    np.testing.assert_array_equal(k.values_at_ranks(np.arange(1, n + 1)), p[::-1])
    qs = np.linspace(0, 1, 21)
    np.testing.assert_array_equal(k.quantiles(qs), np.quantile(p, qs, method="inverted_cdf"))
    for j in (1, 2, n, n + 3):
        np.testing.assert_array_equal(k.top(j), p[::-1][:j])
        np.testing.assert_array_equal(k.bottom(j), p[p > 0][:j])
    edges = np.unique(np.concatenate([[0.0], p[:: max(1, n // 5)], [np.nextafter(p[-1], np.inf)]]))
    if edges.size >= 2:
        want = [int(((p >= lo) & (p < hi)).sum()) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
        np.testing.assert_array_equal(k.histogram(edges), want)
    np.testing.assert_array_equal(k.sorted_values(), p[::-1])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_pairs)
def test_kronecker_spectrum_equals_materialised_products(pairs):
    _check_against_materialised(pairs, dense_limit=0)  # the counting algorithm
    _check_against_materialised(pairs, dense_limit=1 << 21)  # the small-spectrum shortcut


def test_kronecker_spectrum_many_ties_and_zeros():
    """Larger than the enumeration limit (2^16 products), with heavy ties and zeros, no shortcut."""
    rng = np.random.default_rng(1)
    s = np.round(rng.random(600) ** 3, 3)  # many ties, some exact zeros
    a = rng.random(500) ** 5
    a[:20], a[20:120] = 0.0, 0.125
    pairs = [(s, a), (rng.random(70), rng.random(90) * 1e-3)]
    k = KroneckerSpectrum(pairs, dense_limit=0)
    p = materialised(pairs)
    ranks = np.concatenate([rng.integers(1, p.size + 1, 200), [1, p.size]])
    np.testing.assert_array_equal(k.values_at_ranks(ranks), p[::-1][ranks - 1])
    qs = rng.random(30)
    np.testing.assert_array_equal(k.quantiles(qs), np.quantile(p, qs, method="inverted_cdf"))
    np.testing.assert_array_equal(k.top(3000), p[::-1][:3000])
    np.testing.assert_array_equal(k.bottom(3000), p[p > 0][:3000])
    assert k.num_zeros == int((p == 0).sum())


def test_kronecker_spectrum_input_checks():
    with pytest.raises(ValueError, match=">= 0"):
        KroneckerSpectrum([(np.array([1.0, -1.0]), np.array([1.0]))])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        KroneckerSpectrum([(np.ones((2, 2)), np.ones(2))])
    with pytest.raises(ValueError, match="overflows"):
        KroneckerSpectrum([(np.array([1e200]), np.array([1e200]))])
    k = KroneckerSpectrum([(np.ones(3), np.ones(4))])
    with pytest.raises(ValueError, match="ranks"):
        k.values_at_ranks([0])
    with pytest.raises(ValueError, match="ranks"):
        k.values_at_ranks([13])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        k.quantiles([1.5])
    with pytest.raises(ValueError, match="max_count"):
        k.sorted_values(max_count=5)
    with pytest.raises(ValueError, match="every product is 0"):
        KroneckerSpectrum([(np.zeros(2), np.ones(2))]).min_positive()


def _table_count_le(n: int, t: int) -> int:
    """#{(i, j) in [1, n]^2 : i * j <= t}, by integer arithmetic (the n x n multiplication table)."""
    i = np.arange(1, n + 1, dtype=np.int64)
    return int(np.minimum(n, t // i).sum())


def test_a_billion_products_fast_and_exact():
    """Two 31623-long factors, 1,000,014,129 products: the multiplication table 1..n x 1..n.

    Every product is an integer below 2^53, so float64 holds them exactly and the count of products
    <= t has the closed form Σ_i min(n, floor(t / i)): an independent check of the order statistics.
    """
    n = 31623
    s = np.arange(1, n + 1, dtype=np.float64)
    a = np.arange(n, 0, -1, dtype=np.float64) * 0.5  # any order; products are (i * j) / 2
    start = time.perf_counter()
    k = KroneckerSpectrum([(s, a)])
    assert k.count == n * n == 1_000_014_129
    assert k.max() == n * n * 0.5
    assert k.trace == float((n * (n + 1) // 2) ** 2) * 0.5  # (Σ λ_S)(Σ λ_A), exact here
    assert k.num_zeros == 0 and k.min_positive() == 0.5
    qs = np.array([0.01, 0.1, 0.5, 0.9, 0.99])
    values = k.quantiles(qs)
    top = k.top(10)
    elapsed = time.perf_counter() - start
    assert elapsed < 10, f"{elapsed:.1f} s"  # ~0.5 s measured on 2 CPU cores
    for q, v in zip(qs, values, strict=True):
        position = math.ceil(q * k.count)  # inverted CDF: the smallest x with #{p <= x} >= q N
        t = int(round(2 * v))  # the table entry i * j
        assert _table_count_le(n, t) >= position > _table_count_le(n, t - 1)
    # Top 10 of the table: n*n, then n*(n-1) twice, n*(n-2) twice, (n-1)^2, ...
    want = sorted([i * j for i in range(n - 5, n + 1) for j in range(n - 5, n + 1)], reverse=True)[:10]
    np.testing.assert_array_equal(top, np.array(want, dtype=np.float64) * 0.5)


def test_vocabulary_sized_layer_against_materialised():
    """A V = 32768 diagonal S times a 512 dense A (16.8M products), against the sorted products."""
    rng = np.random.default_rng(3)
    s = np.sort(rng.random(32768) ** 3)
    a = np.concatenate([np.zeros(12), rng.random(500) ** 4])  # rank-deficient, like a real A
    start = time.perf_counter()
    k = KroneckerSpectrum([(s, a)])
    qs = np.array([0.01, 0.1, 0.5, 0.9, 0.99])
    got_q, got_top, got_bottom = k.quantiles(qs), k.top(10), k.bottom(10)
    edges = np.geomspace(k.min_positive(), np.nextafter(k.max(), np.inf), 9)
    hist = k.histogram(edges)
    assert time.perf_counter() - start < 5
    p = np.multiply.outer(s, a).ravel()  # 134 MB; order statistics by partition, not a full sort
    positions = np.ceil(qs * p.size).astype(np.int64) - 1  # inverted CDF, 0-based ascending
    part = np.partition(p, np.concatenate([positions, np.arange(p.size - 10, p.size)]))
    np.testing.assert_array_equal(got_q, part[positions])
    np.testing.assert_array_equal(got_top, np.sort(part[-10:])[::-1])
    positive = p[p > 0]
    np.testing.assert_array_equal(got_bottom, np.sort(np.partition(positive, np.arange(10))[:10]))
    at_least = np.array([np.count_nonzero(p >= e) for e in edges])
    np.testing.assert_array_equal(hist, at_least[:-1] - at_least[1:])
    assert k.num_zeros == 12 * 32768 and hist.sum() == p.size - k.num_zeros


# --------------------------------------------------------------------------------------------------
# The command line, end to end on real checkpoints


@pytest.fixture(scope="module")
def mlp_checkpoint(tmp_path_factory) -> Path:
    """A real two-step checkpoint from ``curvlab factors`` (mlp on digits)."""
    folder = tmp_path_factory.mktemp("ckpt")
    path = folder / "x.h5"
    common = ["factors", "--model", "mlp", "--model-arg", "widths=16", "--examples", "64", "--quiet"]
    assert main([*common, "--fisher", "exact", "-o", str(path)]) == 0
    later = ["--fisher", "mc", "--seed", "4", "--append", "--as-step", "200"]
    assert main([*common, *later, "-o", str(path)]) == 0
    return path


def test_cli_spectrum_json_plot_and_round_trip(mlp_checkpoint, tmp_path, capsys):
    from matplotlib.image import imread

    before = digest(mlp_checkpoint)
    out, png = tmp_path / "s.h5", tmp_path / "s.png"
    capsys.readouterr()
    args = ["--step", "all", "-o", str(out), "--plot", str(png), "--json"]
    assert main(["spectrum", str(mlp_checkpoint), *args]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert digest(mlp_checkpoint) == before  # the input is never modified
    assert [s["step"] for s in summary["steps"]] == [0, 200]
    image = imread(png)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 400
    for entry in summary["steps"]:
        step, layers = load_layer_eigenvalues(out, step=entry["step"])
        assert step == entry["step"] and [layer["name"] for layer in entry["layers"]] == list(layers)
        p = materialised(list(layers.values()))
        assert entry["num_eigenvalues"] == p.size and entry["num_zeros"] == int((p == 0).sum())
        assert entry["max"] == p[-1] and entry["min"] == p[p > 0][0]
        assert entry["trace"] == pytest.approx(p.sum(), rel=1e-12)
        assert set(entry["quantiles"]) == {"0.01", "0.1", "0.5", "0.9", "0.99"}
        for q, v in entry["quantiles"].items():
            assert v == np.quantile(p, float(q), method="inverted_cdf")
        assert entry["top"] == list(p[::-1][:10])
        for layer in entry["layers"]:
            lp = materialised([layers[layer["name"]]])
            assert layer["num_eigenvalues"] == lp.size and layer["max"] == lp[-1]
            assert layer["min"] == (lp[lp > 0][0] if (lp > 0).any() else None)
        # The file's eigenvalues are the engine's: decomposing the checkpoint again agrees.
        again_step, again = load_layer_eigenvalues(mlp_checkpoint, step=entry["step"], device="cpu")
        for name, (s_vals, a_vals) in layers.items():
            for got, want in ((s_vals, again[name][0]), (a_vals, again[name][1])):
                # eigvalsh (no vectors) vs eigh: different LAPACK paths, both ~n eps λ_max accurate,
                # and eigenvalues near the resolution threshold may be zeroed by one and not the other.
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * want[-1])


def test_cli_spectrum_file_layout(mlp_checkpoint, tmp_path, capsys):
    out = tmp_path / "v.h5"
    assert main(["spectrum", str(mlp_checkpoint), "-o", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "step 200:" in text and "K-FAC eigenvalues" in text and "step 0:" not in text  # latest only
    with h5py.File(out, "r") as f:
        assert f.attrs["source"] == str(mlp_checkpoint.resolve())
        assert bool(f.attrs["has_eigenvectors"]) and f["model"].attrs["name"] == "mlp"
        g = f["steps/200"]
        assert bool(g.attrs["complete"]) and g.attrs["step"] == 200 and g.attrs["fisher_type"] == "mc"
        for name, lg in g["layers"].items():
            assert lg.attrs["module_type"] == "Linear" and len(lg.attrs["weight_shape"]) == 2
            for which in "AS":
                vals = lg[f"{which}_eigenvalues"][()]
                q = lg[f"{which}_eigenvectors"][()]
                assert q.shape == (vals.size, vals.size) and (np.diff(vals) >= 0).all()
                assert json.loads(lg.attrs[f"{which}_retries"]) == []
                assert lg.attrs[f"{which}_num_clipped"] >= 0
            assert name in ("hidden.0", "fc")
    # --no-vectors: eigenvalues only; a glob selects layers.
    out2 = tmp_path / "nv.h5"
    args = ["spectrum", str(mlp_checkpoint), "-o", str(out2), "--no-vectors", "--layers", "fc", "--quiet"]
    assert main(args) == 0
    with h5py.File(out2, "r") as f:
        assert list(f["steps/200/layers"]) == ["fc"]
        assert "A_eigenvectors" not in f["steps/200/layers/fc"] and not f.attrs["has_eigenvectors"]


def test_default_output_is_next_to_the_input(mlp_checkpoint, tmp_path, capsys):
    copy = tmp_path / "run.h5"
    copy.write_bytes(mlp_checkpoint.read_bytes())
    assert main(["spectrum", str(copy), "--quiet", "--no-vectors"]) == 0
    assert (tmp_path / "run.spectrum.h5").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5", "run.spectrum.h5"]  # no temp left
    assert sp.default_output_path("a/b/ckpt") == "a/b/ckpt.spectrum.h5"


def test_hand_written_diagonal_checkpoint_through_the_cli(tmp_path, capsys):
    ckpt = tmp_path / "hand.h5"
    write_checkpoint(ckpt, hand_written_layers())
    assert main(["spectrum", str(ckpt), "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    (entry,) = summary["steps"]
    assert entry["num_eigenvalues"] == 9 * 16 + 40 * 12 + 8 * 30 + 16 * 9
    with h5py.File(tmp_path / "hand.spectrum.h5", "r") as f:
        g = f["steps/7/layers/decoder"]
        assert g.attrs["S_kind"] == "diagonal" and "S_order" in g and "A_eigenvectors" in g


@pytest.mark.parametrize(
    "case",
    [
        "text", "truncated", "missing", "no_step", "bad_step", "no_layer", "negative", "into_input",
        "spectrum_in",
    ],
)
def test_cli_errors_are_one_line(case, mlp_checkpoint, tmp_path, capsys):
    path = tmp_path / "in.h5"
    extra: list[str] = []
    if case == "text":
        path.write_text("not hdf5 at all\n")
    elif case == "truncated":
        data = mlp_checkpoint.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "missing":
        path = tmp_path / "nope.h5"
    else:
        path.write_bytes(mlp_checkpoint.read_bytes())
    if case == "no_step":
        extra = ["--step", "99"]
    elif case == "bad_step":
        extra = ["--step", "last"]
    elif case == "no_layer":
        extra = ["--layers", "conv*"]
    elif case == "negative":
        layers = hand_written_layers()
        x = np.array([[1, 0.9, -0.9], [0.9, 1, 0.9], [-0.9, 0.9, 1]])
        layers["bad"] = ("Linear", (3, 3), False, x, psd(3, 0))
        write_checkpoint(path, layers)
    elif case == "into_input":
        extra = ["-o", str(path)]
    elif case == "spectrum_in":
        assert main(["spectrum", str(mlp_checkpoint), "-o", str(path), "--quiet"]) == 0
    before = digest(path) if path.exists() else None
    capsys.readouterr()
    assert main(["spectrum", str(path), "--quiet", *extra]) == 2
    line = one_line_error(capsys)
    assert str(path) in line or case in ("bad_step",)
    if case == "negative":
        assert "step 7: layer bad: factor A is not positive semi-definite" in line
    if case == "no_step":
        assert "step 99" in line
    if before is not None:
        assert digest(path) == before
    assert not list(tmp_path.glob(".*.tmp-*"))  # no temp file left behind


def test_load_layer_eigenvalues_errors(mlp_checkpoint, tmp_path):
    text = tmp_path / "t.h5"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable HDF5 file"):
        load_layer_eigenvalues(text)
    out = tmp_path / "s.h5"
    compute_spectrum(mlp_checkpoint, out, steps="all", vectors=False, device="cpu")
    with pytest.raises(CheckpointError, match="step 5"):
        load_layer_eigenvalues(out, step=5)
    step, layers = load_layer_eigenvalues(out, step="0", layers=["hid*"])
    assert step == 0 and list(layers) == ["hidden.0"]
    with pytest.raises(OptionError, match="matches no layer"):
        load_layer_eigenvalues(out, step=0, layers=["conv*"])
    with h5py.File(out, "a") as f:  # a step whose writer died: no complete attribute
        del f["steps/200"].attrs["complete"]
    with pytest.warns(IncompleteStepWarning):
        assert load_layer_eigenvalues(out)[0] == 0  # latest complete step
    with pytest.warns(IncompleteStepWarning), pytest.raises(CheckpointError, match="step 200"):
        load_layer_eigenvalues(out, step=200)
    with h5py.File(out, "a") as f:  # damage the file: a negative eigenvalue
        f["steps/0/layers/fc/A_eigenvalues"][0] = -1.0
    match = r"step 0: layer fc: A_eigenvalues must be finite and >= 0"
    with pytest.warns(IncompleteStepWarning), pytest.raises(CheckpointError, match=match):
        load_layer_eigenvalues(out, step=0)


@pytest.mark.slow
def test_done_when_command_line(tmp_path):
    """``curvlab factors ... && curvlab spectrum x.h5 --plot s.png --json`` as separate processes."""
    ckpt, png = tmp_path / "x.h5", tmp_path / "s.png"
    run = subprocess.run(
        [sys.executable, "-m", "curvlab", "factors", "--model", "mlp", "--model-arg", "widths=8",
         "--examples", "32", "--quiet", "-o", str(ckpt)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    run = subprocess.run(
        [sys.executable, "-m", "curvlab", "spectrum", str(ckpt), "--plot", str(png), "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["steps"][0]["num_eigenvalues"] > 0
    assert png.stat().st_size > 10_000 and (tmp_path / "x.spectrum.h5").exists()
