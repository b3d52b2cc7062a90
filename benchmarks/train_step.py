"""Time per training step: K-FAC vs SGD with momentum, and the memory of K-FAC's factor state.

Work: ``resnet8`` on 3×32×32 CIFAR-shaped inputs (batch 128) and ``transformer_shallow`` at its small
default size on token sequences (batch 32 × 32 tokens), float32, CPU. Both optimizers run the same
steps on the same batches in this process; K-FAC with its defaults (factors every step, eigenbases
every 10 steps, one MC label per example). The factor state is every running factor plus its
eigendecomposition, counted in bytes.
"""

from __future__ import annotations

import sys

import torch

from benchmarks.harness import timeit, write_result
from curvlab.models import build_model
from curvlab.optim.kfac import KFAC, mean_cross_entropy

STEPS = 10


def _case(name: str):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "resnet8":
        model = build_model("resnet8", (3, 32, 32), 10)
        x = torch.randn(128, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (128,), generator=gen)
    else:
        model = build_model("transformer_shallow", (32,), 2048)
        x = torch.randint(0, 2048, (32, 32), generator=gen)
        y = torch.randint(0, 2048, (32, 32), generator=gen)
    return model, x, y


def _sgd_steps(model, x, y) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        mean_cross_entropy(model(x), y).backward()
        opt.step()


def _kfac_steps(model, x, y) -> KFAC:
    with KFAC(model, lr=0.01, damping=1e-2) as opt:
        for _ in range(STEPS):
            opt.train_step(x, y)
    return opt


def _factor_state_bytes(opt: KFAC) -> int:
    total = 0
    for entry in opt.entries.values():
        for t in (entry.A, entry.S, entry.eA, entry.eS, entry.QA, entry.QS):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def run() -> str:
    results = {}
    for name in ("resnet8", "transformer"):
        model, x, y = _case(name)
        sgd = timeit(lambda model=model, x=x, y=y: _sgd_steps(model, x, y), repeat=3)
        kfac = timeit(lambda model=model, x=x, y=y: _kfac_steps(model, x, y), repeat=3)
        state = _factor_state_bytes(_kfac_steps(model, x, y))
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        results[name] = {
            "sgd_momentum_s_per_step": sgd["median_s"] / STEPS,
            "kfac_s_per_step": kfac["median_s"] / STEPS,
            "kfac_over_sgd_time": kfac["median_s"] / sgd["median_s"],
            "factor_state_mb": state / 2**20,
            "parameters_mb": params / 2**20,
            "factor_state_over_parameters": state / params,
            "timings": {"sgd_momentum": sgd, "kfac": kfac},
        }
    path = write_result(
        "train_step",
        {
            "work": f"{STEPS} steps each; resnet8 batch 128 (3x32x32), "
            "transformer_shallow defaults batch 32x32",
            "models": results,
        },
    )
    parts = [
        f"{n}: K-FAC {r['kfac_s_per_step'] * 1e3:.0f} ms/step = {r['kfac_over_sgd_time']:.1f}x "
        f"SGD+momentum, factor state {r['factor_state_mb']:.1f} MB = "
        f"{r['factor_state_over_parameters']:.1f}x the parameters"
        for n, r in results.items()
    ]
    return "train step: " + "; ".join(parts) + f"  [{path.name}]"


if __name__ == "__main__":
    print(run())
    sys.exit(0)
