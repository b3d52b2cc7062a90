"""Kronecker-factor capture (K-FAC, seed eqs. 13 and 15) with forward hooks and output gradients.

For a layer in normal form (:mod:`curvlab.capture.layers`) with inputs ``a_nt`` and per-example output
gradients ``g_nt`` at locations ``t = 1..T`` of example ``n = 1..N``:

* input factor  ``A = (1/N) Σ_n Σ_t a_nt a_nt^T``          (bias-augmented ``a`` when the layer has one)
* output factor ``S = (1/N) Σ_n (1/T) Σ_t g_nt g_nt^T``    (averaged over Fisher samples, see below)

so that ``F ≈ S ⊗ A`` for the row-major ``vec`` of the ``(m, n)`` weight matrix. With one location this
is eq. 13; for convolutions it is eq. 15 (sum over locations in ``A``, mean in ``S``); sequence tokens
of a Linear layer are treated like convolution locations, and so are the calls of a module used
several times in one forward pass (``T`` counts the locations of all its calls). For one example at
one location,
``S ⊗ A = vec(G) vec(G)^T`` with ``G = g a^T`` its weight gradient. An ``nn.Embedding`` is the layer
``s = E^T onehot``: its ``A`` is diagonal (token counts / N). A weight shared by an Embedding and the
pre-softmax Linear (eq. 16) is one ``TiedEmbedding`` entry whose V-side ``S`` (diagonal) and d-side
``A`` pool the rank-one terms of both uses (docs/factors.md, "Tied embedding"). The projections of an
``nn.MultiheadAttention`` are four Linear entries (:mod:`curvlab.capture.attention`), and the ``(γ, β)``
of a normalisation layer one ``NormAffine`` entry holding its exact per-channel Fisher blocks
(:mod:`curvlab.capture.norms`). Every trainable parameter without an entry is reported, with the
reason, in :attr:`FactorSet.coverage` (:mod:`curvlab.capture.coverage`).

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
first if it has dropout); examples must not interact within a batch: batch norm in training mode is a
one-line :class:`~curvlab.errors.LayerError`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from curvlab import distributed
from curvlab.capture import layers as layer_math
from curvlab.capture.coverage import Coverage, LayerPlan, measure, plan_layers
from curvlab.capture.loss import FISHER_TYPES, logit_gradient_samples
from curvlab.capture.sums import _discard, _NormState, _seen, _State, _state, _why_skipped
from curvlab.capture.task import Task, batch_context, batch_size, default_task
from curvlab.errors import LayerError, OptionError
from curvlab.io.checkpoint import LayerFactors, Step, append_step, expected_factor_sizes, save
from curvlab.io.checkpoint.format import block_size
from curvlab.limits import check_size

FactorSource = nn.Module | layer_math.TiedPair | layer_math.Projection


class CoverageWarning(UserWarning):
    """Some trainable parameters have no factors (the one-line message names them and says why)."""


def select_layers(
    model: nn.Module, patterns: Sequence[str] | None = None
) -> dict[str, tuple[FactorSource, Any]]:
    """The model's entries that get Kronecker factors, by name, filtered by fnmatch globs.

    Linear, Conv1d/2d/3d and Embedding layers each get an entry named by module path; every
    ``nn.MultiheadAttention`` four (``<path>.q_proj``, ``.k_proj``, ``.v_proj``, ``.out_proj``: a
    :class:`~curvlab.capture.layers.Projection` each); the affine parameters of a normalisation layer
    one (``NormAffine``). A weight shared by an ``nn.Embedding`` and an ``nn.Linear`` (the pre-softmax
    layer of a language model with tied weights, seed eq. 16) gets ONE entry, a
    :class:`~curvlab.capture.layers.TiedPair` with the
    :class:`~curvlab.capture.layers.TiedEmbeddingAdapter`, named after the Linear's module path and
    placed where the Linear is; a glob selects an entry if it matches its name or the path of a module
    it covers. What gets no entry, and why, is :mod:`curvlab.capture.coverage`'s business; a pattern
    that matches no entry is an error.
    """
    return plan_layers(model, patterns).selected


def check_factor_memory(selected: Mapping[str, tuple[FactorSource, Any]], dtype: torch.dtype) -> None:
    """Refuse, before any batch, factors whose sums would not fit the memory budget (one line naming
    the largest layer): a 3e6-wide input makes a Linear's ``A`` 3e6 x 3e6 (72 TB in float64)."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    sizes = {}
    for name, (source, adapter) in selected.items():
        shape, bias = adapter.weight_shape(source), adapter.has_bias(source)
        n, m = expected_factor_sizes(adapter.module_type, shape, bias)
        k = block_size(adapter.module_type, bias) or 1  # a blocks A: n blocks of k x k
        elements_a = {"dense": n * n, "blocks": n * k * k}.get(adapter.input_kind, n)
        elements_s = m * m if getattr(adapter, "output_kind", "dense") == "dense" else m
        text_a = f"{n} blocks of {k}x{k}" if adapter.input_kind == "blocks" else f"{n}x{n}"
        sizes[name] = (elements_a + elements_s) * itemsize, f"A {text_a}, S {m}x{m}"
    if not sizes:
        return
    largest = max(sizes, key=lambda entry: sizes[entry][0])
    check_size(
        f"the K-FAC factors of {len(sizes)} layers (largest: {largest}, {sizes[largest][1]})",
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
        batch_norm: str = "error",
    ) -> None:
        if fisher not in FISHER_TYPES:
            raise OptionError(f"unknown Fisher type {fisher!r}; choose one of {FISHER_TYPES}")
        if mc_samples < 1:
            raise OptionError(f"mc_samples must be at least 1, got {mc_samples}")
        if batch_norm not in ("error", "skip"):
            raise ValueError(f"batch_norm must be 'error' or 'skip', got {batch_norm!r}")
        self.model = model
        self.task = default_task(task)
        self.loss = self.task.loss
        self.fisher = fisher
        self.mc_samples = mc_samples
        self.dtype = dtype
        self.generator = generator
        self.num_examples = 0
        self.plan: LayerPlan = plan_layers(model, layers)
        if not self.plan.selected:
            raise LayerError(
                "the model has no layer with K-FAC factors (Linear, Conv1d/2d/3d, Embedding, "
                "MultiheadAttention, or the affine parameters of a normalisation layer); "
                + measure(model, self.plan, set()).summary()
            )
        check_factor_memory(self.plan.selected, dtype)
        self.layers: dict[str, _State] = {
            name: _state(name, source, adapter, batch_norm)
            for name, (source, adapter) in self.plan.selected.items()
        }
        self._handles: list[Any] = []
        self._recording = False
        self._rows: Tensor | None = None  # the batch rows that count (None: all)
        self._batch_size: int | None = None

    def __enter__(self) -> FactorAccumulator:
        for state in self.layers.values():
            self._handles += layer_math.watch(state.module, self._on_use(state), lambda: self._recording)
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _on_use(self, state: _State):
        def on_use(role: str, x: Tensor, output: Tensor) -> None:
            if state.skipped is not None:
                return
            if self._batch_size is not None and x.shape[:1] != (self._batch_size,):
                rows = x.shape[0] if x.dim() else "no"
                # a broadcast input (one row for all examples) or a folded one (e.g. x.reshape(-1, d):
                # the examples' tokens as rows): either way its rows are not the examples, so neither
                # per-example statistics nor the rows of ignored examples (``_rows``) can be taken
                _discard(state, f"called on a tensor whose first dimension ({rows}) is not the batch "
                                f"({self._batch_size} examples): its rows are not the examples (a broadcast "
                                "or folded input), so it has no per-example statistics")
                return
            if not output.requires_grad:
                _discard(state, "its output does not depend on anything trainable (frozen): no output "
                                "gradients")
                return
            if self._rows is not None and not isinstance(state, _NormState):
                # leave out the examples whose labels are all ignored (a norm block pairs each example's
                # input with its output gradient, which is 0 for those examples: it keeps every row)
                x = x[self._rows]
            state.on_forward(role, x, output, self.dtype)

        return on_use

    def check_model(self) -> None:
        """Refuse, before any batch, what is wrong with the model itself rather than with a batch: a norm
        entry that normalises with batch statistics (training-mode batch norm, ``batch_norm="error"``).
        The forward hooks check it again at every use (the mode can change between batches)."""
        for state in self.layers.values():
            if isinstance(state, _NormState):
                state.refuse_batch_statistics()

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
        self._batch_size = batch_size(inputs) if labels is None else int(labels.shape[0])
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
                    count = len(state.outputs)
                    state.on_sample(grads[position : position + count], weight, self.dtype)
                    position += count
        finally:
            self._end_batch()

    def _end_batch(self) -> None:
        for state in self.layers.values():
            state.end_batch()

    def means(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``(A, S)`` of every layer seen, as symmetrised tensors (1-D for a diagonal factor)."""
        if self.num_examples == 0:
            raise OptionError("no examples were seen: the data is empty")
        return {name: state.mean(self.num_examples) for name, state in self.layers.items() if _seen(state)}

    def reduce(self) -> None:
        """Add up the sums and example counts of all processes (:mod:`curvlab.distributed`), in place.

        A no-op in a single process. One collective carries every layer's ``A`` and ``S`` sums and the
        example count; a process that saw no batch (or never used a layer) contributes zeros of the
        shapes the others report.
        """
        if not distributed.context().active:
            return
        states = list(self.layers.values())
        # per factor: [ndim + 1 (0 when absent), its sizes padded with 0 to 3]; the maximum over processes
        shapes: list[int] = []
        for state in states:
            for total in (state.A_sum, state.S_sum):
                dims = [] if total is None else list(total.shape)
                shapes += [0 if total is None else len(dims) + 1, *dims, *[0] * (3 - len(dims))]
        shapes = distributed.all_reduce_max_int(shapes, "agreeing on the factor shapes")
        device = next(self.model.parameters()).device
        tensors = []
        for k, (state, attr) in enumerate((s, a) for s in states for a in ("A_sum", "S_sum")):
            ndim_plus_one, *dims = shapes[4 * k : 4 * k + 4]
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

    def coverage(self) -> Coverage:
        """Which trainable parameters the entries seen so far cover (:mod:`curvlab.capture.coverage`)."""
        extra = {name: _why_skipped(state) for name, state in self.layers.items() if _why_skipped(state)}
        return measure(self.model, self.plan, {n for n, s in self.layers.items() if _seen(s)}, extra)

    def factors(self) -> FactorSet:
        """The factors ``A = Σ/N`` and ``S = Σ/N`` of every entry seen, as numpy arrays, with the
        coverage of the model's trainable parameters (an entry never used gets no factors and is
        reported there)."""
        if self.num_examples == 0:
            raise OptionError("no examples were seen: the data is empty")
        result = {}
        for name, state in self.layers.items():
            if not _seen(state):
                continue
            A, S = state.mean(self.num_examples)
            result[name] = layer_factors(state.module, state.adapter, A.cpu().numpy(), S.cpu().numpy())
        coverage = self.coverage()
        if not result:
            raise LayerError(
                f"no layer with K-FAC factors was used in the forward pass; {coverage.summary()}"
            )
        attrs = {"mc_samples": self.mc_samples} if self.fisher == "mc" else {}
        attrs.update(self.loss.to_attrs())
        return FactorSet(
            result, fisher_type=self.fisher, num_examples=self.num_examples, attrs=attrs, coverage=coverage
        )


def layer_factors(source: FactorSource, adapter: Any, A: np.ndarray, S: np.ndarray) -> LayerFactors:
    """The checkpoint record of one entry's factors (module type and shapes from its adapter)."""
    return LayerFactors(
        module_type=adapter.module_type,
        weight_shape=adapter.weight_shape(source),
        has_bias=adapter.has_bias(source),
        A=A,
        S=S,
    )


class FactorSet(Mapping[str, LayerFactors]):
    """The captured factors: a read-only mapping from layer name (module path) to its factors."""

    def __init__(
        self,
        layers: dict[str, LayerFactors],
        *,
        fisher_type: str,
        num_examples: int,
        attrs: dict[str, Any] | None = None,
        coverage: Coverage | None = None,
    ) -> None:
        self._layers = dict(layers)
        self.fisher_type = fisher_type
        self.num_examples = num_examples
        self.attrs = dict(attrs or {})
        #: which trainable parameters of the model the entries cover (``None``: not known)
        self.coverage = coverage

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
            coverage=None if self.coverage is None else self.coverage.record(),
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
    """K-FAC factors ``A`` and ``S`` of every layer of ``model`` with factors, over ``batches``.

    Linear, Conv1d/2d/3d, Embedding, the four projections of every MultiheadAttention and the affine
    parameters of normalisation layers (:func:`select_layers`); a weight tied between an Embedding
    and a Linear is one ``TiedEmbedding`` entry (docs/factors.md). Every trainable parameter without
    factors is named, with the reason, in the result's ``coverage``, and a :class:`CoverageWarning`
    (one line) is emitted when it is not 100 %. A model without any such layer, or whose forward pass
    used none of them, is a :class:`~curvlab.errors.LayerError`.

    ``batches`` yields batches (e.g. a ``DataLoader``): ``(inputs, labels)`` pairs by default, split,
    fed to the model and read back by ``task`` (:class:`~curvlab.capture.task.Task`: tuple/dict inputs,
    dict or ``.logits`` outputs, and the loss — softmax cross-entropy by default, ``MeanSquaredError``,
    ``BinaryCrossEntropy``); every tensor is moved to the device of the model's parameters.
    ``fisher`` is ``"empirical"``, ``"mc"`` (``mc_samples`` labels per example, sampled with ``seed``)
    or ``"exact"``; ``layers`` are fnmatch globs of entry names or module paths (default: all);
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
        accumulator.check_model()
        for k, batch in distributed.my_batches(_progress(batches, progress and ctx.is_main), ctx):
            generator.manual_seed(distributed.batch_seed(seed, k))
            with batch_context(k):
                inputs, labels = task.split_batch(batch)
                accumulator.add_batch(task.move(inputs, device), task.move(labels, device))
    accumulator.reduce()
    factors = accumulator.factors()
    if not factors.coverage.complete:
        warnings.warn(factors.coverage.summary(), CoverageWarning, stacklevel=2)
    return factors


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

