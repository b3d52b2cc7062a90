"""Kronecker-factor capture (K-FAC, seed eqs. 13 and 15) with forward hooks and output gradients.

For a layer in normal form (:mod:`curvlab.layers`) with inputs ``a_nt`` and per-example output
gradients ``g_nt`` at locations ``t = 1..T`` of example ``n = 1..N``:

* input factor  ``A = (1/N) Σ_n Σ_t a_nt a_nt^T``          (bias-augmented ``a`` when the layer has one)
* output factor ``S = (1/N) Σ_n (1/T) Σ_t g_nt g_nt^T``    (averaged over Fisher samples, see below)

so that ``F ≈ S ⊗ A`` for the row-major ``vec`` of the ``(m, n)`` weight matrix. With one location this
is eq. 13; for convolutions it is eq. 15 (sum over locations in ``A``, mean in ``S``); sequence tokens
of a Linear layer are treated like convolution locations. For one example at one location,
``S ⊗ A = vec(G) vec(G)^T`` with ``G = g a^T`` its weight gradient.

The gradients ``g`` come from the Fisher type (:mod:`curvlab.loss`): the true label (``empirical``),
``k`` labels sampled from the model (``mc``, each weighted ``1/k``) or the columns of the square root
of the softmax cross-entropy Hessian (``exact``, one backward pass per class). They are taken with
``torch.autograd.grad`` with respect to the hooked layers' *outputs*, so no parameter gradient and no
per-example gradient is ever formed: the cost is one forward pass plus one backward pass per Fisher
sample, plus the two covariance products per layer.

The sums are accumulated (in float64 by default) and divided by ``N`` at the end, so the result does
not depend on how the data was split into batches. The model is used as it is (call ``model.eval()``
first if it has dropout); examples must not interact within a batch (no batch-norm in train mode).
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from curvlab import layers as layer_math
from curvlab.checkpoint import LayerFactors, Step, append_step, save
from curvlab.errors import OptionError
from curvlab.loss import FISHER_TYPES, logit_gradient_samples


@dataclass
class _LayerState:
    """Running sums of one layer: ``Σ a a^T``, ``Σ (1/T) g g^T`` and the layer's metadata."""

    module: nn.Module
    adapter: layer_math.LayerAdapter
    A_sum: Tensor | None = None
    S_sum: Tensor | None = None
    outputs: list[Tensor] = field(default_factory=list)


def select_layers(
    model: nn.Module, patterns: Sequence[str] | None = None
) -> dict[str, tuple[nn.Module, layer_math.LayerAdapter]]:
    """The model's layers that get Kronecker factors, by module path, filtered by fnmatch globs.

    Unsupported instances of supported types (e.g. grouped convolutions) are skipped with a warning;
    a pattern that matches no supported layer is an error.
    """
    selected = {}
    for name, module in model.named_modules():
        adapter = layer_math.adapter_for(module)
        if adapter is None:
            continue
        if patterns is not None and not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        reason = adapter.supports(module)
        if reason is not None:
            warnings.warn(f"layer {name}: no K-FAC factors for {reason}", stacklevel=2)
            continue
        selected[name] = (module, adapter)
    for pattern in patterns or ():
        if not any(fnmatch.fnmatchcase(name, pattern) for name in selected):
            raise OptionError(f"layer pattern {pattern!r} matches no Linear/Conv2d layer of the model")
    return selected


class FactorAccumulator:
    """Hooks on a model that accumulate the K-FAC factor sums over batches.

    Use as a context manager (the hooks are removed on exit); call :meth:`add_batch` per batch and
    :meth:`factors` at the end. The K-FAC optimizer and the command line use the same object.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        fisher: str = "mc",
        mc_samples: int = 1,
        layers: Sequence[str] | None = None,
        dtype: torch.dtype = torch.float64,
        generator: torch.Generator | None = None,
    ) -> None:
        if fisher not in FISHER_TYPES:
            raise OptionError(f"unknown Fisher type {fisher!r}; choose one of {FISHER_TYPES}")
        if mc_samples < 1:
            raise OptionError(f"mc_samples must be at least 1, got {mc_samples}")
        self.model = model
        self.fisher = fisher
        self.mc_samples = mc_samples
        self.dtype = dtype
        self.generator = generator
        self.num_examples = 0
        self.layers = {
            name: _LayerState(module, adapter)
            for name, (module, adapter) in select_layers(model, layers).items()
        }
        self._handles: list[Any] = []
        self._recording = False

    def __enter__(self) -> FactorAccumulator:
        for state in self.layers.values():
            self._handles.append(state.module.register_forward_hook(self._forward_hook(state)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _forward_hook(self, state: _LayerState):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if not self._recording:
                return
            moment = state.adapter.input_second_moment(module, inputs[0].detach())
            state.A_sum = _add(state.A_sum, moment, self.dtype)
            state.outputs.append(output)

        return hook

    def add_batch(self, inputs: Tensor, labels: Tensor | None) -> Tensor:
        """Forward one batch, accumulate ``A`` and ``S`` of every layer; returns the logits."""
        self._recording = True
        try:
            logits = self.model(inputs)
        finally:
            self._recording = False
        try:
            self._accumulate_output_factors(logits, labels)
        finally:
            for state in self.layers.values():
                state.outputs.clear()
        self.num_examples += inputs.shape[0]
        return logits.detach()

    def _accumulate_output_factors(self, logits: Tensor, labels: Tensor | None) -> None:
        states = [s for s in self.layers.values() if s.outputs]
        outputs = [out for s in states for out in s.outputs]
        if any(not out.requires_grad for out in outputs):
            raise ValueError("a hooked layer's output does not require grad (frozen weights?)")
        samples = list(
            logit_gradient_samples(
                logits,
                labels,
                self.fisher,
                mc_samples=self.mc_samples,
                generator=self.generator,
            )
        )
        for k, (u, weight) in enumerate(samples):
            grads = torch.autograd.grad(
                logits, outputs, grad_outputs=u, retain_graph=k + 1 < len(samples)
            )
            position = 0
            for state in states:
                for _ in state.outputs:
                    g = state.adapter.output_grads(state.module, grads[position])
                    position += 1
                    moment = layer_math.output_second_moment(g)
                    state.S_sum = _add(state.S_sum, moment * weight, self.dtype)

    def factors(self) -> FactorSet:
        """The factors ``A = Σ/N`` and ``S = Σ/N`` of every layer seen, as numpy arrays."""
        if self.num_examples == 0:
            raise OptionError("no examples were seen: the data is empty")
        result = {}
        for name, state in self.layers.items():
            if state.A_sum is None or state.S_sum is None:
                warnings.warn(f"layer {name} was not used in the forward pass: no factors", stacklevel=2)
                continue
            module, adapter = state.module, state.adapter
            result[name] = LayerFactors(
                module_type=adapter.module_type,
                weight_shape=adapter.weight_shape(module),
                has_bias=adapter.has_bias(module),
                A=_symmetric_mean(state.A_sum, self.num_examples),
                S=_symmetric_mean(state.S_sum, self.num_examples),
            )
        attrs = {"mc_samples": self.mc_samples} if self.fisher == "mc" else {}
        return FactorSet(result, fisher_type=self.fisher, num_examples=self.num_examples, attrs=attrs)


def _symmetric_mean(total: Tensor, count: int) -> np.ndarray:
    """``(X + X^T) / (2 count)``: BLAS products ``x^T x`` in float32 are symmetric only to rounding."""
    return ((total + total.T) / (2 * count)).cpu().numpy()


def _add(total: Tensor | None, term: Tensor, dtype: torch.dtype) -> Tensor:
    term = term.to(dtype)
    return term if total is None else total.add_(term)


class FactorSet(Mapping[str, LayerFactors]):
    """The captured factors: a read-only mapping from layer name (module path) to its factors."""

    def __init__(
        self,
        layers: dict[str, LayerFactors],
        *,
        fisher_type: str,
        num_examples: int,
        attrs: dict[str, Any] | None = None,
    ) -> None:
        self._layers = dict(layers)
        self.fisher_type = fisher_type
        self.num_examples = num_examples
        self.attrs = dict(attrs or {})

    def __getitem__(self, name: str) -> LayerFactors:
        return self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def to_step(self, step: int, weights: Mapping[str, np.ndarray] | None = None) -> Step:
        """The checkpoint step holding these factors (and optionally the model weights)."""
        return Step(
            step=step,
            fisher_type=self.fisher_type,
            num_examples=self.num_examples,
            factors=dict(self._layers),
            weights=None if weights is None else dict(weights),
            attrs=dict(self.attrs),
        )


def collect_factors(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    fisher: str = "mc",
    mc_samples: int = 1,
    layers: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    progress: bool = False,
) -> FactorSet:
    """K-FAC factors ``A`` and ``S`` of every Linear/Conv2d layer of ``model`` over ``batches``.

    ``batches`` yields ``(inputs, labels)``; they are moved to the device of the model's parameters.
    ``fisher`` is ``"empirical"``, ``"mc"`` (``mc_samples`` labels per example, sampled with ``seed``)
    or ``"exact"``; ``layers`` are fnmatch globs of module paths (default: all supported layers);
    ``dtype`` is the accumulator precision. Returns a :class:`FactorSet`.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    accumulator = FactorAccumulator(
        model, fisher=fisher, mc_samples=mc_samples, layers=layers, dtype=dtype, generator=generator
    )
    with accumulator:
        for inputs, labels in _progress(batches, progress):
            accumulator.add_batch(inputs.to(device), labels.to(device))
    return accumulator.factors()


def _progress(batches: Iterable, enabled: bool) -> Iterable:
    if not enabled:
        return batches
    from tqdm import tqdm

    total = len(batches) if hasattr(batches, "__len__") else None
    return tqdm(batches, total=total, desc="factors", unit="batch", leave=False)


def model_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's parameters and buffers as numpy arrays, by ``state_dict`` name."""
    return {name: t.detach().cpu().numpy() for name, t in model.state_dict().items()}


def save_factors(
    path: str,
    factors: FactorSet,
    *,
    step: int = 0,
    model: nn.Module | None = None,
    model_name: str | None = None,
    model_config: Mapping[str, Any] | None = None,
    append: bool = False,
) -> None:
    """Write the factors as one complete checkpoint step (with the model's weights if given).

    A new file is written atomically; ``append=True`` adds the step to an existing checkpoint
    crash-safely (:func:`curvlab.checkpoint.append_step`).
    """
    weights = None if model is None else model_weights(model)
    record = factors.to_step(step, weights)
    config = None if model_config is None else dict(model_config)
    if append:
        append_step(path, record, model_name=model_name, model_config=config)
    else:
        save(path, [record], model_name=model_name, model_config=config)
