"""The losses at the logits, and for each the three Fisher types and the exact square root of its Hessian.

**Convention (one place for all losses).** The per-example loss ``ℓ_n`` is the *sum* of example ``n``'s
loss terms over its label locations (tokens, pixels) and, for ``mse`` and ``bce``, over its outputs.
Every Fisher in curvlab is the Fisher of ``ℓ_n`` averaged over the ``N`` examples that have at least
one counted label (docs/factors.md)::

    F = (1/N) Σ_n J_n^T H_n J_n,      H_n = ∂²ℓ_n / ∂z_n²   (the Hessian at the logits z_n)

and each Fisher type is an average of outer products ``Σ_k w_k u_k u_k^T`` of backpropagated
logit-gradient vectors ``u`` (``g = J^T u``): ``empirical`` the gradient of the loss with the true
label, ``mc`` the gradient with labels ``ŷ`` drawn from the model (k draws, weight ``1/k``), ``exact`` the
columns of a square root of ``H``. Per loss term (one location, or one output for mse/bce):

* ``cross-entropy``: ``−Σ_c q_c log p_c`` with ``p = softmax(z)`` and target ``q = (1 − ε) e_y + ε/C``;
  ``H = diag(p) − pp^T``; ``u = p − q`` / ``p − e_ŷ``, ``ŷ ~ Categorical(p)`` / columns ``√p_c (e_c − p)``,
  ``C`` per location;
* ``mse``: ``(z − y)²``; ``H = 2``; ``u = 2(z − y)`` / ``−√2 ε``, ``ε ~ N(0, 1)`` / ``√2 e_j``, one per
  output;
* ``bce``: ``−y log σ(z) − (1 − y) log σ(−z)``; ``H = σ(z)(1 − σ(z))``; ``u = σ − y`` / ``σ − ŷ``,
  ``ŷ ~ Bernoulli(σ)`` / ``√(σ_j (1 − σ_j)) e_j``, one per output.

Each loss is the negative log-likelihood of an exponential family in its natural parameter ``z``
(categorical, Gaussian with variance ½ — ``(z − y)² = −log N(y; z, ½) + const`` — and Bernoulli), so
``H`` does not depend on the label, the true Fisher equals the generalised Gauss-Newton matrix (GGN,
Martens 2014), ``mc`` is unbiased for it (``E_ŷ[u u^T] = H``: for mse ``ŷ = z + ε/√2`` gives
``u = 2(z − ŷ) = −√2 ε``) and ``exact`` gives it to rounding. With ``L`` locations the Hessian of
``ℓ_n`` is block diagonal (one block per location, and for mse/bce diagonal) and the exact square root
has one column per class and location (cross-entropy) or per output value (mse, bce): one backward pass
each, refused above :data:`EXACT_PASS_LIMIT` per batch.

* **Label smoothing** ``ε`` (cross-entropy): the smoothed loss ``−Σ q log p`` has the gradient ``p − q``
  and, since ``Σ_c q_c = 1``, the same Hessian ``diag(p) − pp^T`` as the unsmoothed one. So the GGN of
  the smoothed loss is the softmax Fisher: ``mc`` and ``exact`` are unchanged by ``ε``, and only the
  ``empirical`` Fisher (the outer products of the actual loss gradients ``p − q``) sees it.
* **ignore_index** (cross-entropy): a label equal to it is no loss term. It counts nowhere: its ``u``
  is 0 for every Fisher type (no sampled label, no exact column — a location ignored by every example
  of the batch costs no backward pass), and an example whose labels are all ignored is not one of the
  ``N`` examples (:meth:`Loss.example_mask`; the factors leave its inputs out of ``A`` too).
* **The training loss** is :meth:`Loss.mean`, torch's ``reduction="mean"``: ``Σ_n ℓ_n / K`` with ``K``
  the counted terms of the batch (:meth:`Loss.num_terms`: the counted labels for cross-entropy — what
  ``F.cross_entropy(..., ignore_index)`` divides by — and every output value for mse and bce, as
  ``F.mse_loss`` and ``F.binary_cross_entropy_with_logits`` do). Its Fisher is ``(N / K) F``, the scale
  the K-FAC optimizer applies (``T_loss = K / N``, docs/kfac.md). ``nn.MSELoss(reduction="sum") / N`` has
  exactly ``F``.

Monte-Carlo draws are taken for the whole batch at once (uniforms for categorical and Bernoulli labels
by inverse CDF, normals for the Gaussian; :mod:`curvlab.capture.sampling`), so a process holding rows
``offset … offset + n`` of a larger batch can draw the batch's and keep its rows, getting the labels a
single process would (``rows=(offset, total)``).

Bad inputs are one-line errors before any number is made (:meth:`Loss.check`): non-finite logits,
logits of shape ``(N,)`` or a 1-output head under cross-entropy (softmax over one class has zero
curvature: declare ``mse`` or ``bce``), labels outside ``[0, C)``, ``-100`` padding labels without
``ignore_index``, targets whose shape does not match the outputs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from curvlab.capture.sampling import batch_normals, batch_uniforms, sample_categorical
from curvlab.choices import FISHER_TYPES, LOSS_NAMES  # defined without torch, for the command line
from curvlab.errors import CheckpointError, DataError, NonFiniteOutputError, OptionError

__all__ = [
    "EXACT_PASS_LIMIT", "FISHER_TYPES", "LOSS_NAMES", "BinaryCrossEntropy", "CrossEntropy", "Loss",
    "MeanSquaredError", "batch_normals", "batch_uniforms", "exact_passes", "logit_gradient_samples",
    "loss_from_attrs", "loss_hessian", "make_loss", "sample_categorical",
]

#: The most backward passes per batch the exact Fisher may ask for (columns of the Hessian's square root).
EXACT_PASS_LIMIT = 4096
#: The label PyTorch's losses ignore by default: padding, in most language-model pipelines.
PADDING_LABEL = -100


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(int(v)) for v in t.shape) + (",)" if t.dim() == 1 else ")")


def _check_finite_logits(logits: Tensor) -> None:
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        kind = logits.dtype if isinstance(logits, Tensor) else type(logits).__name__
        raise OptionError(f"the model's outputs must be a floating-point tensor, got {kind}")
    if logits.dim() == 0:
        raise OptionError("the model's output is a scalar: curvlab needs one row of outputs per example")
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteOutputError("the model's outputs hold NaN or infinite values")


def _check_passes(passes: int, what: str) -> None:
    if passes > EXACT_PASS_LIMIT:
        raise OptionError(
            f"the exact Fisher of {what} takes {passes} backward passes per batch (one per column of the "
            f"Hessian's square root; at most {EXACT_PASS_LIMIT}); use the mc Fisher"
        )


class Loss:
    """A loss at the logits: its value, gradients, Hessian square root and Fisher samples.

    Subclasses: :class:`CrossEntropy`, :class:`MeanSquaredError`, :class:`BinaryCrossEntropy` (see the
    module docstring for their conventions). All take logits ``(B, ...)`` with the batch first; every
    method that takes ``labels`` accepts what :meth:`check` accepts.
    """

    name = ""

    def options(self) -> dict[str, Any]:
        """The options that define the loss beyond its name (recorded with the factors)."""
        return {}

    def to_attrs(self) -> dict[str, Any]:
        """Checkpoint step attributes: ``loss`` and ``loss_<option>`` (docs/format.md)."""
        return {"loss": self.name, **{f"loss_{k}": v for k, v in self.options().items()}}

    def describe(self) -> str:
        """``"cross-entropy (ignore_index=-100)"``: the name and its options, for messages."""
        opts = ", ".join(f"{k}={v}" for k, v in self.options().items())
        return f"{self.name} ({opts})" if opts else self.name

    # --- to be provided by each loss -----------------------------------------------------------------

    def check(self, logits: Tensor, labels: Tensor | None) -> Tensor | None:
        """The labels in this loss's form (targets cast to the logits' dtype), after checking logits and
        labels; one-line :class:`OptionError`/:class:`DataError` for what does not fit."""
        raise NotImplementedError

    def counted(self, labels: Tensor | None) -> Tensor | None:
        """Boolean mask of the counted label locations (``None``: every location counts)."""
        return None

    def per_example(self, logits: Tensor, labels: Tensor) -> Tensor:
        """``ℓ_n`` for every example, shape ``(B,)`` (logits and labels checked first)."""
        return self._per_example(logits, self.check(logits, labels))

    def _per_example(self, logits: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError

    def num_terms(self, logits: Tensor, labels: Tensor | None) -> int:
        """``K``: the loss terms of the batch that torch's ``reduction="mean"`` divides by."""
        raise NotImplementedError

    def gradient(self, logits: Tensor, labels: Tensor) -> Tensor:
        """``∂ℓ_n/∂z_n`` for every example (the empirical Fisher's ``u``), detached; ``labels`` as
        :meth:`check` returns them."""
        raise NotImplementedError

    def sampled_gradients(
        self, logits: Tensor, labels: Tensor | None, samples: int, generator: torch.Generator | None,
        rows: tuple[int, int] | None,
    ) -> Iterator[Tensor]:
        """``samples`` vectors ``u`` with labels drawn from the model; ``E[u u^T] = H`` each."""
        raise NotImplementedError

    def hessian_columns(self, logits: Tensor, labels: Tensor | None) -> Iterator[Tensor]:
        """The columns ``b`` of a square root ``H = Σ b b^T`` of every example's Hessian, batch-wide."""
        raise NotImplementedError

    def exact_passes(self, logits_shape: torch.Size | tuple[int, ...]) -> int:
        """Columns of :meth:`hessian_columns` (backward passes) when every label counts."""
        raise NotImplementedError

    def quadratic_form(self, logits: Tensor, u: Tensor, labels: Tensor | None = None) -> Tensor:
        """``u_n^T H_n u_n`` for every example, shape ``(B,)`` (float64 in, float64 out)."""
        raise NotImplementedError

    # --- shared ----------------------------------------------------------------------------------

    def example_mask(self, labels: Tensor | None) -> Tensor | None:
        """``(B,)`` True for the examples with at least one counted label (``None``: all of them)."""
        counted = self.counted(labels)
        if counted is None:
            return None
        return counted.reshape(counted.shape[0], -1).any(dim=1)

    def num_examples(self, logits: Tensor, labels: Tensor | None) -> int:
        """``N`` of this batch: the examples with a counted label."""
        mask = self.example_mask(labels)
        return int(logits.shape[0]) if mask is None else int(mask.sum())

    def mean(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The training loss, torch's ``reduction="mean"``: ``Σ_n ℓ_n / K`` (0 with a graph if ``K = 0``)."""
        labels = self.check(logits, labels)
        terms = self.num_terms(logits, labels)
        total = self._per_example(logits, labels).sum()
        return total / terms if terms else total * 0.0


@dataclass(frozen=True)
class CrossEntropy(Loss):
    """Softmax cross-entropy over the last dimension: logits ``(B, ..., C)``, integer labels ``(B, ...)``.

    ``ignore_index``: labels equal to it are no loss term (``None``: every label counts, and ``-100``
    is refused as the padding it usually is). ``label_smoothing`` ``ε ∈ [0, 1]``: the target is
    ``(1 − ε) e_y + ε/C`` (PyTorch's definition).
    """

    ignore_index: int | None = None
    label_smoothing: float = 0.0
    name = "cross-entropy"

    def __post_init__(self) -> None:
        if self.ignore_index is not None and (
            isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int)
        ):
            raise OptionError(f"ignore_index must be an integer, got {self.ignore_index!r}")
        smoothing = self.label_smoothing
        if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0 <= smoothing <= 1:
            raise OptionError(f"label_smoothing must be in [0, 1], got {smoothing!r}")
        object.__setattr__(self, "label_smoothing", float(smoothing))

    def options(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.ignore_index is not None:
            out["ignore_index"] = int(self.ignore_index)
        if self.label_smoothing:
            out["label_smoothing"] = self.label_smoothing
        return out

    def check(self, logits: Tensor, labels: Tensor | None) -> Tensor | None:
        _check_finite_logits(logits)
        if logits.dim() < 2:
            raise OptionError(
                f"logits of shape {_shape(logits)}: cross-entropy expects (batch, classes) or (batch, ..., "
                "classes); a regression or binary head needs --loss mse or --loss bce"
            )
        classes = int(logits.shape[-1])
        if classes < 2:
            raise OptionError(
                f"the model has {classes} output per location (logits {_shape(logits)}): not a classifier "
                "(softmax over one class has no curvature, S = 0); declare the loss: --loss mse for "
                "regression, --loss bce for a binary label"
            )
        if labels is None:
            return None
        if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex() \
                or labels.dtype == torch.bool:
            kind = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
            raise DataError(f"cross-entropy labels must be integer class indices, got {kind}")
        if tuple(labels.shape) != tuple(logits.shape[:-1]):
            raise DataError(
                f"labels of shape {_shape(labels)} do not fit logits {_shape(logits)}: cross-entropy expects "
                f"labels of shape {_shape(logits[..., 0])} (one class index per example and location)"
            )
        counted = self.counted(labels)
        values = labels if counted is None else labels[counted]
        if values.numel():
            low, high = int(values.min()), int(values.max())
            if self.ignore_index is None and bool((values == PADDING_LABEL).any()):
                raise DataError(
                    f"labels hold {PADDING_LABEL} (padding) but no ignore_index is set: pass --ignore-index "
                    f"{PADDING_LABEL} (ignore_index={PADDING_LABEL}) to leave them out of the loss and the "
                    "Fisher"
                )
            if low < 0 or high >= classes:
                bad = low if low < 0 else high
                raise DataError(f"labels must be in [0, {classes}) for {classes} classes, found {bad}")
        return labels

    def counted(self, labels: Tensor | None) -> Tensor | None:
        if labels is None or self.ignore_index is None:
            return None
        return labels != self.ignore_index

    def _targets(self, probs_like: Tensor, labels: Tensor) -> Tensor:
        """``q = (1 − ε) e_y + ε/C`` (0 at ignored locations' labels, which are masked anyway)."""
        classes = probs_like.shape[-1]
        safe = labels.clamp(0, classes - 1) if self.ignore_index is not None else labels
        q = F.one_hot(safe, classes).to(probs_like.dtype)
        if self.label_smoothing:
            q = q * (1 - self.label_smoothing) + self.label_smoothing / classes
        return q

    def _mask(self, u: Tensor, labels: Tensor | None) -> Tensor:
        counted = self.counted(labels)
        return u if counted is None else u * counted.unsqueeze(-1).to(u.dtype)

    def _per_example(self, logits: Tensor, labels: Tensor) -> Tensor:
        terms = -(self._targets(logits, labels) * torch.log_softmax(logits, dim=-1)).sum(-1)
        counted = self.counted(labels)
        if counted is not None:
            terms = terms * counted.to(terms.dtype)
        return terms.reshape(terms.shape[0], -1).sum(-1)

    def num_terms(self, logits: Tensor, labels: Tensor | None) -> int:
        counted = self.counted(labels)
        return math.prod(logits.shape[:-1]) if counted is None else int(counted.sum())

    def gradient(self, logits: Tensor, labels: Tensor) -> Tensor:
        if labels is None:
            raise OptionError("the empirical Fisher needs labels")
        probs = torch.softmax(logits.detach(), dim=-1)
        return self._mask(probs - self._targets(probs, labels), labels)

    def sampled_gradients(self, logits, labels, samples, generator, rows):
        probs = torch.softmax(logits.detach(), dim=-1)
        uniforms = batch_uniforms(probs.shape[:-1], samples, rows, generator, probs.device)
        for k in range(samples):
            sampled = sample_categorical(probs, uniforms[k])
            yield self._mask(probs - F.one_hot(sampled, probs.shape[-1]).to(probs.dtype), labels)

    def exact_passes(self, logits_shape) -> int:
        return math.prod(logits_shape[1:])

    def hessian_columns(self, logits, labels):
        """Column ``(l, c)`` is ``√p_lc (e_c − p_l)`` at location ``l`` and zero elsewhere.

        The loss of an example is the sum over its locations ``l``, so its Hessian is block diagonal,
        one ``C × C`` block per location: ``C × L`` columns, one backward pass each, for all examples at
        once. (Backpropagating class ``c``'s column from all locations at once would add the
        cross-location products ``Σ_c b_lc b_l'c^T``, ``l ≠ l'``, which are not zero: not the Fisher.)
        ``B = diag(√p) − p √p^T`` is a square root of ``diag(p) − pp^T`` because ``Σ p = 1``. A location
        ignored by every example of the batch gets no column.
        """
        probs = torch.softmax(logits.detach(), dim=-1)
        classes = probs.shape[-1]
        flat_p = probs.reshape(probs.shape[0], -1, classes)
        locations = flat_p.shape[1]
        counted = self.counted(labels)
        flat_mask = None if counted is None else counted.reshape(counted.shape[0], -1).to(probs.dtype)
        active = range(locations) if flat_mask is None else flat_mask.any(dim=0).nonzero().flatten().tolist()
        _check_passes(
            len(active) * classes,
            f"logits with {len(active)} counted locations and {classes} classes per example",
        )
        flat_sqrt = flat_p.sqrt()
        for loc in active:
            for c in range(classes):
                column = torch.zeros_like(flat_p) if locations > 1 else torch.empty_like(flat_p)
                column[:, loc] = -flat_sqrt[:, loc, c : c + 1] * flat_p[:, loc]
                column[:, loc, c] += flat_sqrt[:, loc, c]
                if flat_mask is not None:
                    column[:, loc] *= flat_mask[:, loc : loc + 1]
                yield column.reshape(probs.shape)

    def quadratic_form(self, logits, u, labels=None):
        p = torch.softmax(logits, dim=-1)
        per_location = (p * u * u).sum(-1) - (p * u).sum(-1) ** 2
        counted = self.counted(labels)
        if counted is not None:
            per_location = per_location * counted.to(per_location.dtype)
        return per_location.reshape(per_location.shape[0], -1).sum(-1)


class _ElementwiseLoss(Loss):
    """mse and bce: every output value is a loss term of its own (a diagonal Hessian)."""

    def check(self, logits: Tensor, labels: Tensor | None) -> Tensor | None:
        _check_finite_logits(logits)
        if labels is None:
            return None
        if not isinstance(labels, Tensor) or labels.is_complex():
            raise DataError(f"{self.name} targets must be a real tensor, got {type(labels).__name__}")
        if tuple(labels.shape) != tuple(logits.shape):
            one_output = logits.dim() >= 2 and logits.shape[-1] == 1
            if one_output and tuple(labels.shape) == tuple(logits.shape[:-1]):
                labels = labels.unsqueeze(-1)  # (B, ...) targets of a (B, ..., 1) head
            else:
                raise DataError(
                    f"{self.name} targets of shape {_shape(labels)} do not fit outputs {_shape(logits)}: "
                    "they "
                    f"must have the outputs' shape (or {_shape(logits[..., 0])} for a head with 1 output)"
                )
        labels = labels.to(logits.dtype)
        if not bool(torch.isfinite(labels).all()):
            raise DataError(f"{self.name} targets hold NaN or infinite values")
        return labels

    def num_terms(self, logits: Tensor, labels: Tensor | None) -> int:
        return logits.numel()

    def exact_passes(self, logits_shape) -> int:
        return math.prod(logits_shape[1:])

    def _diagonal(self, logits: Tensor) -> Tensor:
        """The Hessian's diagonal at every output (the Hessian is diagonal)."""
        raise NotImplementedError

    def hessian_columns(self, logits, labels):
        """Column ``j`` is ``√h_j e_j`` (``h`` the Hessian's diagonal), one per output value of an example."""
        root = self._diagonal(logits.detach()).sqrt()
        flat = root.reshape(root.shape[0], -1)
        _check_passes(flat.shape[1], f"outputs with {flat.shape[1]} values per example ({self.name})")
        for j in range(flat.shape[1]):
            column = torch.zeros_like(flat)
            column[:, j] = flat[:, j]
            yield column.reshape(root.shape)

    def quadratic_form(self, logits, u, labels=None):
        per_output = self._diagonal(logits) * u * u
        return per_output.reshape(per_output.shape[0], -1).sum(-1)


@dataclass(frozen=True)
class MeanSquaredError(_ElementwiseLoss):
    """Squared error ``ℓ_n = Σ (z − y)²`` over every output (Gaussian likelihood with variance ½).

    ``H = 2I``. The factors are the Fisher of this per-example sum averaged over examples, i.e. of
    ``nn.MSELoss(reduction="sum") / N``; torch's default ``reduction="mean"`` (the training loss,
    :meth:`mean`) divides by every output value instead, and its Fisher is ``F / (outputs per example)``.
    """

    name = "mse"

    def _diagonal(self, logits: Tensor) -> Tensor:
        return torch.full_like(logits, 2.0)

    def _per_example(self, logits: Tensor, labels: Tensor) -> Tensor:
        errors = (logits - labels) ** 2
        return errors.reshape(errors.shape[0], -1).sum(-1)

    def gradient(self, logits: Tensor, labels: Tensor) -> Tensor:
        if labels is None:
            raise OptionError("the empirical Fisher needs targets")
        return 2 * (logits.detach() - labels)

    def sampled_gradients(self, logits, labels, samples, generator, rows):
        """``ŷ = z + ε/√2`` (the model's Gaussian), ``u = 2(z − ŷ) = −√2 ε``."""
        normals = batch_normals(logits.shape, samples, rows, generator, logits.device)
        for k in range(samples):
            yield (-math.sqrt(2.0) * normals[k]).to(logits.dtype)


@dataclass(frozen=True)
class BinaryCrossEntropy(_ElementwiseLoss):
    """Binary cross-entropy with logits, every output an independent Bernoulli label (multi-label).

    Targets in ``[0, 1]`` (probabilities allowed, as in ``F.binary_cross_entropy_with_logits``), of the
    outputs' shape. ``H = diag(σ(z)(1 − σ(z)))``.
    """

    name = "bce"

    def check(self, logits: Tensor, labels: Tensor | None) -> Tensor | None:
        labels = super().check(logits, labels)
        if labels is not None and labels.numel() and (float(labels.min()) < 0 or float(labels.max()) > 1):
            bad = float(labels.min()) if float(labels.min()) < 0 else float(labels.max())
            raise DataError(f"bce targets must be in [0, 1] (labels or probabilities), found {bad:g}")
        return labels

    def _diagonal(self, logits: Tensor) -> Tensor:
        p = torch.sigmoid(logits)
        return p * (1 - p)

    def _per_example(self, logits: Tensor, labels: Tensor) -> Tensor:
        terms = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        return terms.reshape(terms.shape[0], -1).sum(-1)

    def gradient(self, logits: Tensor, labels: Tensor) -> Tensor:
        if labels is None:
            raise OptionError("the empirical Fisher needs targets")
        return torch.sigmoid(logits.detach()) - labels

    def sampled_gradients(self, logits, labels, samples, generator, rows):
        """``ŷ_j = 1`` when ``U_j < σ(z_j)`` (``U ~ U[0, 1)``), ``u = σ − ŷ``."""
        probs = torch.sigmoid(logits.detach())
        uniforms = batch_uniforms(probs.shape, samples, rows, generator, probs.device)
        for k in range(samples):
            yield probs - (uniforms[k] < probs.to(torch.float64)).to(probs.dtype)


_LOSSES: dict[str, type[Loss]] = {
    "cross-entropy": CrossEntropy, "mse": MeanSquaredError, "bce": BinaryCrossEntropy,
}
assert tuple(_LOSSES) == LOSS_NAMES


def make_loss(
    name: str = "cross-entropy", *, ignore_index: int | None = None, label_smoothing: float = 0.0
) -> Loss:
    """The loss ``name`` (:data:`LOSS_NAMES`) with its options; one-line :class:`OptionError` otherwise."""
    if name not in _LOSSES:
        raise OptionError(f"unknown loss {name!r}: choose one of {', '.join(LOSS_NAMES)}")
    if name != "cross-entropy":
        if ignore_index is not None:
            raise OptionError(f"--ignore-index is an option of cross-entropy, not of {name}")
        if label_smoothing:
            raise OptionError(f"--label-smoothing is an option of cross-entropy, not of {name}")
        return _LOSSES[name]()
    return CrossEntropy(ignore_index=ignore_index, label_smoothing=label_smoothing)


def loss_from_attrs(attrs: Mapping[str, Any], where: str = "") -> Loss:
    """The loss a checkpoint step records (``loss``, ``loss_ignore_index``, ``loss_label_smoothing``);
    a step without ``loss`` (files before it was recorded) means plain softmax cross-entropy."""
    prefix = f"{where}: " if where else ""
    name = attrs.get("loss", "cross-entropy")
    unknown = sorted(k for k in attrs if k.startswith("loss_") and k not in ("loss_ignore_index",
                                                                            "loss_label_smoothing"))
    if not isinstance(name, str) or name not in _LOSSES:
        raise CheckpointError(f"{prefix}unknown loss {name!r} (known: {', '.join(LOSS_NAMES)})")
    if unknown:
        raise CheckpointError(f"{prefix}unknown loss option {unknown[0]!r}")
    options: dict[str, Any] = {}
    if "loss_ignore_index" in attrs:
        value = attrs["loss_ignore_index"]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise CheckpointError(f"{prefix}loss_ignore_index {value!r} is not an integer")
        options["ignore_index"] = int(value)
    if "loss_label_smoothing" in attrs:
        value = attrs["loss_label_smoothing"]
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise CheckpointError(f"{prefix}loss_label_smoothing {value!r} is not a number")
        options["label_smoothing"] = float(value)
    try:
        return make_loss(name, **options)
    except OptionError as exc:
        raise CheckpointError(f"{prefix}{exc}") from None


def logit_gradient_samples(
    logits: Tensor,
    labels: Tensor | None,
    fisher_type: str,
    *,
    loss: Loss | None = None,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    rows: tuple[int, int] | None = None,
) -> Iterator[tuple[Tensor, float]]:
    """Yield ``(u, weight)``: logit-gradient vectors whose weighted outer products give the Fisher.

    ``sum_k weight_k * u_k u_k^T`` is, per example, ``∇ℓ ∇ℓ^T`` (empirical), a k-sample Monte-Carlo
    estimate of ``H`` (mc) or exactly ``H`` (exact) of ``loss`` (default: softmax cross-entropy). The
    logits and labels are checked first (:meth:`Loss.check`); labels are needed by ``empirical`` and,
    for ``ignore_index``, by all three.

    ``rows=(offset, total)`` (mc only): the ``n`` examples of ``logits`` are examples
    ``offset … offset + n - 1`` of a batch of ``total``; the draws of all ``total`` examples are made
    from ``generator`` and this slice's are used, so the labels, and the generator's state after, do
    not depend on how the batch is split across processes. Default ``(0, n)``.
    """
    loss = CrossEntropy() if loss is None else loss
    if fisher_type not in FISHER_TYPES:
        raise OptionError(f"unknown Fisher type {fisher_type!r}; choose one of {FISHER_TYPES}")
    labels = loss.check(logits, labels)
    if fisher_type == "empirical":
        if labels is None:
            raise OptionError("the empirical Fisher needs labels")
        yield loss.gradient(logits, labels), 1.0
    elif fisher_type == "mc":
        for u in loss.sampled_gradients(logits, labels, mc_samples, generator, rows):
            yield u, 1.0 / mc_samples
    else:
        for u in loss.hessian_columns(logits, labels):
            yield u, 1.0


def exact_passes(logits_shape: torch.Size | tuple[int, ...], loss: Loss | None = None) -> int:
    """Backward passes of the exact Fisher for logits ``(B, ...)`` when every label counts: ``C ×
    locations`` for cross-entropy (the default), the output values per example for mse and bce."""
    return (CrossEntropy() if loss is None else loss).exact_passes(logits_shape)


def hessian_vector_product(logits: Tensor, u: Tensor) -> Tensor:
    """``H u`` at every location, ``H = diag(p) − p p^T``: ``p ∘ u − p (p^T u)``, shape of ``logits``.

    The Hessian of the per-example loss (summed over its locations) is block diagonal over the
    locations, so this is the whole ``H`` of an example applied to ``u``; the GGN-vector product
    ``J^T H J v`` (:mod:`curvlab.analysis.ggn`) needs nothing else of the loss.
    """
    p = torch.softmax(logits, dim=-1)
    return p * u - p * (p * u).sum(-1, keepdim=True)


def loss_hessian(logits: Tensor) -> Tensor:
    """``diag(p) - p p^T`` per location, shape ``(..., C, C)``: softmax cross-entropy (for tests)."""
    probs = torch.softmax(logits, dim=-1)
    return torch.diag_embed(probs) - probs.unsqueeze(-1) * probs.unsqueeze(-2)
