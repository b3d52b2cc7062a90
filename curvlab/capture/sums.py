"""Running sums of one factor entry over batches (what :class:`~curvlab.capture.factors.FactorAccumulator`
keeps per entry), written on the normal form of :mod:`curvlab.capture.layers`.

* :class:`_LayerState` — a Linear, convolution, Embedding or attention projection: ``Σ a a^T`` (or the
  token counts) at every call, and per Fisher sample ``Σ_calls Σ_t g g^T`` divided by the example's
  locations of all calls (a module called several times has its calls as locations, docs/factors.md);
* :class:`_TiedState` — the tied embedding / pre-softmax weight (seed eq. 16): both uses' terms pooled;
* :class:`_NormState` — a normalisation layer's ``(γ, β)``: per-channel ``Σ_n r_nc r_nc^T``, ``r_nc =
  Σ_calls Σ_t g_nct [x̂_nct, 1]`` (:mod:`curvlab.capture.norms`).

An entry can be set aside for good (:func:`_discard`: an input that is not batch first, an output that
depends on nothing trainable); the reason goes to the coverage report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.capture import layers as layer_math
from curvlab.capture.norms import NormAdapter, batch_coupled
from curvlab.errors import LayerError

FactorSource = nn.Module | layer_math.TiedPair | layer_math.Projection


@dataclass
class _LayerState:
    """Running sums of one entry: ``Σ a a^T`` (or its diagonal) and ``Σ_n (1/T) Σ_t g g^T``.

    A module called several times in a forward pass adds each call's locations: its calls are
    locations (docs/factors.md), so a sample's ``S`` term is ``Σ_calls Σ_t g g^T`` divided by the
    example's total number of locations ``Σ_calls T``.
    """

    name: str
    module: FactorSource
    adapter: Any
    A_sum: Tensor | None = None
    S_sum: Tensor | None = None
    outputs: list[tuple[str, Tensor]] = field(default_factory=list)
    skipped: str | None = None

    def on_forward(self, role: str, x: Tensor, output: Tensor, dtype: torch.dtype) -> None:
        self.A_sum = _add(self.A_sum, self.adapter.input_second_moment(self.module, x), dtype)
        self.outputs.append((role, output))

    def on_sample(self, grads: Sequence[Tensor], weight: float, dtype: torch.dtype) -> None:
        """One Fisher sample's output gradients at every recorded call of the entry."""
        total, locations = None, 0
        for grad in grads:
            g = self.adapter.output_grads(self.module, grad)
            total = _add(total, layer_math.output_moment_sum(g), dtype)
            locations += g.shape[1]
        if locations:
            self.S_sum = _add(self.S_sum, total * (weight / locations), dtype)

    def end_batch(self) -> None:
        self.outputs.clear()

    def mean(self, count: int) -> tuple[Tensor, Tensor]:
        return _mean(self.A_sum, count), _mean(self.S_sum, count)


@dataclass
class _TiedState:
    """Running sums of a tied embedding / pre-softmax weight (seed eq. 16, docs/factors.md).

    ``A_sum`` is ``Σ_n Σ_k u u^T`` over the terms ``k`` of both sources. ``S`` needs each example's
    V-side sum divided by its number of terms ``P`` (tokens of the Linear plus tokens of the
    Embedding), which is known only once the whole forward pass is seen: the batch's V-side sum is
    kept in ``batch_S`` and ``P`` in ``batch_terms`` until :meth:`end_batch` (every example of a batch
    has the same ``P``).
    """

    name: str
    module: layer_math.TiedPair
    adapter: layer_math.TiedEmbeddingAdapter
    A_sum: Tensor | None = None
    S_sum: Tensor | None = None
    outputs: list[tuple[str, Tensor]] = field(default_factory=list)
    batch_S: Tensor | None = None
    batch_terms: int = 0
    skipped: str | None = None

    def on_forward(self, role: str, x: Tensor, output: Tensor, dtype: torch.dtype) -> None:
        if role == "linear":
            moment, terms = self.adapter.linear_input_moment(self.module, x)
            self.A_sum = _add(self.A_sum, moment, dtype)
        else:
            counts, terms = self.adapter.embedding_input_moment(self.module, x)
            self.batch_S = _add(self.batch_S, counts, dtype)
        self.batch_terms += terms
        self.outputs.append((role, output))

    def on_sample(self, grads: Sequence[Tensor], weight: float, dtype: torch.dtype) -> None:
        for (role, _), grad in zip(self.outputs, grads, strict=True):
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

    def mean(self, count: int) -> tuple[Tensor, Tensor]:
        return _mean(self.A_sum, count), _mean(self.S_sum, count)


@dataclass
class _NormState:
    """Running sums of a normalisation layer's ``(γ, β)``: ``Σ_n Σ_u w_u r_nc r_nc^T`` per channel, with
    ``r_nc = Σ_calls Σ_t g_nct [x̂_nct, 1]`` (:mod:`curvlab.capture.norms`). ``S`` is the constant ``[1]``.

    ``batch_norm``: ``"error"`` refuses batch norm that normalises with batch statistics (training
    mode) with a one-line :class:`~curvlab.errors.LayerError`; ``"skip"`` records nothing while it does
    and keeps the reason in ``coupled`` (the K-FAC optimizer's choice).
    """

    name: str
    module: nn.Module
    adapter: NormAdapter
    batch_norm: str = "error"
    A_sum: Tensor | None = None
    S_sum: Tensor | None = None
    outputs: list[tuple[str, Tensor]] = field(default_factory=list)
    inputs: list[Tensor] = field(default_factory=list)
    checked: bool = False
    skipped: str | None = None
    coupled: str | None = None  # batch norm seen normalising with batch statistics ("skip" mode)

    def refuse_batch_statistics(self) -> str | None:
        """In ``"error"`` mode a :class:`~curvlab.errors.LayerError` if the module normalises with batch
        statistics now; in ``"skip"`` mode the reason (``None``: it does not)."""
        reason = batch_coupled(self.module)
        if reason is not None and self.batch_norm == "error":
            raise LayerError(f"layer {self.name}: {reason}: call model.eval() before capturing factors")
        return reason

    def on_forward(self, role: str, x: Tensor, output: Tensor, dtype: torch.dtype) -> None:
        reason = self.refuse_batch_statistics()
        if reason is not None:
            self.coupled = reason
            return
        x_hat = self.adapter.inputs(self.module, x)
        if not self.checked:
            self.adapter.check_output(self.module, x_hat, output, self.name)
            self.checked = True
        self.inputs.append(x_hat)
        self.outputs.append((role, output))

    def on_sample(self, grads: Sequence[Tensor], weight: float, dtype: torch.dtype) -> None:
        r = None
        for x_hat, grad in zip(self.inputs, grads, strict=True):
            term = self.adapter.terms(self.module, x_hat, self.adapter.output_grads(self.module, grad))
            r = term if r is None else r + term
        self.A_sum = _add(self.A_sum, self.adapter.block_moment(r.to(dtype)) * weight, dtype)

    def end_batch(self) -> None:
        self.outputs.clear()
        self.inputs.clear()

    def mean(self, count: int) -> tuple[Tensor, Tensor]:
        A = self.A_sum / count
        return (A + A.transpose(1, 2)) / 2, torch.ones(1, dtype=A.dtype, device=A.device)


_State = _LayerState | _TiedState | _NormState


def _discard(state: _State, reason: str) -> None:
    """Set an entry aside for good: no factors, ``reason`` in the coverage report."""
    state.skipped = reason
    state.A_sum = state.S_sum = None
    state.end_batch()


def _state(name: str, source: FactorSource, adapter: Any, batch_norm: str) -> _State:
    if isinstance(source, layer_math.TiedPair):
        return _TiedState(name, source, adapter)
    if isinstance(adapter, NormAdapter):
        return _NormState(name, source, adapter, batch_norm)
    return _LayerState(name, source, adapter)


def _why_skipped(state: _State) -> str | None:
    """Why an entry has no factors, if it was set aside (None: it was just not used)."""
    return state.skipped or getattr(state, "coupled", None)


def _seen(state: _State) -> bool:
    """Whether an entry has statistics (it was used in a recorded forward pass)."""
    return state.A_sum is not None and (state.S_sum is not None or isinstance(state, _NormState))


def _mean(total: Tensor, count: int) -> Tensor:
    """``total / count``, symmetrised for a dense factor (see :func:`_symmetric_mean`)."""
    return total / count if total.dim() == 1 else _symmetric_mean(total, count)


def _symmetric_mean(total: Tensor, count: int) -> Tensor:
    """``(X + X^T) / (2 count)``: BLAS products ``x^T x`` in float32 are symmetric only to rounding."""
    return (total + total.T) / (2 * count)


def _add(total: Tensor | None, term: Tensor, dtype: torch.dtype) -> Tensor:
    term = term.to(dtype)
    return term if total is None else total.add_(term)
