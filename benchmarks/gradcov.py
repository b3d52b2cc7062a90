"""All-direction KFE gradient statistics: curvlab vs per-example gradients (torch.func, BackPACK).

Work: ``Σ_n c_n`` and ``Σ_n c_n²`` for every Kronecker-factored eigenbasis direction of every layer
(the gradient mean and variance of Fig. 10) over 1,024 examples, float32 model, for

* ``resnet8`` on 3×32×32 inputs (78k parameters) and
* ``mlp`` with two hidden layers of 512 on 784 inputs (670k parameters).

Methods, timed side by side in this process (median of repeats) and, for peak memory, each once more
in a fresh child process (peak RSS above the process's RSS after set-up):

* ``curvlab`` — :func:`curvlab.analysis.gradcov.project_gradients` (projections first; batches of 128);
* ``vmap_grad`` — per-example gradients of the whole batch of 1,024 by ``torch.func.vmap(grad)``, then
  the explicit projection ``Q_S^T G_n Q_A`` per layer;
* ``backpack`` — per-example gradients by BackPACK's ``BatchGrad`` (batch of 1,024), same projection.

All three must give the same sums (checked, relative 1e-4 in float32) before anything is timed. Also
timed: one ``v^T F v`` by forward-mode jvp (:func:`curvlab.analysis.curvature.directional_curvature`) against
one plain gradient pass over the same 1,024 examples.
"""

from __future__ import annotations

import copy
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from benchmarks.harness import reset_peak_rss, rss_mb, timeit, write_result
from curvlab.analysis.curvature import directional_curvature
from curvlab.analysis.gradcov import LayerBasis, project_gradients
from curvlab.capture.factors import collect_factors

NUM_EXAMPLES = 1024
CURVLAB_BATCH = 128
SETTINGS = {
    "resnet8": {"shape": (3, 32, 32), "args": {}},
    "mlp": {"shape": (1, 28, 28), "args": {"widths": [512, 512]}},
}


def _setup(name: str):
    from curvlab.models import build_model

    setting = SETTINGS[name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(NUM_EXAMPLES, *setting["shape"], generator=gen)
    y = torch.randint(0, 10, (NUM_EXAMPLES,), generator=gen)
    torch.manual_seed(0)
    model = build_model(name, setting["shape"], 10, setting["args"]).eval()
    factors = collect_factors(model, [(x[:256], y[:256])], fisher="exact")
    bases = {k: LayerBasis.from_factors(f.S, f.A) for k, f in factors.items()}
    bases32 = {k: b.to(dtype=torch.float32) for k, b in bases.items()}
    return model, x, y, bases, bases32


def _batches(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def run_curvlab(model, x, y, bases, bases32):
    stats = project_gradients(model, _batches(x, y, CURVLAB_BATCH), bases, curvature=None)
    n = len(x)
    return {
        k: (torch.from_numpy(v.mean * n), torch.from_numpy(v.second_moment * n)) for k, v in stats.items()
    }


def _project(grads: dict[str, torch.Tensor], model: nn.Module, bases32) -> dict:
    """Σ c and Σ c² from per-example gradients ``grads[param] (N, ...)``."""
    out = {}
    for layer, basis in bases32.items():
        module = model.get_submodule(layer)
        g = grads[f"{layer}.weight"].flatten(2)
        if module.bias is not None:
            g = torch.cat([g, grads[f"{layer}.bias"].unsqueeze(-1)], dim=2)
        c = basis.Q_S.T @ g @ basis.Q_A
        out[layer] = (c.sum(0).double(), (c * c).sum(0).double())
    return out


def run_vmap_grad(model, x, y, bases, bases32):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        logits = functional_call(model, p, (xi.unsqueeze(0),))
        return F.cross_entropy(logits, yi.unsqueeze(0), reduction="sum")

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return _project(grads, model, bases32)


def run_backpack(model, x, y, bases, bases32):
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad

    extended = extend(copy.deepcopy(model))  # BackPACK's hooks stay on the module: keep them off ours
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))
    extended.zero_grad()
    with backpack(BatchGrad()):
        loss_fn(extended(x), y).backward()
    grads = {k: p.grad_batch for k, p in extended.named_parameters()}
    return _project(grads, model, bases32)


METHODS = {"curvlab": run_curvlab, "vmap_grad": run_vmap_grad, "backpack": run_backpack}


def _gradient_pass(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y, reduction="sum").backward()


def _check_same(reference: dict, other: dict, label: str) -> float:
    worst = 0.0
    for layer, (s, s2) in reference.items():
        o, o2 = other[layer]
        for a, b in ((s, o), (s2, o2)):
            worst = max(worst, float((a - b).abs().max() / a.abs().max()))
    if worst > 1e-3:
        raise SystemExit(f"{label} disagrees with curvlab: max relative difference {worst:.2e}")
    return worst


def _child(model_name: str, method: str) -> None:
    """Run one method once in this fresh process; print its time and its peak RSS above the set-up's.

    The peak is reset after the set-up (``/proc/self/clear_refs``), so it is the method's own peak.
    """
    setup = _setup(model_name)
    base = rss_mb()["rss_mb"]
    reset_peak_rss()
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    METHODS[method](*setup)
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "wall_s": wall,
                "user_s": usage.ru_utime - usage0.ru_utime,
                "sys_s": usage.ru_stime - usage0.ru_stime,
                "peak_rss_above_setup_mb": max(0.0, rss_mb()["peak_mb"] - base),
                "minor_faults": usage.ru_minflt - usage0.ru_minflt,
            }
        )
    )


def _memory(model_name: str, method: str) -> dict:
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.gradcov", "--child", model_name, method],
        capture_output=True, text=True, timeout=600, check=True,
    )
    return json.loads(run.stdout.strip().splitlines()[-1])


def _say(text: str) -> None:
    print(f"[gradcov benchmark] {text}", file=sys.stderr, flush=True)


def bench_model(name: str) -> dict:
    _say(f"{name}: set-up")
    setup = _setup(name)
    model, x, y, bases, _ = setup
    _say(f"{name}: agreement check")
    results = {m: fn(*setup) for m, fn in METHODS.items()}
    agreement = {m: _check_same(results["curvlab"], results[m], m) for m in METHODS if m != "curvlab"}
    del results
    timings = {}
    for method, fn in METHODS.items():
        _say(f"{name}: timing {method}")
        timings[method] = timeit(lambda fn=fn: fn(*setup), repeat=2, warmup=0)
    memory = {}
    for method in METHODS:
        _say(f"{name}: peak memory of {method} (child process)")
        memory[method] = _memory(name, method)
    _say(f"{name}: one vFv vs a gradient pass")
    layer = list(bases)[-2]
    basis = bases[layer]
    direction = [torch.outer(basis.Q_S[:, -1], basis.Q_A[:, -1]).float()]
    batches = _batches(x, y, 256)
    timings["one_vFv_jvp"] = timeit(lambda: directional_curvature(model, layer, direction, batches))
    timings["gradient_pass"] = timeit(lambda: [_gradient_pass(model, bx, by) for bx, by in batches])
    t = {k: v["median_s"] for k, v in timings.items()}
    mem = {k: v["peak_rss_above_setup_mb"] for k, v in memory.items()}
    return {
        "timings": timings,
        "memory_child_runs": memory,
        "max_rel_difference_vs_curvlab": agreement,
        "ratios": {
            "vmap_grad_over_curvlab_time": t["vmap_grad"] / t["curvlab"],
            "backpack_over_curvlab_time": t["backpack"] / t["curvlab"],
            "vmap_grad_over_curvlab_memory": mem["vmap_grad"] / max(mem["curvlab"], 1e-9),
            "backpack_over_curvlab_memory": mem["backpack"] / max(mem["curvlab"], 1e-9),
            "one_vFv_over_gradient_pass": t["one_vFv_jvp"] / t["gradient_pass"],
        },
    }


def run() -> str:
    results = {name: bench_model(name) for name in SETTINGS}
    path = write_result(
        "gradcov",
        {
            "work": f"Σc, Σc² of every KFE direction over {NUM_EXAMPLES} examples, float32 models; "
            f"curvlab in batches of {CURVLAB_BATCH}, per-example baselines on the whole batch",
            "models": results,
        },
    )
    parts = []
    for name, r in results.items():
        q = r["ratios"]
        parts.append(
            f"{name}: vmap(grad) {q['vmap_grad_over_curvlab_time']:.1f}x time / "
            f"{q['vmap_grad_over_curvlab_memory']:.1f}x memory, "
            f"BackPACK {q['backpack_over_curvlab_time']:.1f}x / {q['backpack_over_curvlab_memory']:.1f}x "
            f"of curvlab; one vFv = {q['one_vFv_over_gradient_pass']:.2f}x a gradient pass"
        )
    return "gradcov: " + "; ".join(parts) + f"  [{path.name}]"


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3])
    else:
        print(run())
