"""The K-FAC optimizer (Martens & Grosse 2015; Grosse & Martens 2016; Ba et al. 2017; seed eqs. 13-16).

(One concept at about 600 lines: the optimizer's step — running factors, their inverses, the damped
preconditioning of every entry kind, the learning-rate rescaling and its state for resumes — which
reads best in one place; :class:`curvlab.analysis.operators.KFACOperator` reuses its damping rule.)

For every layer with Kronecker factors (:func:`curvlab.capture.factors.select_layers`: Linear,
Conv1d/2d/3d, Embedding, a tied embedding / pre-softmax weight, the four projections of a
MultiheadAttention) the gradient of the training loss, as the ``m × n`` matrix ``G`` of design.md (bias
as the last column; ``E^T`` for an Embedding, ``E`` for a tied weight, an attention projection's rows of
the packed ``in_proj_weight``), is preconditioned by the damped Kronecker-factored curvature::

    Δ = (S̃ + (√λ/π) I)^-1 G (A + π√λ I)^-1,      i.e.  vec Δ = ((S̃ + √λ/π I) ⊗ (A + π√λ I))^-1 vec G,

the factored Tikhonov damping of Martens & Grosse 2015, §6.3, with
``π = sqrt((tr A / dim A) / (tr S̃ / dim S))``. ``S̃ = S / T_loss`` where ``T_loss = K / N`` is the
number of loss terms per example of the batch (:meth:`curvlab.capture.loss.Loss.num_terms` over
:meth:`~curvlab.capture.loss.Loss.num_examples`: 1 for a classifier, the sequence length for a language
model, the counted labels per counted example with ``ignore_index``, every output value for squared
error and binary cross-entropy): the factors follow docs/factors.md, where ``S ⊗ A`` approximates the
Fisher of the per-example loss *summed* over its terms, while the training loss is torch's *mean* over
the batch's ``K`` terms (:meth:`~curvlab.capture.loss.Loss.mean`), whose Fisher is ``(S / T_loss) ⊗ A``.
``λ`` (``damping``) is thus relative to the curvature of the loss being minimised. The loss, and how a
batch goes into the model, are the :class:`~curvlab.capture.task.Task`'s (default: softmax
cross-entropy on ``(x, y)`` tensors).

The inverse is taken through the eigendecompositions ``A = Q_A diag(α) Q_A^T``,
``S = Q_S diag(σ) Q_S^T`` (recomputed every ``inverse_update_every`` steps)::

    Δ = Q_S [(Q_S^T G Q_A) / ((σ/T_loss + √λ/π)(α + π√λ)^T)] Q_A^T        (elementwise division)

A diagonal factor (an Embedding's ``A``, a tied weight's ``S``) is its own eigenvalues, ``Q = I``.

The affine parameters of a normalisation layer (a ``NormAffine`` entry, :mod:`curvlab.capture.norms`)
have exact per-channel Fisher blocks ``F_c`` (``k × k``, ``k = 2`` for ``(γ_c, β_c)``) instead of two
factors; each block is inverted exactly with plain Tikhonov damping,
``Δ_c = (F_c / T_loss + λ I)^-1 G_c``, through its eigendecomposition. Batch norm in training mode
normalises with batch statistics, which couple the examples: its parameters take the plain gradient
(as do parameters of layers without factors), and :meth:`KFAC.coverage` says so.

The factors are exponential moving averages of per-batch estimates ``Â``, ``Ŝ`` taken every
``factor_update_every`` steps with the Fisher type ``fisher`` (Monte-Carlo labels sampled from the
model by default): the first estimate initialises them, ``A ← Â``, and later ones update
``A ← ε A + (1 - ε) Â`` (``ε = factor_decay``), the same for ``S``. :meth:`KFAC.initialize_factors`
may set a first estimate from other data before training. The per-batch estimates come from
:class:`curvlab.capture.factors.FactorAccumulator` on the training forward pass itself (no second forward,
no second copy of the per-layer math): its hooks record ``Σ a a^T`` while the loss is computed, and
one extra backward pass to the layer outputs per Fisher sample gives ``Σ g g^T``.

KL clipping (Ba et al. 2017, §4): with learning rate ``η``, the preconditioned steps are scaled by

    ν = min(1, sqrt(κ / (η² Σ_l ⟨Δ_l, G_l⟩)))          (κ = ``kl_clip``; ``None`` disables it)

so that the second-order estimate of the KL divergence of the step, ``η² Σ_l ⟨Δ_l, G_l⟩``, stays at
most ``κ``. Parameters without factors (norm layers, parameters of unsupported modules) take their
plain gradient (a Parameter partly covered, like an attention's packed ``in_proj_weight`` when only
some of its projections are selected, takes ``ν Δ`` on the covered rows and the gradient on the
others). Every parameter then follows SGD with momentum ``μ`` and weight decay ``w`` (PyTorch's
convention)::

    d = ν Δ (or the gradient) + w θ,      b ← μ b + d,      θ ← θ - η b.

Several processes (``torchrun``, :mod:`curvlab.distributed`): each process holds a slice of the
batch and calls the model through its ``DistributedDataParallel`` wrapper (``forward_module``), so
``loss.backward()`` leaves the gradient of the whole batch's loss on every process. The extra
backward passes to the layer outputs (``torch.autograd.grad``) reach no parameter, so DDP's
gradient hooks do not fire for them. Before every factor update the sums ``Σ a a^T``, ``Σ g g^T`` and
the example counts of all processes are added up (:meth:`FactorAccumulator.reduce`, one collective),
so ``Â``, ``Ŝ`` are the statistics of the whole batch, and Monte-Carlo labels are drawn for the whole
batch from the generator every process seeds alike and each process keeps its rows (``rows`` of
:meth:`KFAC.backward`). With the same factors and the same ``G`` on every process, ``Σ_l ⟨Δ_l, G_l⟩``
and hence ``ν`` are the same everywhere: every process takes the same step and the weights stay equal.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab import distributed
from curvlab.capture.coverage import Coverage, measure
from curvlab.capture.factors import FactorAccumulator, FactorSet, layer_factors
from curvlab.capture.task import Task, batch_context, default_task
from curvlab.errors import CheckpointError, OptionError
from curvlab.io.checkpoint import LayerFactors
from curvlab.optim.config import DEFAULT_LR

__all__ = ["KFAC", "damping_ratio", "factored_damping", "mean_cross_entropy"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def mean_cross_entropy(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Softmax cross-entropy averaged over examples and label locations: logits ``(B, ..., C)``."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), label_smoothing=label_smoothing
    )


@dataclass
class _Entry:
    """One factored layer: its parameters, running factors and their eigendecompositions.

    ``A``/``S`` are 2-D (dense) or 1-D (diagonal). ``eA``/``eS`` are the eigenvalues (clamped at 0),
    ``QA``/``QS`` the eigenvectors (``None`` for a diagonal factor).
    """

    source: Any
    adapter: Any
    weight: nn.Parameter
    bias: nn.Parameter | None
    A: Tensor | None = None
    S: Tensor | None = None
    eA: Tensor | None = None
    eS: Tensor | None = None
    QA: Tensor | None = None
    QS: Tensor | None = None


def _eigh(factor: Tensor) -> tuple[Tensor, Tensor | None]:
    """Eigenvalues (clamped at 0) and eigenvectors of a factor; a 1-D factor is its own eigenvalues,
    a blocks factor ``(C, k, k)`` gives ``(C, k)`` eigenvalues and ``(C, k, k)`` eigenvectors."""
    if factor.dim() == 1:
        return factor.clamp_min(0), None
    if factor.dim() == 3:
        values, vectors = torch.linalg.eigh((factor + factor.transpose(1, 2)) / 2)
        return values.clamp_min(0), vectors
    try:
        values, vectors = torch.linalg.eigh(factor)
    except RuntimeError:  # ill-conditioned: retry with a relative jitter on the diagonal
        jitter = 1e-10 * factor.diagonal().abs().max().clamp_min(1e-30)
        values, vectors = torch.linalg.eigh(factor + jitter * torch.eye(len(factor), dtype=factor.dtype,
                                                                          device=factor.device))
    return values.clamp_min(0), vectors


def damping_ratio(eA: Tensor, eS: Tensor) -> float:
    """``π = sqrt((tr A / dim A) / (tr S / dim S))`` from the factors' eigenvalues (1 if degenerate).

    Martens & Grosse 2015, §6.3: the ratio that splits the damping ``λ`` between the two factors so
    that ``(S + √λ/π I) ⊗ (A + π√λ I)`` adds comparable amounts to both."""
    mean_a = float(eA.mean())
    mean_s = float(eS.mean())
    if mean_a <= 0 or mean_s <= 0 or not math.isfinite(mean_a / mean_s):
        return 1.0
    return math.sqrt(mean_a / mean_s)


def factored_damping(eS: Tensor, eA: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """The damped eigenvalues ``(σ + √λ/π, α + π√λ)`` of the factored Tikhonov damping.

    ``(S + √λ/π I)^-1 G (A + π√λ I)^-1 = Q_S [(Q_S^T G Q_A) / ((σ + √λ/π)(α + π√λ)^T)] Q_A^T`` for
    ``S = Q_S diag(σ) Q_S^T``, ``A = Q_A diag(α) Q_A^T`` and ``π`` of :func:`damping_ratio`. Used by
    the optimizer (with ``S̃ = S / T_loss``) and by :class:`curvlab.analysis.operators.KFACOperator`.
    """
    pi = damping_ratio(eA, eS)
    root = math.sqrt(damping)
    return eS + root / pi, eA + pi * root


def _check_range(
    name: str, value: float, low: float, high: float | None = None, *, open_low: bool = False
) -> None:
    """:class:`OptionError` unless ``value`` is finite and in ``[low, high]`` (``(low`` if open)."""
    bad = value < low or (open_low and value == low) or (high is not None and value > high)
    if bad or not math.isfinite(value):
        bound = f"({low}" if open_low else f"[{low}"
        raise OptionError(f"{name} must be in {bound}, {high if high is not None else 'inf'}], got {value}")


class KFAC:
    """K-FAC with factor moving averages, factored Tikhonov damping, KL clipping and momentum.

    See the module docstring for the math. One training step::

        opt.zero_grad()
        logits = opt.forward(inputs, labels)     # records the input statistics when a factor update is due
        loss = opt.task.loss.mean(logits, labels)
        opt.backward(logits, labels, loss)       # output statistics (Fisher samples), then loss.backward()
        opt.step()

    or ``opt.train_step(inputs, labels)``. ``lr`` may be changed between steps (schedules). ``task``
    (:class:`~curvlab.capture.task.Task`) says how inputs go into the model, where the logits are and
    what the loss is (default softmax cross-entropy); its :meth:`~curvlab.capture.loss.Loss.mean` is the
    training loss of :meth:`train_step`.
    The hooks stay on the model until :meth:`close` (or the end of a ``with`` block).
    ``forward_module`` is what the training forward pass calls (default ``model``; under ``torchrun``
    the model's ``DistributedDataParallel`` wrapper, see the module docstring).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float = DEFAULT_LR["kfac"],
        damping: float = 1e-2,
        momentum: float = 0.9,
        factor_decay: float = 0.95,
        kl_clip: float | None = 1e-3,
        factor_update_every: int = 1,
        inverse_update_every: int = 10,
        fisher: str = "mc",
        mc_samples: int = 1,
        weight_decay: float = 0.0,
        layers: Sequence[str] | None = None,
        factor_dtype: torch.dtype = torch.float64,
        seed: int = 0,
        forward_module: nn.Module | None = None,
        task: Task | None = None,
    ) -> None:
        _check_range("lr", lr, 0.0)
        _check_range("damping", damping, 0.0, open_low=True)
        _check_range("momentum", momentum, 0.0, 1.0)
        _check_range("factor_decay", factor_decay, 0.0, 1.0)
        _check_range("weight_decay", weight_decay, 0.0)
        if kl_clip is not None:
            _check_range("kl_clip", kl_clip, 0.0, open_low=True)
        for name, value in (("factor_update_every", factor_update_every),
                            ("inverse_update_every", inverse_update_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionError(f"{name} must be a positive integer, got {value!r}")
        self.model = model
        self.task = default_task(task)
        self.forward_module = model if forward_module is None else forward_module
        self.lr = float(lr)
        self.damping = float(damping)
        self.momentum = float(momentum)
        self.factor_decay = float(factor_decay)
        self.kl_clip = None if kl_clip is None else float(kl_clip)
        self.factor_update_every = factor_update_every
        self.inverse_update_every = inverse_update_every
        self.weight_decay = float(weight_decay)
        self.fisher = fisher
        self.mc_samples = mc_samples
        self.seed = seed
        device = next(model.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.accumulator = FactorAccumulator(
            model, fisher=fisher, mc_samples=mc_samples, layers=layers, dtype=factor_dtype,
            generator=self.generator, task=self.task, batch_norm="skip",
        )
        self.entries = self._make_entries()
        self.params = _unique_trainable(model)
        self.momentum_buffers: dict[int, Tensor] = {}
        self.steps = 0
        self.num_factor_examples = 0
        self.loss_locations = 1.0
        self.last_nu: float | None = None
        self._recording = False
        self.accumulator.__enter__()

    def _make_entries(self) -> dict[str, _Entry]:
        entries = {}
        for name, state in self.accumulator.layers.items():
            weight, bias = state.adapter.parameters(state.module)
            tensors = [weight] if bias is None else [weight, bias]
            if not all(isinstance(t, nn.Parameter) and t.requires_grad for t in tensors):
                warnings.warn(f"layer {name}: weight is not a trainable Parameter of the module (a "
                              "parametrization?): plain gradient steps, no K-FAC", stacklevel=3)
                continue
            entries[name] = _Entry(state.module, state.adapter, weight, bias)
        unused = set(self.accumulator.layers) - set(entries)
        for name in unused:
            del self.accumulator.layers[name]
        return entries

    # ------------------------------------------------------------------------------ hooks lifetime

    def close(self) -> None:
        """Remove the hooks from the model."""
        self.accumulator.__exit__()

    def __enter__(self) -> KFAC:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ one step

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def factor_update_due(self) -> bool:
        """Whether this step's forward pass records factor statistics."""
        return self.steps % self.factor_update_every == 0

    def forward(self, inputs: Any, labels: Tensor | None = None) -> Tensor:
        """The logits of ``forward_module`` on ``inputs`` (through the task), recording the input
        statistics when a factor update is due. With ``labels``, examples whose labels are all ignored
        are left out of the statistics."""
        self._recording = self.factor_update_due()
        return self.accumulator.forward(
            inputs, record=self._recording, module=self.forward_module, labels=labels
        )

    def backward(
        self, logits: Tensor, labels: Tensor, loss: Tensor, *, rows: tuple[int, int] | None = None
    ) -> None:
        """The output statistics of a recorded forward pass (one backward pass per Fisher sample, to the
        layer outputs only), then ``loss.backward()`` on the same graph.

        ``rows=(offset, total)``: the examples are ``offset …`` of a batch of ``total`` split across
        processes; the Monte-Carlo labels are drawn for the whole batch and this slice's kept
        (:func:`curvlab.capture.loss.logit_gradient_samples`), so they do not depend on the split.
        Default: the examples are the whole batch.
        """
        self._set_loss_locations(logits, labels)
        if self._recording:
            self.accumulator.accumulate_output_factors(logits, labels, retain_graph=True, rows=rows)
        loss.backward()

    def _set_loss_locations(self, logits: Tensor, labels: Tensor) -> None:
        """``T_loss = K / N``: loss terms per counted example of the (whole) batch. Under ``torchrun``
        with an ``ignore_index`` the counts differ between processes and are added up first."""
        loss = self.task.loss
        terms, examples = loss.num_terms(logits, labels), loss.num_examples(logits, labels)
        if loss.counted(labels) is not None and distributed.context().active:
            counts = torch.tensor([terms, examples], dtype=torch.int64, device=logits.device)
            distributed.all_reduce_sum([counts], "adding up the loss terms")
            terms, examples = (int(v) for v in counts.tolist())
        if examples:
            self.loss_locations = terms / examples

    def train_step(
        self, inputs: Any, labels: Tensor, loss_fn: LossFn | None = None, *,
        rows: tuple[int, int] | None = None,
    ) -> Tensor:
        """Zero the gradients, forward, backward (``rows``: see :meth:`backward`) and :meth:`step`;
        returns the (detached) loss. ``loss_fn(logits, labels)`` defaults to the task's mean loss."""
        self.zero_grad()
        logits = self.forward(inputs, labels)
        loss = (self.task.loss.mean if loss_fn is None else loss_fn)(logits, labels)
        self.backward(logits, labels, loss, rows=rows)
        self.step()
        return loss.detach()

    @torch.no_grad()
    def step(self) -> None:
        """Update the factors (if recorded) and eigenbases (if due), precondition, clip, apply."""
        if self._recording:
            self._update_factors()
            self._recording = False
        if self.steps % self.inverse_update_every == 0 or any(
            e.A is not None and e.eA is None for e in self.entries.values()
        ):
            self.decompose()
        updates = self._preconditioned_updates()
        self._apply(updates)
        self.steps += 1

    def _update_factors(self) -> None:
        """``A ← Â`` the first time, then ``A ← ε A + (1 - ε) Â`` (the same for ``S``).

        ``Â``, ``Ŝ`` are the statistics of the whole batch: the sums and counts of all processes are
        added up first (a no-op in one process)."""
        self.accumulator.reduce()
        if self.accumulator.num_examples == 0:  # every label of the batch ignored: no statistics
            self.accumulator.reset()
            return
        means = self.accumulator.means()
        self.num_factor_examples += self.accumulator.num_examples
        self.accumulator.reset()
        for name, (A_hat, S_hat) in means.items():
            self._blend(self.entries[name], A_hat, S_hat, self.factor_decay)

    @staticmethod
    def _blend(entry: _Entry, A_hat: Tensor, S_hat: Tensor, decay: float) -> None:
        if entry.A is None:
            entry.A, entry.S = A_hat.clone(), S_hat.clone()
        else:
            entry.A.mul_(decay).add_(A_hat, alpha=1 - decay)
            entry.S.mul_(decay).add_(S_hat, alpha=1 - decay)

    @torch.no_grad()
    def decompose(self) -> None:
        """Eigendecompose every layer's current factors (done every ``inverse_update_every`` steps)."""
        for entry in self.entries.values():
            if entry.A is not None:
                entry.eA, entry.QA = _eigh(entry.A)
                entry.eS, entry.QS = _eigh(entry.S)

    def gradient_matrix(self, name: str) -> Tensor | None:
        """Layer ``name``'s gradient as the ``m × n`` matrix ``G`` (factor dtype), ``None`` without one."""
        entry = self.entries[name]
        if entry.weight.grad is None:
            return None
        bias_grad = None
        if entry.bias is not None:
            bias_grad = entry.bias.grad if entry.bias.grad is not None else torch.zeros_like(entry.bias)
        matrix = entry.adapter.to_matrix(entry.source, entry.weight.grad, bias_grad)
        return matrix.to(self.accumulator.dtype)

    def pi(self, name: str) -> float:
        """The factored-damping ratio ``π = sqrt((tr A / dim A) / (tr S̃ / dim S))`` (1 if degenerate)."""
        entry = self.entries[name]
        return damping_ratio(entry.eA, entry.eS / self.loss_locations)

    def precondition(self, name: str, G: Tensor) -> Tensor:
        """``(S̃ + √λ/π I)^-1 G (A + π√λ I)^-1`` through the eigenbases of layer ``name``; for a
        ``NormAffine`` entry ``(F_c / T_loss + λ I)^-1 G_c`` channel by channel."""
        entry = self.entries[name]
        if entry.eA is None:
            raise OptionError(f"layer {name}: no factors yet (no factor update has been made)")
        if entry.QA is not None and entry.QA.dim() == 3:
            blocks = G.reshape(entry.QA.shape[0], -1)
            v = torch.einsum("cji,cj->ci", entry.QA, blocks)
            v = v / (float(entry.eS[0]) * entry.eA / self.loss_locations + self.damping)
            return torch.einsum("cij,cj->ci", entry.QA, v).reshape(G.shape)
        damped_s, damped_a = factored_damping(entry.eS / self.loss_locations, entry.eA, self.damping)
        v = G if entry.QS is None else entry.QS.T @ G
        v = v if entry.QA is None else v @ entry.QA
        v = v / (damped_s[:, None] * damped_a[None, :])
        v = v if entry.QS is None else entry.QS @ v
        return v if entry.QA is None else v @ entry.QA.T

    def _preconditioned_updates(self) -> dict[int, Tensor]:
        """``ν Δ`` for every factored parameter (keyed by ``id``), with ``ν`` from KL clipping."""
        deltas: dict[str, Tensor] = {}
        vg = 0.0
        for name, entry in self.entries.items():
            G = self.gradient_matrix(name)
            if G is None or entry.eA is None:
                continue
            delta = self.precondition(name, G)
            deltas[name] = delta
            vg += float((delta * G).sum())
        nu = 1.0
        if self.kl_clip is not None and vg > 0 and self.lr > 0:
            nu = min(1.0, math.sqrt(self.kl_clip / (self.lr**2 * vg)))
        self.last_nu = nu
        updates: dict[int, Tensor] = {}
        for name, delta in deltas.items():
            entry = self.entries[name]
            pieces = entry.adapter.from_matrix(entry.source, delta * nu)
            rows = entry.adapter.rows(entry.source)
            for param, part, piece in zip((entry.weight, entry.bias), rows, pieces, strict=True):
                if param is None:
                    continue
                if part is None:
                    updates[id(param)] = piece.reshape(param.shape).to(param.dtype)
                    continue
                # a Parameter shared by several entries (an attention's packed projections): its rows
                # without an entry keep the plain gradient
                update = updates.get(id(param))
                if update is None:
                    grad = param.grad if param.grad is not None else torch.zeros_like(param)
                    update = updates[id(param)] = grad.detach().clone()
                update[part] = piece.to(update.dtype)
        return updates

    def _apply(self, updates: Mapping[int, Tensor]) -> None:
        """SGD with momentum and weight decay on ``ν Δ`` (factored) or the gradient (the rest)."""
        for index, p in enumerate(self.params):
            if p.grad is None:
                continue
            d = updates.get(id(p), p.grad)
            if self.weight_decay:
                d = d + self.weight_decay * p
            if self.momentum:
                buffer = self.momentum_buffers.get(index)
                if buffer is None:
                    buffer = self.momentum_buffers[index] = d.detach().clone()
                else:
                    buffer.mul_(self.momentum).add_(d)
                d = buffer
            p.add_(d, alpha=-self.lr)

    # ------------------------------------------------------------------------------ factors

    @torch.no_grad()
    def initialize_factors(self, batches: Iterable[tuple[Tensor, Tensor]]) -> None:
        """Set the running factors to their mean over ``batches`` (a first estimate before training).

        As in :func:`curvlab.capture.factors.collect_factors`: the Monte-Carlo labels of batch ``k`` are drawn
        with the seed ``(seed, k)`` (:func:`curvlab.distributed.batch_seed`, a generator of their own:
        the training generator is left as it is); under ``torchrun`` each process takes every
        ``world_size``-th batch (:func:`curvlab.distributed.my_batches`) and the sums of all processes
        are added up, so every process gets the factors of all the batches. The model is called
        directly, not through ``forward_module``: the processes see different numbers of batches.
        """
        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device)
        self.accumulator.reset()
        self.accumulator.generator = generator
        try:
            with torch.enable_grad():
                for k, batch in distributed.my_batches(batches):
                    generator.manual_seed(distributed.batch_seed(self.seed, k))
                    with batch_context(k):
                        inputs, labels = self.task.split_batch(batch)
                        inputs, labels = self.task.move(inputs, device), self.task.move(labels, device)
                        self.accumulator.add_batch(inputs, labels)
        finally:
            self.accumulator.generator = self.generator
        self.accumulator.reduce()
        means = self.accumulator.means()
        self.num_factor_examples = self.accumulator.num_examples
        self.accumulator.reset()
        for name, (A_hat, S_hat) in means.items():
            entry = self.entries[name]
            entry.A = entry.S = None
            self._blend(entry, A_hat, S_hat, self.factor_decay)
            entry.eA = entry.eS = entry.QA = entry.QS = None

    def running_factors(self) -> FactorSet:
        """The running factors as a :class:`FactorSet` (docs/factors.md normalisation), for checkpoints."""
        layers: dict[str, LayerFactors] = {}
        for name, entry in self.entries.items():
            if entry.A is None:
                continue
            A, S = (_symmetric(x).cpu().numpy() for x in (entry.A, entry.S))
            layers[name] = layer_factors(entry.source, entry.adapter, A, S)
        attrs: dict[str, Any] = {"ema_decay": self.factor_decay, "damping": self.damping,
                                 "source": "kfac-running-average", **self.task.loss.to_attrs()}
        if self.fisher == "mc":
            attrs["mc_samples"] = self.mc_samples
        if self.kl_clip is not None:
            attrs["kl_clip"] = self.kl_clip
        return FactorSet(layers, fisher_type=self.fisher, num_examples=self.num_factor_examples, attrs=attrs,
                         coverage=self.coverage())

    def coverage(self) -> Coverage:
        """Which trainable parameters are preconditioned: those of the entries with running factors
        (the others take plain gradient steps; :mod:`curvlab.capture.coverage` says why)."""
        extra = {name: state.skipped or getattr(state, "coupled", None)
                 for name, state in self.accumulator.layers.items()
                 if state.skipped or getattr(state, "coupled", None)}
        used = {name for name, entry in self.entries.items() if entry.A is not None}
        return measure(self.model, self.accumulator.plan, used, extra)

    # ------------------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain numbers only (``torch.load(weights_only=True)`` reads it back)."""
        factors = {}
        for name, entry in self.entries.items():
            fields = {k: getattr(entry, k) for k in ("A", "S", "eA", "eS", "QA", "QS")}
            factors[name] = {k: v for k, v in fields.items() if v is not None}
        return {
            "steps": self.steps,
            "num_factor_examples": self.num_factor_examples,
            "loss_locations": self.loss_locations,
            "lr": self.lr,
            "generator": self.generator.get_state(),
            "factors": factors,
            "momentum": {str(i): b for i, b in self.momentum_buffers.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; raises :class:`CheckpointError` if it does not fit."""
        try:
            factors = state["factors"]
            momentum = state["momentum"]
            steps, examples = int(state["steps"]), int(state["num_factor_examples"])
            generator_state = state["generator"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"K-FAC state: missing or bad entry ({exc})") from None
        unknown = sorted(set(factors) - set(self.entries))
        if unknown:
            raise CheckpointError(f"K-FAC state: layer {unknown[0]} is not a K-FAC layer of the model")
        for name, entry in self.entries.items():
            saved = factors.get(name, {})
            for key in ("A", "S", "eA", "eS", "QA", "QS"):
                value = saved.get(key)
                setattr(entry, key, None if value is None else self._to_device(value, name, key))
            if entry.A is not None:
                self._check_shapes(name, entry)
        buffers = {}
        for key, value in momentum.items():
            index = int(key)
            if index >= len(self.params) or value.shape != self.params[index].shape:
                raise CheckpointError(f"K-FAC state: momentum buffer {key} does not fit the model")
            buffers[index] = value.to(self.params[index].device, self.params[index].dtype)
        self.momentum_buffers = buffers
        self.steps, self.num_factor_examples = steps, examples
        self.loss_locations = float(state.get("loss_locations", 1))
        self.lr = float(state.get("lr", self.lr))
        self.generator.set_state(generator_state.cpu())

    def _to_device(self, value: Tensor, name: str, key: str) -> Tensor:
        if not isinstance(value, Tensor):
            raise CheckpointError(f"K-FAC state: layer {name}: {key} is not a tensor")
        return value.to(device=self.entries[name].weight.device, dtype=self.accumulator.dtype)

    def _check_shapes(self, name: str, entry: _Entry) -> None:
        G = entry.adapter.to_matrix(entry.source, entry.weight, entry.bias)
        m, n = G.shape
        kinds = {1: "diagonal", 2: "dense", 3: "blocks"}
        expected = (entry.adapter.input_kind, getattr(entry.adapter, "output_kind", "dense"))
        if (kinds.get(entry.A.dim()), kinds.get(entry.S.dim())) != expected:
            raise CheckpointError(f"K-FAC state: layer {name}: factor kinds do not fit {expected}")
        size_a = entry.A.shape[0] * (entry.A.shape[1] if entry.A.dim() == 3 else 1)
        square = entry.A.dim() < 3 or entry.A.shape[1] == entry.A.shape[2]
        if size_a != n or entry.S.shape[0] != m or not square:
            raise CheckpointError(
                f"K-FAC state: layer {name}: factors of sizes {size_a}, {entry.S.shape[0]} do not "
                f"fit the layer's {n}, {m}"
            )


def _symmetric(x: Tensor) -> Tensor:
    return x if x.dim() == 1 else (x + x.transpose(-1, -2)) / 2


def _unique_trainable(model: nn.Module) -> list[nn.Parameter]:
    """The model's trainable parameters, each once (a tied weight appears once)."""
    seen: set[int] = set()
    out = []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out
