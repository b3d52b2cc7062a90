"""Round trips with the peers, checked against the peers' own code (skipped, with the reason, where a
peer is not installed: ``make peers`` installs both, as CI does).

* curvlinops: curvlab factors exported to a ``KFACLinearOperator`` multiply like curvlab's operator
  (curvlinops' own ``@``); factors curvlinops computes itself import to curvlab's (same data, exact
  Fisher); export then import is the identity.
* kronfluence: exported files drive kronfluence's own K-FAC/EKFAC preconditioners exactly like
  curvlab's damped inverses; factors kronfluence's ``Analyzer`` computes itself (empirical Fisher)
  import to curvlab's factors and EKFAC.

Agreement is asked to 1e-6 relative (the issue's bar); in float64 it is ~1e-13.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from curvlab.analysis.operators import EKFACOperator, KFACOperator
from curvlab.capture.factors import collect_factors
from curvlab.errors import OptionError

REL = 1e-6


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5)
    ).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(24, 2, 4, 4, generator=gen, dtype=torch.float64)
    return model.eval(), x, torch.randint(0, 5, (24,), generator=gen)


def _rel(a, b):
    a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    return float((a - b).abs().max() / b.abs().max())


def test_curvlinops_round_trips():
    pytest.importorskip("curvlinops", reason="curvlinops is not installed (make peers)")
    from curvlinops import KFACLinearOperator

    from curvlab.io.peers.curvlinops import from_curvlinops, to_curvlinops

    model, x, y = _model()
    factors = collect_factors(model, [(x, y)], fisher="exact")
    exported = to_curvlinops(factors, model, [(x, y)])
    params = [p for p in model.parameters()]
    gen = torch.Generator().manual_seed(2)
    v = [torch.randn(*p.shape, generator=gen, dtype=torch.float64) for p in params]
    theirs = exported @ v  # curvlinops' own matrix-vector product
    ours = KFACOperator(factors, model=model).matvec(v)
    for a, b in zip(theirs, ours, strict=True):
        assert _rel(a, b) < REL
    back = from_curvlinops(exported, model, x)
    for name in factors:
        assert _rel(back[name].A, factors[name].A) < 1e-12 and _rel(back[name].S, factors[name].S) < 1e-12
    assert back.fisher_type == "exact" and back.num_examples == 24
    # factors computed by curvlinops itself, imported
    own = KFACLinearOperator(
        model,
        nn.CrossEntropyLoss(),
        params,
        [(x[:12], y[:12]), (x[12:], y[12:])],
        fisher_type="type-2",
        separate_weight_and_bias=False,
        check_deterministic=False,
    )
    imported = from_curvlinops(own, model, x)
    for name in factors:
        assert _rel(imported[name].A, factors[name].A) < REL
        assert _rel(imported[name].S, factors[name].S) < REL
    separate = KFACLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False)
    with pytest.raises(OptionError, match="separate_weight_and_bias"):
        from_curvlinops(separate, model, x)


def test_curvlinops_refuses_layers_it_does_not_have():
    pytest.importorskip("curvlinops", reason="curvlinops is not installed (make peers)")
    from curvlab.io.peers.curvlinops import to_curvlinops

    model = nn.Sequential(nn.Embedding(7, 3), nn.Flatten(), nn.Linear(6, 7)).double()
    x, y = torch.randint(0, 7, (5, 2)), torch.randint(0, 7, (5,))
    factors = collect_factors(model, [(x, y)], fisher="exact")
    with pytest.raises(OptionError, match="layer 0: Embedding"):
        to_curvlinops(factors, model, [(x, y)])


def _kronfluence_storage(folder, name):
    from pathlib import Path

    from kronfluence.factor.eigen import load_eigendecomposition, load_lambda_matrices

    eigen = load_eigendecomposition(Path(folder))
    lam = load_lambda_matrices(Path(folder))
    return {key: value[name] for key, value in {**eigen, **lam}.items()}


def test_kronfluence_files_drive_kronfluences_preconditioners(tmp_path):
    pytest.importorskip("kronfluence", reason="kronfluence is not installed (make peers)")
    from kronfluence.arguments import ScoreArguments
    from kronfluence.factor.config import Ekfac, Kfac

    from curvlab.analysis.gradcov import LayerBasis, project_gradients
    from curvlab.io.peers.kronfluence import load_kronfluence, save_kronfluence

    model, x, y = _model()
    factors = collect_factors(model, [(x, y)], fisher="exact")
    kfac = KFACOperator(factors)
    bases = {n: LayerBasis(bs.q, ba.q, bs.values, ba.values) for n, (bs, ba) in kfac.bases().items()}
    stats = project_gradients(model, [(x, y)], bases, curvature="exact")
    ekfac = EKFACOperator.from_kfac(kfac, {n: s.curvature for n, s in stats.items()})
    save_kronfluence(factors, model, x, tmp_path, ekfac=ekfac)
    damping = 0.05
    args = ScoreArguments(damping_factor=damping, precondition_dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    locations = {"0": 16, "3": 1}
    for name, block in kfac.layout.index.items():
        G = torch.randn(4, block.m, block.n, generator=gen, dtype=torch.float64)
        storage = _kronfluence_storage(tmp_path, name)
        Ekfac().prepare(storage, args, torch.device("cpu"))
        theirs = Ekfac().precondition_gradient(G.clone(), storage)
        ours = ekfac.inverse(damping).matvec(
            {
                n: (G if n == name else torch.zeros(4, b.m, b.n, dtype=torch.float64))
                for n, b in kfac.layout.index.items()
            }
        )[name]
        assert _rel(theirs, ours) < REL
        # kronfluence's K-FAC is S ⊗ (A / T): curvlab's operator of those factors
        storage = _kronfluence_storage(tmp_path, name)
        Kfac().prepare(storage, args, torch.device("cpu"))
        theirs = Kfac().precondition_gradient(G.clone(), storage)
        f = factors[name]
        scaled = KFACOperator(
            {name: type(f)(f.module_type, f.weight_shape, f.has_bias, f.A / locations[name], f.S)}
        )
        assert _rel(theirs, scaled.inverse(damping).matvec({name: G})[name]) < REL
    back, back_ekfac = load_kronfluence(tmp_path, model, x, fisher_type="exact")
    for name in factors:
        assert _rel(back[name].A, factors[name].A) < 1e-12 and _rel(back[name].S, factors[name].S) < 1e-12
    assert back.num_examples == 24
    assert _rel(back_ekfac.to_dense(), ekfac.to_dense()) < 1e-10


def test_factors_kronfluence_computes_import(tmp_path):
    pytest.importorskip("kronfluence", reason="kronfluence is not installed (make peers)")
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    from curvlab.analysis.gradcov import LayerBasis, project_gradients
    from curvlab.io.peers.kronfluence import load_kronfluence

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            inputs, labels = batch
            return nn.functional.cross_entropy(model(inputs), labels, reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

    model, x, y = _model()
    ours = collect_factors(model, [(x, y)], fisher="empirical")
    kfac = KFACOperator(ours)
    bases = {n: LayerBasis(bs.q, ba.q, bs.values, ba.values) for n, (bs, ba) in kfac.bases().items()}
    stats = project_gradients(model, [(x, y)], bases, curvature=None)
    mine = EKFACOperator.from_kfac(kfac, {n: s.second_moment for n, s in stats.items()})
    prepared = prepare_model(model, Classification())  # wraps the layers, freezes the parameters
    analyzer = Analyzer(
        "t", prepared, Classification(), cpu=True, disable_tqdm=True, output_dir=str(tmp_path)
    )
    dtype = torch.float64
    args = FactorArguments(
        strategy="ekfac",
        use_empirical_fisher=True,
        activation_covariance_dtype=dtype,
        gradient_covariance_dtype=dtype,
        eigendecomposition_dtype=dtype,
        per_sample_gradient_dtype=dtype,
        lambda_dtype=dtype,
    )
    analyzer.fit_all_factors("f", TensorDataset(x, y), per_device_batch_size=8, factor_args=args)
    folder = next(tmp_path.glob("t/factors_f"))
    plain = nn.Sequential(*[m.original_module if hasattr(m, "original_module") else m for m in prepared])
    factors, ekfac = load_kronfluence(folder, plain, x, fisher_type="empirical")
    for name in ours:
        assert _rel(factors[name].A, ours[name].A) < REL
        assert _rel(factors[name].S, ours[name].S) < REL
    assert _rel(ekfac.to_dense(), mine.to_dense()) < REL
