"""K-FAC factor capture for ResNet8 on CIFAR-shaped inputs: curvlab vs curvlinops vs the floor.

Work: the K-FAC factors (MC Fisher, one sampled label per example) of every Conv2d/Linear layer of
``resnet8`` on 2,048 random 3×32×32 inputs in batches of 256, float32 model, on the CPU.

Timed side by side in this process:

* ``gradient_pass``  — one plain forward + backward of the mean cross-entropy over the same data;
* ``covariance_products`` — only the two covariance products ``X^T X`` (unfolded inputs) and
  ``G^T G`` (output gradients) of every layer, on tensors prepared beforehand;
* ``floor`` = gradient_pass + covariance_products: what any hook-based K-FAC must at least do;
* ``curvlab`` — ``curvlab.collect_factors(..., fisher="mc")``;
* ``curvlinops`` — ``KFACLinearOperator(..., fisher_type="mc", kfac_approx="expand")`` computing the
  same factors (``compute_kronecker_factors``).

Before timing, both libraries' empirical-Fisher factors on one batch are compared under the
convention mapping of ``docs/factors.md`` (``A = T · A_cl``, ``S = S_cl / T``).
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from torch import nn

from benchmarks.harness import timeit, write_result
from curvlab.capture.factors import collect_factors
from curvlab.capture.layers import adapter_for
from curvlab.models import build_model

NUM_EXAMPLES = 2048
BATCH_SIZE = 256


def _batches(num_examples: int = NUM_EXAMPLES, batch_size: int = BATCH_SIZE):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(num_examples, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (num_examples,), generator=gen)
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, num_examples, batch_size)]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet8", (3, 32, 32), 10).eval()


def _gradient_pass(model: nn.Module, batches) -> None:
    loss_fn = nn.CrossEntropyLoss()
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()


def _prepared_layer_tensors(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Contiguous ``[B*T, n]`` inputs and ``[B*T, m]`` output gradients of every layer, one batch."""
    tensors = {}
    outputs = {}

    def hook(name, adapter):
        def fn(module, inputs, output):
            a = adapter.inputs(module, inputs[0].detach())
            tensors[name] = [a.reshape(-1, a.shape[-1]).contiguous(), None]
            outputs[name] = (module, adapter, output)

        return fn

    handles = [
        m.register_forward_hook(hook(n, adapter_for(m)))
        for n, m in model.named_modules()
        if adapter_for(m) is not None
    ]
    logits = model(x)
    for h in handles:
        h.remove()
    names = list(outputs)
    grads = torch.autograd.grad(
        nn.functional.cross_entropy(logits, y, reduction="sum"), [outputs[n][2] for n in names]
    )
    for name, grad in zip(names, grads, strict=True):
        module, adapter, _ = outputs[name]
        g = adapter.output_grads(module, grad)
        tensors[name][1] = g.reshape(-1, g.shape[-1]).contiguous()
    return tensors


def _covariance_products(tensors, repeats: int) -> None:
    for _ in range(repeats):
        for a, g in tensors.values():
            a.T @ a
            g.T @ g


def _curvlinops_operator(model: nn.Module, batches, fisher_type: str):
    from curvlinops import KFACLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    return KFACLinearOperator(
        model,
        nn.CrossEntropyLoss(reduction="mean"),
        params,
        batches,
        fisher_type=fisher_type,
        mc_samples=1,
        kfac_approx="expand",
        separate_weight_and_bias=False,
        check_deterministic=False,
        num_data=sum(len(x) for x, _ in batches),
        num_per_example_loss_terms=1,
    )


def _locations(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Number of locations ``T`` of every layer for one input."""
    counts = {}

    def hook(name):
        def fn(module, inputs, output):
            counts[name] = adapter_for(module).inputs(module, inputs[0]).shape[1]

        return fn

    handles = [
        m.register_forward_hook(hook(n)) for n, m in model.named_modules() if adapter_for(m) is not None
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return counts


def check_convention(model: nn.Module, batches) -> float:
    """Largest relative difference between curvlab's and curvlinops' mapped empirical factors."""
    ours = collect_factors(model, batches, fisher="empirical", dtype=torch.float32)
    op = _curvlinops_operator(model, batches, "empirical")
    op.compute_kronecker_factors()
    locations = _locations(model, batches[0][0][:1])
    worst = 0.0
    for name, layer in ours.items():
        t = locations[name]
        theirs_a = op._input_covariances[name].numpy() * t
        theirs_s = op._gradient_covariances[name].numpy() / t
        for mine, theirs in ((layer.A, theirs_a), (layer.S, theirs_s)):
            err = np.abs(mine - theirs).max() / np.abs(theirs).max()
            worst = max(worst, float(err))
    return worst


def run() -> str:
    model = _model()
    batches = _batches()
    try:
        import curvlinops  # noqa: F401

        have_curvlinops = True
    except ImportError:
        have_curvlinops = False
    convention_error = check_convention(model, batches[:1]) if have_curvlinops else None
    if convention_error is not None and convention_error > 1e-4:
        raise SystemExit(f"curvlab and curvlinops disagree on the factors: {convention_error:.2e}")

    tensors = _prepared_layer_tensors(model, *batches[0])
    timings = {
        "gradient_pass": timeit(lambda: _gradient_pass(model, batches)),
        "covariance_products": timeit(lambda: _covariance_products(tensors, len(batches))),
        "curvlab": timeit(lambda: collect_factors(model, batches, fisher="mc")),
    }
    if have_curvlinops:
        timings["curvlinops"] = timeit(
            lambda: _curvlinops_operator(model, batches, "mc").compute_kronecker_factors()
        )
    floor = timings["gradient_pass"]["median_s"] + timings["covariance_products"]["median_s"]
    ratios = {
        "curvlab_over_floor": timings["curvlab"]["median_s"] / floor,
        "curvlab_over_gradient_pass": timings["curvlab"]["median_s"] / timings["gradient_pass"]["median_s"],
    }
    if have_curvlinops:
        ratios["curvlinops_over_curvlab"] = timings["curvlinops"]["median_s"] / timings["curvlab"]["median_s"]
    result = {
        "work": f"resnet8, {NUM_EXAMPLES} inputs 3x32x32, batch {BATCH_SIZE}, float32, MC Fisher (1 sample)",
        "floor_s": floor,
        "timings": timings,
        "ratios": ratios,
        "convention_max_rel_err": convention_error,
    }
    path = write_result("factor_capture", result)
    line = (
        f"factor capture, resnet8 / 2048 CIFAR-shaped / batch 256: curvlab "
        f"{timings['curvlab']['median_s']:.2f} s = {ratios['curvlab_over_floor']:.2f}x the floor "
        f"(gradient pass {timings['gradient_pass']['median_s']:.2f} s + covariance products "
        f"{timings['covariance_products']['median_s']:.2f} s)"
    )
    if have_curvlinops:
        line += (
            f"; curvlinops {timings['curvlinops']['median_s']:.2f} s = "
            f"{ratios['curvlinops_over_curvlab']:.2f}x curvlab (factors agree to {convention_error:.1e})"
        )
    return f"{line}  [{path.name}]"


if __name__ == "__main__":
    print(run())
    sys.exit(0)
