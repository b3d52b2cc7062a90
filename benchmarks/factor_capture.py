"""K-FAC factor capture: ResNet8 on CIFAR-shaped inputs (curvlab vs curvlinops vs the floor), and a
Transformer with ``nn.MultiheadAttention`` (curvlab vs the floor).

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

The Transformer (:func:`run_attention`, result ``factor_capture_attention``): token and position
embeddings, 2 pre-LN blocks of ``nn.MultiheadAttention`` (causal mask, d_model 128, 4 heads) and an
MLP, a final LayerNorm and a head tied to the embedding, vocabulary 1,024, sequences of 64 tokens, 256
sequences in batches of 32, float32, MC Fisher, timed interleaved (5 runs each, medians). Its floor is
the same: a plain forward + backward of the
mean cross-entropy (PyTorch's own attention forward), plus the covariance products of every entry —
``X^T X`` and ``G^T G`` of the q/k/v/out projections and Linear layers on tensors prepared beforehand,
``h^T h`` and ``Σ g∘g`` of the tied weight, and the per-channel ``Σ r r^T`` of the LayerNorms.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from torch import nn

from benchmarks.harness import timeit, timeit_interleaved, write_result
from curvlab.capture import layers as layer_math
from curvlab.capture.factors import collect_factors, select_layers
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


# --------------------------------------------------------------------------------------------------
# A Transformer with nn.MultiheadAttention

VOCAB, D_MODEL, HEADS, LAYERS, SEQ = 1024, 128, 4, 2, 64
NUM_SEQUENCES, SEQ_BATCH = 256, 32


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(D_MODEL)
        self.attn = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True)
        self.ln2 = nn.LayerNorm(D_MODEL)
        self.ff1 = nn.Linear(D_MODEL, 4 * D_MODEL)
        self.ff2 = nn.Linear(4 * D_MODEL, D_MODEL)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        mask = torch.triu(torch.ones(h.shape[1], h.shape[1], dtype=torch.bool), diagonal=1)
        x = self.ln1(h)
        h = h + self.attn(x, x, x, attn_mask=mask, need_weights=False, is_causal=True)[0]
        return h + self.ff2(torch.relu(self.ff1(self.ln2(h))))


class AttentionLM(nn.Module):
    """A decoder-only Transformer written with ``nn.MultiheadAttention``, LayerNorm and a tied head."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, D_MODEL)
        self.position = nn.Embedding(SEQ, D_MODEL)
        self.blocks = nn.ModuleList(_Block() for _ in range(LAYERS))
        self.ln = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, VOCAB, bias=False)
        self.head.weight = self.embedding.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embedding(tokens) + self.position(torch.arange(tokens.shape[1]).expand(tokens.shape))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))


def _token_batches():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (NUM_SEQUENCES, SEQ), generator=gen)
    y = torch.randint(0, VOCAB, (NUM_SEQUENCES, SEQ), generator=gen)
    return [(x[i : i + SEQ_BATCH], y[i : i + SEQ_BATCH]) for i in range(0, NUM_SEQUENCES, SEQ_BATCH)]


def _lm_gradient_pass(model: nn.Module, batches) -> None:
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1)).backward()


def _prepared_entry_tensors(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Per entry, the tensors of its covariance products on one batch, prepared (contiguous) beforehand:
    ``[("gram", X)]`` for ``X^T X``, ``[("square", g)]`` for ``Σ g∘g``, ``[("blocks", r)]`` for the
    per-channel ``Σ r r^T``. Every use of every entry is seen through curvlab's own hooks and taps."""
    uses: dict[str, list] = {}
    entries = select_layers(model)
    handles = []
    for name, (source, _) in entries.items():
        def on_use(role, inp, out, name=name):
            uses.setdefault(name, []).append((role, inp, out))

        handles += layer_math.watch(source, on_use, lambda: True)
    logits = model(x)
    for h in handles:
        h.remove()
    order = [(name, role, inp, out) for name, calls in uses.items() for role, inp, out in calls]
    grads = torch.autograd.grad(
        nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1), reduction="sum"),
        [out for *_, out in order],
    )
    prepared: dict[str, list] = {}
    for (name, role, inp, _), grad in zip(order, grads, strict=True):
        source, adapter = entries[name]
        items = prepared.setdefault(name, [])
        if isinstance(source, layer_math.TiedPair):
            flat = inp.reshape(-1, inp.shape[-1]).contiguous() if role == "linear" else None
            g = grad.reshape(-1, grad.shape[-1]).contiguous()
            items += [("gram", flat)] if flat is not None else []
            items += [("square", g)] if role == "linear" else [("gram", g)]
        elif isinstance(adapter, layer_math.NormAdapter):
            r = adapter.terms(source, adapter.inputs(source, inp), adapter.output_grads(source, grad))
            items.append(("blocks", r.contiguous()))
        elif isinstance(adapter, layer_math.EmbeddingAdapter):
            g = adapter.output_grads(source, grad)
            items.append(("gram", g.reshape(-1, g.shape[-1]).contiguous()))
        else:
            a, g = adapter.inputs(source, inp), adapter.output_grads(source, grad)
            items += [("gram", a.reshape(-1, a.shape[-1]).contiguous()),
                      ("gram", g.reshape(-1, g.shape[-1]).contiguous())]
    return prepared


def _entry_products(prepared, repeats: int) -> None:
    for _ in range(repeats):
        for items in prepared.values():
            for kind, t in items:
                if kind == "gram":
                    t.T @ t
                elif kind == "square":
                    (t * t).sum(dim=0)
                else:
                    torch.einsum("nci,ncj->cij", t, t)


def run_attention() -> str:
    torch.manual_seed(0)
    model = AttentionLM().eval()
    batches = _token_batches()
    prepared = _prepared_entry_tensors(model, *batches[0])
    factors = collect_factors(model, batches[:1], fisher="mc")
    load_before = os.getloadavg()[0]
    timings = timeit_interleaved({
        "gradient_pass": lambda: _lm_gradient_pass(model, batches),
        "covariance_products": lambda: _entry_products(prepared, len(batches)),
        "curvlab": lambda: collect_factors(model, batches, fisher="mc"),
    })
    floor = timings["gradient_pass"]["median_s"] + timings["covariance_products"]["median_s"]
    ratio = timings["curvlab"]["median_s"] / floor
    result = {
        "work": f"Transformer with nn.MultiheadAttention (d_model {D_MODEL}, {HEADS} heads, {LAYERS} "
                f"blocks, vocabulary {VOCAB}, tied head), {NUM_SEQUENCES} sequences of {SEQ} tokens, batch "
                f"{SEQ_BATCH}, float32, MC Fisher (1 sample)",
        "entries": {name: f.module_type for name, f in factors.items()},
        "coverage": factors.coverage.record(),
        "notes": "2-core machine shared with other jobs: 1-minute load average "
                 f"{load_before:.1f} before and {os.getloadavg()[0]:.1f} after the timings",
        "floor_s": floor,
        "timings": timings,
        "ratios": {"curvlab_over_floor": ratio,
                   "curvlab_over_gradient_pass": timings["curvlab"]["median_s"]
                   / timings["gradient_pass"]["median_s"]},
    }
    path = write_result("factor_capture_attention", result)
    return (
        f"factor capture, MultiheadAttention Transformer / {NUM_SEQUENCES}x{SEQ} tokens / batch {SEQ_BATCH}: "
        f"curvlab {timings['curvlab']['median_s']:.2f} s = {ratio:.2f}x the floor (gradient pass "
        f"{timings['gradient_pass']['median_s']:.2f} s + covariance products "
        f"{timings['covariance_products']['median_s']:.2f} s), coverage "
        f"{factors.coverage.covered_parameters}/{factors.coverage.total_parameters}  [{path.name}]"
    )


if __name__ == "__main__":
    if sys.argv[1:] == ["attention"]:
        print(run_attention())
    else:
        print(run())
        print(run_attention())
    sys.exit(0)
