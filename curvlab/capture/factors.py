"""Kronecker-factor capture (K-FAC, seed eqs. 13 and 15) with forward hooks and output gradients.

For a layer in normal form (:mod:`curvlab.capture.layers`) with inputs ``a_nt`` and per-example output
gradients ``g_nt`` at locations ``t = 1..T`` of example ``n = 1..N``:

* input factor  ``A = (1/N) Σ_n Σ_t a_nt a_nt^T``          (bias-augmented ``a`` when the layer has one)
* output factor ``S = (1/N) Σ_n (1/T) Σ_t g_nt g_nt^T``    (averaged over Fisher samples, see below)

so that ``F ≈ S ⊗ A`` for the row-major ``vec`` of the ``(m, n)`` weight matrix. With one location this
is eq. 13; for convolutions it is eq. 15 (sum over locations in ``A``, mean in ``S``); sequence tokens
of a Linear layer are treated like convolution locations. For one example at one location,
``S ⊗ A = vec(G) vec(G)^T`` with ``G = g a^T`` its weight gradient. An ``nn.Embedding`` is the layer
``s = E^T onehot``: its ``A`` is diagonal (token counts / N). A weight shared by an Embedding and the
pre-softmax Linear (eq. 16) is one ``TiedEmbedding`` entry whose V-side ``S`` (diagonal) and d-side
``A`` pool the rank-one terms of both uses (docs/factors.md, "Tied embedding").

The gradients ``g`` come from the Fisher type of the task's loss (:mod:`curvlab.capture.loss`: softmax
cross-entropy by default, squared error, binary cross-entropy): the true label (``empirical``), ``k``
labels sampled from the model (``mc``, each weighted ``1/k``) or the columns of the square root of the
loss Hessian (``exact``, one backward pass per column). How a batch goes into the model and where its
logits are is the :class:`~curvlab.capture.task.Task`'s to say. They are taken with
``torch.autograd.grad`` with respect to the hooked layers' *outputs*, so no parameter gradient and no
per-example gradient is ever formed: the cost is one forward pass plus one backward pass per Fisher
sample, plus the two covariance products per layer.

The sums are accumulated (in float64 by default) and divided by ``N`` at the end, so the result does
not depend on how the data was split into batches. ``N`` counts the examples with at least one counted
label: an example whose labels all equal the loss's ``ignore_index`` adds nothing to ``S`` (its logit
gradients are 0), and its inputs are left out of ``A`` too (the forward hooks select the batch rows of
the examples that count). The model is used as it is (call ``model.eval()``
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

from curvlab import distributed
from curvlab.capture import layers as layer_math
from curvlab.capture.loss import FISHER_TYPES, logit_gradient_samples
from curvlab.capture.task import Task, batch_context, default_task
from curvlab.errors import OptionError
from curvlab.io.checkpoint import LayerFactors, Step, append_step, expected_factor_sizes, save
from curvlab.limits import check_size

FactorSource = nn.Module | layer_math.TiedPair


@dataclass
class _LayerState:
    """Running sums of one layer: ``Σ a a^T`` (or its diagonal), ``Σ (1/T) g g^T`` and the layer."""

    module: nn.Module
    adapter: layer_math.LayerAdapter
    A_sum: Tensor | None = None
    S_sum: Tensor | None = None
    outputs: list[tuple[str, Tensor]] = field(default_factory=list)

    def targets(self) -> list[tuple[nn.Module, str]]:
        """The modules to hook, each with its role in this entry."""
        return [(self.module, "layer")]

    def on_forward(self, role: str, module: nn.Module, x: Tensor, output: Tensor, dtype: torch.dtype) -> None:
        self.A_sum = _add(self.A_sum, self.adapter.input_second_moment(module, x), dtype)
        self.outputs.append((role, output))

    def on_output_grad(self, role: str, grad: Tensor, weight: float, dtype: torch.dtype) -> None:
        g = self.adapter.output_grads(self.module, grad)
        self.S_sum = _add(self.S_sum, layer_math.output_second_moment(g) * weight, dtype)

    def end_batch(self) -> None:
        self.outputs.clear()


@dataclass
class _TiedState:
    """Running sums of a tied embedding / pre-softmax weight (seed eq. 16, docs/factors.md).

    ``A_sum`` is ``Σ_n Σ_k u u^T`` over the terms ``k`` of both sources. ``S`` needs each example's
    V-side sum divided by its number of terms ``P`` (tokens of the Linear plus tokens of the
    Embedding), which is known only once the whole forward pass is seen: the batch's V-side sum is
    kept in ``batch_S`` and ``P`` in ``batch_terms`` until :meth:`end_batch` (every example of a batch
    has the same ``P``).
    """

    module: layer_math.TiedPair
    adapter: layer_math.TiedEmbeddingAdapter
    A_sum: Tensor | None = None
    S_sum: Tensor | None = None
    outputs: list[tuple[str, Tensor]] = field(default_factory=list)
    batch_S: Tensor | None = None
    batch_terms: int = 0

    def targets(self) -> list[tuple[nn.Module, str]]:
        return [(self.module.linear, "linear"), (self.module.embedding, "embedding")]

    def on_forward(self, role: str, module: nn.Module, x: Tensor, output: Tensor, dtype: torch.dtype) -> None:
        if role == "linear":
            moment, terms = self.adapter.linear_input_moment(self.module, x)
            self.A_sum = _add(self.A_sum, moment, dtype)
        else:
            counts, terms = self.adapter.embedding_input_moment(self.module, x)
            self.batch_S = _add(self.batch_S, counts, dtype)
        self.batch_terms += terms
        self.outputs.append((role, output))

    def on_output_grad(self, role: str, grad: Tensor, weight: float, dtype: torch.dtype) -> None:
        if role == "linear":
            moment = self.adapter.linear_output_moment(self.module, grad)
            self.batch_S = _add(self.batch_S, moment * weight, dtype)
        else:
            moment = self.adapter.embedding_output_moment(self.module, grad)
            self.A_sum = _add(self.A_sum, moment * weight, dtype)

    def end_batch(self) -> None:
        if self.batch_terms and self.batch_S is not None:
            self.S_sum = _add(self.S_sum, self.batch_S / self.batch_terms, self.batch_S.dtype)
        self.batch_S = None
        self.batch_terms = 0
        self.outputs.clear()


_State = _LayerState | _TiedState


def _own_weight(module: nn.Module) -> Tensor | None:
    """The module's own ``weight`` Parameter (``None`` when it is computed, e.g. by a parametrization)."""
    return dict(module.named_parameters(recurse=False)).get("weight")


def _tie(group: list[tuple[str, nn.Module]]) -> tuple[str, str] | None:
    """``(linear path, embedding path)`` if the modules sharing a weight are one Embedding and one Linear."""
    linears = [name for name, m in group if isinstance(m, nn.Linear)]
    embeddings = [name for name, m in group if isinstance(m, nn.Embedding)]
    if len(group) == 2 and len(linears) == 1 and len(embeddings) == 1:
        return linears[0], embeddings[0]
    return None


def select_layers(
    model: nn.Module, patterns: Sequence[str] | None = None
) -> dict[str, tuple[FactorSource, layer_math.LayerAdapter | layer_math.TiedEmbeddingAdapter]]:
    """The model's layers that get Kronecker factors, by module path, filtered by fnmatch globs.

    Linear, Conv2d and Embedding layers each get an entry. A weight shared by an ``nn.Embedding`` and an
    ``nn.Linear`` (the pre-softmax layer of a language model with tied weights, seed eq. 16) gets ONE
    entry, a :class:`~curvlab.capture.layers.TiedPair` with the
    :class:`~curvlab.capture.layers.TiedEmbeddingAdapter`, named after the Linear's module path and
    placed where the Linear is; a glob selects it if it matches either module's path. Layers sharing a
    weight in any other way are skipped with a warning, as are unsupported instances of supported types
    (e.g. grouped convolutions); a pattern that matches no supported layer is an error.
    """
    candidates = []
    users: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        adapter = layer_math.adapter_for(module)
        if adapter is None:
            continue
        candidates.append((name, module, adapter))
        weight = _own_weight(module)
        if weight is not None:
            users.setdefault(id(weight), []).append((name, module))
    modules = dict(model.named_modules())
    selected: dict = {}
    matched_names: dict[str, list[str]] = {}
    warned: set[int] = set()
    for name, module, adapter in candidates:
        weight = _own_weight(module)
        group = users.get(id(weight), []) if weight is not None else []
        names = [name]
        source: FactorSource = module
        if len(group) > 1:
            tie = _tie(group)
            if tie is None or tie[0] != name:
                if tie is None and id(weight) not in warned:
                    warned.add(id(weight))
                    shared = ", ".join(n for n, _ in group)
                    warnings.warn(f"layers {shared} share one weight: no K-FAC factors (only an "
                                  "Embedding tied to a pre-softmax Linear is supported)", stacklevel=2)
                continue
            names = list(tie)
            source = layer_math.TiedPair(linear=modules[tie[0]], embedding=modules[tie[1]])
            adapter = layer_math.TiedEmbeddingAdapter()
        if patterns is not None and not any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns):
            continue
        reason = adapter.supports(source)
        if reason is not None:
            warnings.warn(f"layer {name}: no K-FAC factors for {reason}", stacklevel=2)
            continue
        selected[name] = (source, adapter)
        matched_names[name] = names
    for pattern in patterns or ():
        if not any(fnmatch.fnmatchcase(n, pattern) for names in matched_names.values() for n in names):
            raise OptionError(
                f"layer pattern {pattern!r} matches no Linear/Conv2d/Embedding layer of the model"
            )
    return selected


def check_factor_memory(selected: Mapping[str, tuple[FactorSource, Any]], dtype: torch.dtype) -> None:
    """Refuse, before any batch, factors whose sums would not fit the memory budget (one line naming
    the largest layer): a 3e6-wide input makes a Linear's ``A`` 3e6 x 3e6 (72 TB in float64)."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    sizes = {}
    for name, (source, adapter) in selected.items():
        shape, bias = adapter.weight_shape(source), adapter.has_bias(source)
        n, m = expected_factor_sizes(adapter.module_type, shape, bias)
        dense_a = adapter.input_kind == "dense"
        dense_s = getattr(adapter, "output_kind", "dense") == "dense"
        sizes[name] = ((n * n if dense_a else n) + (m * m if dense_s else m)) * itemsize, n, m
    if not sizes:
        return
    largest = max(sizes, key=lambda k: sizes[k][0])
    _, n, m = sizes[largest]
    check_size(
        f"the K-FAC factors of {len(sizes)} layers (largest: {largest}, A {n}x{n}, S {m}x{m})",
        sum(v[0] for v in sizes.values()),
        OptionError,
    )


class FactorAccumulator:
    """Hooks on a model that accumulate the K-FAC factor sums over batches.

    Use as a context manager (the hooks are removed on exit). One batch is either
    :meth:`add_batch` (forward, then the output factors), or the two halves separately — as the
    K-FAC optimizer does, so that one forward pass serves both the training loss and the factor
    statistics::

        logits = acc.forward(inputs, labels=labels)        # hooks record Σ a a^T and the outputs
        acc.accumulate_output_factors(logits, labels, retain_graph=True)   # Σ g g^T per Fisher sample
        loss_fn(logits, labels).backward()                 # the training gradient, same graph

    :meth:`factors` returns the means as a :class:`FactorSet`; :meth:`means` as tensors and
    :meth:`reset` starts new sums. ``task`` (:class:`~curvlab.capture.task.Task`) says how inputs go into
    the model, where the logits are and what the loss is (default: ``model(x)``, softmax cross-entropy).
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
        task: Task | None = None,
    ) -> None:
        if fisher not in FISHER_TYPES:
            raise OptionError(f"unknown Fisher type {fisher!r}; choose one of {FISHER_TYPES}")
        if mc_samples < 1:
            raise OptionError(f"mc_samples must be at least 1, got {mc_samples}")
        self.model = model
        self.task = default_task(task)
        self.loss = self.task.loss
        self.fisher = fisher
        self.mc_samples = mc_samples
        self.dtype = dtype
        self.generator = generator
        self.num_examples = 0
        self.layers: dict[str, _State] = {}
        selected = select_layers(model, layers)
        check_factor_memory(selected, dtype)
        for name, (source, adapter) in selected.items():
            if isinstance(source, layer_math.TiedPair):
                self.layers[name] = _TiedState(source, adapter)
            else:
                self.layers[name] = _LayerState(source, adapter)
        self._handles: list[Any] = []
        self._recording = False
        self._rows: Tensor | None = None  # the batch rows that count (None: all)

    def __enter__(self) -> FactorAccumulator:
        for name, state in self.layers.items():
            for module, role in state.targets():
                self._handles.append(module.register_forward_hook(self._forward_hook(name, state, role)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _forward_hook(self, name: str, state: _State, role: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if self._recording:
                x = inputs[0].detach()
                if self._rows is not None:
                    if x.shape[0] != self._rows.shape[0]:
                        raise OptionError(
                            f"layer {name}: its input's first dimension ({x.shape[0]}) is not the batch "
                            f"({self._rows.shape[0]}): cannot leave out the examples whose labels are all "
                            "ignored"
                        )
                    x = x[self._rows]
                state.on_forward(role, module, x, output, self.dtype)

        return hook

    def forward(
        self, inputs: Any, *, record: bool = True, module: nn.Module | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        """The logits of ``inputs`` (through the task); with ``record`` the hooks add the batch's
        ``Σ a a^T`` and keep the layer outputs for :meth:`accumulate_output_factors`, which must be
        called next.

        ``module``: what to call instead of the model, e.g. its ``DistributedDataParallel`` wrapper
        (the hooks sit on the model's own layers, so they fire either way and keep their names).
        ``labels``: when given, the examples whose labels are all ignored (the loss's ``ignore_index``)
        are left out of ``Σ a a^T`` and of the example count (without them every example counts)."""
        keep = None if labels is None else self.loss.example_mask(labels)
        if keep is not None:
            record = record and bool(keep.any())
            keep = None if bool(keep.all()) else keep
        self._recording, self._rows = record, keep
        try:
            logits = self.task.forward(self.model if module is None else module, inputs)
        except BaseException:
            self._end_batch()
            raise
        finally:
            self._recording, self._rows = False, None
        if record:
            self.num_examples += int(logits.shape[0]) if keep is None else int(keep.sum())
        return logits

    def add_batch(self, inputs: Any, labels: Tensor | None) -> Tensor:
        """Forward one batch (the task's inputs), accumulate ``A`` and ``S`` of every layer; returns the
        logits."""
        logits = self.forward(inputs, labels=labels)
        self.accumulate_output_factors(logits, labels)
        return logits.detach()

    def accumulate_output_factors(
        self, logits: Tensor, labels: Tensor | None, *, retain_graph: bool = False,
        rows: tuple[int, int] | None = None,
    ) -> None:
        """Add ``Σ (1/T) g g^T`` of the recorded forward pass, one backward pass per Fisher sample.

        The gradients are taken with respect to the recorded layer outputs only (no parameter
        ``.grad`` is touched); ``retain_graph=True`` keeps the graph for a training backward pass.
        ``rows=(offset, total)``: these are examples ``offset …`` of a batch of ``total`` split across
        processes; Monte-Carlo labels are drawn for the whole batch
        (:func:`curvlab.capture.loss.batch_uniforms`).
        """
        try:
            states = [s for s in self.layers.values() if s.outputs]
            outputs = [out for s in states for _, out in s.outputs]
            if not outputs:
                return
            if any(not out.requires_grad for out in outputs):
                raise ValueError("a hooked layer's output does not require grad (frozen weights?)")
            samples = list(
                logit_gradient_samples(
                    logits, labels, self.fisher, loss=self.loss, mc_samples=self.mc_samples,
                    generator=self.generator, rows=rows,
                )
            )
            for k, (u, weight) in enumerate(samples):
                keep = retain_graph or k + 1 < len(samples)
                grads = torch.autograd.grad(logits, outputs, grad_outputs=u, retain_graph=keep)
                position = 0
                for state in states:
                    for role, _ in state.outputs:
                        state.on_output_grad(role, grads[position], weight, self.dtype)
                        position += 1
        finally:
            self._end_batch()

    def _end_batch(self) -> None:
        for state in self.layers.values():
            state.end_batch()

    def means(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``(A, S)`` of every layer seen, as symmetrised tensors (1-D for a diagonal factor)."""
        if self.num_examples == 0:
            raise OptionError("no examples were seen: the data is empty")
        return {
            name: (_mean(state.A_sum, self.num_examples), _mean(state.S_sum, self.num_examples))
            for name, state in self.layers.items()
            if state.A_sum is not None and state.S_sum is not None
        }

    def reduce(self) -> None:
        """Add up the sums and example counts of all processes (:mod:`curvlab.distributed`), in place.

        A no-op in a single process. One collective carries every layer's ``A`` and ``S`` sums and the
        example count; a process that saw no batch (or never used a layer) contributes zeros of the
        shapes the others report.
        """
        if not distributed.context().active:
            return
        states = list(self.layers.values())
        # per factor: [ndim + 1 (0 when absent), size, size or 0]; the maximum over processes
        shapes: list[int] = []
        for state in states:
            for total in (state.A_sum, state.S_sum):
                dims = [] if total is None else list(total.shape)
                shapes += [0 if total is None else len(dims) + 1, *dims, *[0] * (2 - len(dims))]
        shapes = distributed.all_reduce_max_int(shapes, "agreeing on the factor shapes")
        device = next(self.model.parameters()).device
        tensors = []
        for k, (state, attr) in enumerate((s, a) for s in states for a in ("A_sum", "S_sum")):
            ndim_plus_one, *dims = shapes[3 * k : 3 * k + 3]
            if ndim_plus_one == 0:
                continue  # no process used this layer
            if getattr(state, attr) is None:
                setattr(state, attr, torch.zeros(dims[: ndim_plus_one - 1], dtype=self.dtype, device=device))
            tensors.append(getattr(state, attr))
        count = torch.tensor([self.num_examples], dtype=torch.int64, device=device)
        distributed.all_reduce_sum([*tensors, count], "adding up the factor sums")
        self.num_examples = int(count.item())

    def reset(self) -> None:
        """Forget the sums (the hooks stay): the next batch starts new means."""
        for state in self.layers.values():
            state.A_sum = state.S_sum = None
        self.num_examples = 0

    def factors(self) -> FactorSet:
        """The factors ``A = Σ/N`` and ``S = Σ/N`` of every layer seen, as numpy arrays."""
        if self.num_examples == 0:
            raise OptionError("no examples were seen: the data is empty")
        result = {}
        for name, state in self.layers.items():
            if state.A_sum is None or state.S_sum is None:
                warnings.warn(f"layer {name} was not used in the forward pass: no factors", stacklevel=2)
                continue
            result[name] = layer_factors(
                state.module,
                state.adapter,
                _mean(state.A_sum, self.num_examples).cpu().numpy(),
                _mean(state.S_sum, self.num_examples).cpu().numpy(),
            )
        attrs = {"mc_samples": self.mc_samples} if self.fisher == "mc" else {}
        attrs.update(self.loss.to_attrs())
        return FactorSet(result, fisher_type=self.fisher, num_examples=self.num_examples, attrs=attrs)


def layer_factors(source: FactorSource, adapter: Any, A: np.ndarray, S: np.ndarray) -> LayerFactors:
    """The checkpoint record of one entry's factors (module type and shapes from its adapter)."""
    return LayerFactors(
        module_type=adapter.module_type,
        weight_shape=adapter.weight_shape(source),
        has_bias=adapter.has_bias(source),
        A=A,
        S=S,
    )


def _mean(total: Tensor, count: int) -> Tensor:
    """``total / count``, symmetrised for a dense factor (see :func:`_symmetric_mean`)."""
    return total / count if total.dim() == 1 else _symmetric_mean(total, count)


def _symmetric_mean(total: Tensor, count: int) -> Tensor:
    """``(X + X^T) / (2 count)``: BLAS products ``x^T x`` in float32 are symmetric only to rounding."""
    return (total + total.T) / (2 * count)


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

    def to_json(self) -> dict[str, Any]:
        """What ``curvlab factors --json`` reports about the factors: Fisher type, examples, layers."""
        return {
            "fisher_type": self.fisher_type,
            "num_examples": self.num_examples,
            "layers": [
                {"name": n, "module_type": f.module_type, "A_shape": list(f.A.shape),
                 "S_shape": list(f.S.shape)}
                for n, f in self.items()
            ],
        }

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
    batches: Iterable[Any],
    *,
    fisher: str = "mc",
    mc_samples: int = 1,
    layers: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    progress: bool = False,
    task: Task | None = None,
) -> FactorSet:
    """K-FAC factors ``A`` and ``S`` of every Linear/Conv2d/Embedding layer of ``model`` over ``batches``.

    A weight tied between an Embedding and a Linear is one ``TiedEmbedding`` entry (docs/factors.md).

    ``batches`` yields batches (e.g. a ``DataLoader``): ``(inputs, labels)`` pairs by default, split,
    fed to the model and read back by ``task`` (:class:`~curvlab.capture.task.Task`: tuple/dict inputs,
    dict or ``.logits`` outputs, and the loss — softmax cross-entropy by default, ``MeanSquaredError``,
    ``BinaryCrossEntropy``); every tensor is moved to the device of the model's parameters.
    ``fisher`` is ``"empirical"``, ``"mc"`` (``mc_samples`` labels per example, sampled with ``seed``)
    or ``"exact"``; ``layers`` are fnmatch globs of module paths (default: all supported layers);
    ``dtype`` is the accumulator precision. Returns a :class:`FactorSet` whose ``attrs`` record the loss.

    The Monte-Carlo labels of batch ``k`` are drawn with the seed ``(seed, k)``
    (:func:`curvlab.distributed.batch_seed`). Under ``torchrun`` each process takes every
    ``world_size``-th batch and the sums are all-reduced at the end, so every process returns the
    factors of all the data, equal to the single-process ones up to the order of additions.
    """
    task = default_task(task)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    accumulator = FactorAccumulator(
        model, fisher=fisher, mc_samples=mc_samples, layers=layers, dtype=dtype, generator=generator,
        task=task,
    )
    ctx = distributed.context()
    with accumulator:
        for k, batch in distributed.my_batches(_progress(batches, progress and ctx.is_main), ctx):
            generator.manual_seed(distributed.batch_seed(seed, k))
            with batch_context(k):
                inputs, labels = task.split_batch(batch)
                accumulator.add_batch(task.move(inputs, device), task.move(labels, device))
    accumulator.reduce()
    return accumulator.factors()


def _progress(batches: Iterable, enabled: bool) -> Iterable:
    if not enabled:
        return batches
    from curvlab.progress import progress_bar

    return progress_bar(batches, desc="factors", unit="batch")


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
    crash-safely (:func:`curvlab.io.checkpoint.append_step`). Without ``model_config``, a ``model``
    built by :func:`curvlab.models.build_model` or by a factory records the config it was built from
    (:func:`curvlab.models.config_of`), so that ``curvlab gradcov`` and ``factors --weights`` can
    rebuild it; what cannot be recorded (any other module; a factory model built without an input
    shape) is said in one :class:`~curvlab.models.ConfigWarning` line.
    """
    weights = None if model is None else model_weights(model)
    record = factors.to_step(step, weights)
    config = None if model_config is None else dict(model_config)
    if config is None and model is not None:
        from curvlab.models import recordable_config

        config = recordable_config(model, path)
    if config is not None and model_name is None:
        name = config.get("name") or config.get("factory")
        model_name = name if isinstance(name, str) else None
    if append:
        append_step(path, record, model_name=model_name, model_config=config)
    else:
        save(path, [record], model_name=model_name, model_config=config)

