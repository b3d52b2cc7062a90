"""The EKFAC file: ``curvlab gradcov --ekfac`` writes it, ``spectrum``/``fit`` and ``EKFACOperator.from_file``
read it; the operator equals the one built from the same second moments in memory; hostile files fail
in one line. float64; the two routes are the same numbers (tolerance 1e-12).
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from curvlab.analysis.gradcov_run import bases_from_checkpoint
from curvlab.analysis.operators import EKFACOperator
from curvlab.commands import main
from curvlab.errors import CheckpointError
from curvlab.io.ekfac import read_ekfac


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ekfac")
    ckpt, ek = folder / "x.h5", folder / "x.ekfac.h5"
    args = [
        "factors",
        "--model",
        "transformer_shallow",
        "--model-arg",
        "d_model=8",
        "--model-arg",
        "d_ff=8",
        "--model-arg",
        "heads=2",
        "--model-arg",
        "layers=1",
        "--model-arg",
        "seq_len=4",
        "--model-arg",
        "vocab=16",
        "--examples",
        "12",
        "--quiet",
        "--fisher",
        "mc",
    ]
    assert main([*args, "-o", str(ckpt)]) == 0
    assert (
        main(
            [
                "gradcov",
                str(ckpt),
                "--examples",
                "12",
                "--directions",
                "0",
                "--curvature",
                "exact",
                "--quiet",
                "-o",
                str(folder / "g.h5"),
                "--ekfac",
                str(ek),
            ]
        )
        == 0
    )
    return ckpt, ek, folder / "g.h5"


def test_the_file_holds_the_gradcov_curvature_in_its_basis(files):
    ckpt, ek, gradcov = files
    record = read_ekfac(str(ek))
    assert record.fisher_type == "exact" and record.num_examples == 12
    bases = bases_from_checkpoint(str(ckpt), record.step)
    norms = [n for n, layer in record.layers.items() if layer.module_type == "NormAffine"]
    assert norms  # the LayerNorms' (γ, β): blocks A, eigenvectors (C, 2, 2), columns sorted by A_order
    with h5py.File(gradcov) as g:
        for name, layer in record.layers.items():
            curvature = np.clip(g[f"layers/{name}/curvature"][()], 0, None)
            if name in norms:  # gradcov's columns are in block order c·k + j
                assert layer.A_eigenvectors.shape == (8, 2, 2) and np.all(np.diff(layer.A_eigenvalues) >= 0)
                sorted_a = bases[name].eigenvalues_A.numpy()[layer.A_order]
                np.testing.assert_array_equal(layer.A_eigenvalues, sorted_a)
                curvature = curvature[:, layer.A_order]
            np.testing.assert_array_equal(layer.eigenvalues, curvature)
    tied = [n for n, layer in record.layers.items() if layer.module_type == "TiedEmbedding"]
    assert (
        tied and record.layers[tied[0]].S_order is not None
    )  # a diagonal factor's basis stays a permutation
    op = EKFACOperator.from_file(ek)
    gen = torch.Generator().manual_seed(0)
    for name, basis in bases.items():
        block = op.layout.index[name]
        V = torch.randn(block.m, block.n, generator=gen, dtype=torch.float64)
        lam = torch.as_tensor(record.layers[name].eigenvalues)
        # gradcov's basis as dense matrices, its columns in the file's order
        Q_A = torch.stack([basis.A_column(j) for j in range(block.n)], dim=1)
        if name in norms:
            Q_A = Q_A[:, record.layers[name].A_order]
        expected = basis.Q_S @ ((basis.Q_S.T @ V @ Q_A) * lam) @ Q_A.T
        zeros = {b.name: torch.zeros(b.m, b.n, dtype=torch.float64) for b in op.layout.blocks}
        got = op.matvec({**zeros, name: V})[name]
        assert float((got - expected).abs().max()) <= 1e-12 * float(expected.abs().max())


def test_spectrum_and_fit_read_it(files, capsys, tmp_path):
    _, ek, _ = files
    capsys.readouterr()
    assert main(["spectrum", str(ek), "--json", "--quiet", "--plot", str(tmp_path / "s.png")]) == 0
    summary = json.loads(capsys.readouterr().out)
    record = read_ekfac(str(ek))
    values = np.concatenate([layer.eigenvalues.ravel() for layer in record.layers.values()])
    step = summary["steps"][0]
    assert summary["kind"] == "ekfac" and step["num_eigenvalues"] == values.size
    assert step["max"] == values.max() and step["trace"] == pytest.approx(values.sum(), rel=1e-12)
    assert (tmp_path / "s.png").stat().st_size > 10_000
    assert main(["fit", str(ek), "--json", "--quiet", "--bootstrap", "0"]) == 0
    fit = json.loads(capsys.readouterr().out)
    assert fit["n"] == values.size


def test_hostile_ekfac_files_fail_in_one_line(files, tmp_path, capsys):
    _, ek, _ = files
    bad = tmp_path / "bad.h5"
    bad.write_bytes(ek.read_bytes())
    with h5py.File(bad, "r+") as f:
        layer = next(iter(f["steps"].values()))["layers"]
        name = next(iter(layer))
        del layer[name]["eigenvalues"]
        layer[name]["eigenvalues"] = np.full((3, 3), np.nan)
    with pytest.raises(CheckpointError, match=f"layer {name}: eigenvalues has shape"):
        read_ekfac(str(bad))
    assert main(["fit", str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("curvlab: error:") and "Traceback" not in err


@pytest.mark.parametrize(
    "defect", ["version_1", "order", "blocks_shape", "huge_channels", "blocks_unwritten", "external_basis"]
)
def test_hostile_blocks_entries_fail_in_one_line(files, tmp_path, defect):
    """A NormAffine entry's blocks basis: only in version 2, its order a permutation, its eigenvectors
    ``(C, k, k)`` — each checked before its data is used; declared sizes are checked against the memory
    budget and the stored chunks before anything is read, and nothing outside the file is followed
    (issue 15)."""
    _, ek, _ = files
    bad = tmp_path / "bad.h5"
    bad.write_bytes(ek.read_bytes())
    with h5py.File(bad, "r+") as f:
        layers = next(iter(f["steps"].values()))["layers"]
        name = next(n for n in layers if layers[n].attrs["module_type"] == "NormAffine")
        h = layers[name]
        if defect == "version_1":
            f.attrs["format_version"] = np.int64(1)
            match = f"layer {name}: module_type NormAffine needs format_version 2"
        elif defect == "order":
            order = h["A_order"][()]
            order[0] = order[1]
            h["A_order"][...] = order
            match = f"layer {name}: A_order is not a permutation"
        elif defect == "blocks_shape":
            del h["A_eigenvectors"]
            h["A_eigenvectors"] = np.eye(16)
            match = f"layer {name}: A_eigenvectors has shape \\(16, 16\\)"
        elif defect == "huge_channels":  # 2^40 channels declared, their eigenvalues never written
            h.attrs["weight_shape"] = np.array([1 << 40], dtype=np.int64)
            del h["eigenvalues"]
            h.create_dataset("eigenvalues", shape=(1, 1 << 41), dtype="f8", chunks=(1, 1 << 16))
            match = f"layer {name}: eigenvalues \\(1x2199023255552 float64\\) would take 17.6 TB"
        elif defect == "blocks_unwritten":
            shape = h["A_eigenvectors"].shape
            del h["A_eigenvectors"]
            h.create_dataset("A_eigenvectors", shape=shape, dtype="f8", chunks=(1, *shape[1:]))
            match = f"layer {name}: A_eigenvectors was never fully written \\(0 of its {shape[0]} chunks"
        else:
            with h5py.File(tmp_path / "other.h5", "w") as other:
                other["v"] = h["A_eigenvectors"][()]
            del h["A_eigenvectors"]
            h["A_eigenvectors"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "/v")
            match = f"layer {name}: A_eigenvectors is an external link"
    with pytest.raises(CheckpointError, match=match) as err:
        read_ekfac(str(bad))
    assert "\n" not in str(err.value)
