"""K-FAC operator products and damped inverses vs curvlinops; Lanczos cost in GGN-vector products.

* **One K-FAC product and one damped-inverse application** on ResNet8 (CIFAR-shaped, float32): curvlab's
  :class:`~curvlab.analysis.operators.KFACOperator` (parameter-list input, as curvlinops takes it) against
  curvlinops' ``KFACLinearOperator`` and ``KFACInverseLinearOperator(use_exact_damping=True)`` holding
  the *same* factors (exported with :func:`curvlab.io.peers.curvlinops.to_curvlinops`, so the outputs
  are compared before anything is timed). curvlinops' inverse decomposes its factors on its first
  application; both are timed after a warm-up, i.e. per application with the decomposition cached.
* **Lanczos cost**: the top-10 eigenvalues of the exact GGN of a small ResNet8 on digits by curvlab's
  Lanczos (full reorthogonalisation, residual ``<= 1e-6 λ_max``) and by curvlinops' GGN through scipy's
  ``eigsh`` (ARPACK, ``tol=1e-6``), in GGN-vector products per eigenvalue and in time, with the
  eigenvalues compared.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn

from benchmarks.harness import timeit, write_result


def _resnet8(widths=None, shape=(3, 32, 32), classes=10):
    from curvlab.models import build_model, parse_model_args

    torch.manual_seed(0)
    args = parse_model_args([f"widths={widths}"]) if widths else None
    return build_model("resnet8", shape, classes, args).eval()


def products() -> dict:
    from curvlinops import KFACInverseLinearOperator

    from curvlab.analysis.operators import KFACOperator
    from curvlab.capture.factors import collect_factors
    from curvlab.io.peers.curvlinops import to_curvlinops

    model = _resnet8()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (256,), generator=gen)
    factors = collect_factors(model, [(x[:128], y[:128]), (x[128:], y[128:])], fisher="mc")
    ours = KFACOperator(factors, model=model, dtype=torch.float32)
    theirs = to_curvlinops(factors, model, [(x[:8], y[:8])])
    params = ours.layout.parameters()
    v = [torch.randn(*p.shape, generator=gen) for p in params]
    damping = 1e-3
    inv_ours = ours.inverse(damping)
    inv_theirs = KFACInverseLinearOperator(theirs, damping=damping, use_exact_damping=True)
    agree = {}  # in float64, where the damped inverse (condition ~ λ_max / 1e-3) is resolved
    model64 = copy.deepcopy(model).double()
    ours64 = KFACOperator(factors, model=model64)
    theirs64 = to_curvlinops(factors, model64, [(x[:8].double(), y[:8])])
    inv64 = KFACInverseLinearOperator(theirs64, damping=damping, use_exact_damping=True)
    v64 = [t.double() for t in v]
    for label, a, b in (
        ("product", ours64.matvec(v64), theirs64 @ v64),
        ("inverse", ours64.inverse(damping).matvec(v64), inv64 @ v64),
    ):
        agree[label] = max(float((p - q).abs().max() / q.abs().max()) for p, q in zip(a, b, strict=True))
    timings = {
        "curvlab_product": timeit(lambda: ours.matvec(v), repeat=5),
        "curvlinops_product": timeit(lambda: theirs @ v, repeat=5),
        "curvlab_inverse": timeit(lambda: inv_ours.matvec(v), repeat=5),
        "curvlinops_inverse": timeit(lambda: inv_theirs @ v, repeat=5),
    }
    m = {k: t["median_s"] for k, t in timings.items()}
    return {
        "dimension": ours.layout.dim,
        "dtype": "float32",
        "max_rel_diff_float64": agree,
        "timings": timings,
        "ratios": {
            "curvlinops_over_curvlab_product": m["curvlinops_product"] / m["curvlab_product"],
            "curvlinops_over_curvlab_inverse": m["curvlinops_inverse"] / m["curvlab_inverse"],
        },
    }


def lanczos_cost(k: int = 10) -> dict:
    from curvlinops import GGNLinearOperator
    from scipy.sparse.linalg import LinearOperator, eigsh

    from curvlab.analysis.ggn import GGNOperator
    from curvlab.analysis.lanczos import extreme_eigenpairs
    from curvlab.io.data import iterate_batches, load_dataset

    data = load_dataset("digits", split="train", limit=256)
    model = _resnet8("8,8,16", data.input_shape, data.num_classes).double()
    batches = [(xb.double(), yb) for xb, yb in iterate_batches(data, 128)]
    ggn = GGNOperator(model, batches)
    start = time.perf_counter()
    ours = extreme_eigenpairs(ggn, k, tol=1e-6)
    ours_s = time.perf_counter() - start
    # curvlinops' GGN of the summed loss over the same parameters, divided by N: curvlab's normalisation
    params = ggn.layout.parameters()
    cl = GGNLinearOperator(
        model, nn.CrossEntropyLoss(reduction="sum"), params, batches, check_deterministic=False
    )
    scipy_op = cl.to_scipy()
    count = {"n": 0}

    def matvec(x):
        count["n"] += 1
        return scipy_op @ x / ggn.num_examples

    op = LinearOperator(scipy_op.shape, matvec=matvec, dtype=np.float64)
    start = time.perf_counter()
    theirs = np.sort(eigsh(op, k=k, which="LA", tol=1e-6, return_eigenvectors=False))[::-1]
    theirs_s = time.perf_counter() - start
    return {
        "model": "resnet8 widths 8,8,16 on 256 digits images (float64)",
        "dimension": ggn.layout.dim,
        "k": k,
        "curvlab": {
            "matvecs": ours.matvecs,
            "matvecs_per_eigenvalue": ours.matvecs / k,
            "seconds": ours_s,
            "converged": bool(ours.converged),
        },
        "curvlinops_scipy_eigsh": {
            "matvecs": count["n"],
            "matvecs_per_eigenvalue": count["n"] / k,
            "seconds": theirs_s,
        },
        "max_rel_diff_eigenvalues": float(np.max(np.abs(ours.values - theirs) / theirs)),
        "ratios": {
            "eigsh_over_curvlab_matvecs": count["n"] / ours.matvecs,
            "eigsh_over_curvlab_time": theirs_s / ours_s,
        },
    }


def run() -> str:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = {
        "products": products(),
        "lanczos": lanczos_cost(),
        "notes": "2-core CPU shared with other jobs while this ran: ratios are what to read",
    }
    write_result("operators", result)
    return summary(result)


def summary(d: dict) -> str:
    p, q = d["products"], d["lanczos"]
    return (
        f"operators: K-FAC product curvlinops {p['ratios']['curvlinops_over_curvlab_product']:.2f}× curvlab, "
        f"damped inverse {p['ratios']['curvlinops_over_curvlab_inverse']:.2f}×; Lanczos "
        f"{q['curvlab']['matvecs_per_eigenvalue']:.1f} "
        f"GGN products per eigenvalue (eigsh {q['curvlinops_scipy_eigsh']['matvecs_per_eigenvalue']:.1f})"
    )


if __name__ == "__main__":
    print(run())
