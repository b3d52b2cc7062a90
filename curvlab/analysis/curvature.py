"""Curvature along chosen weight directions: ``v^T F v`` from Jacobian-vector products.

For every loss of :mod:`curvlab.capture.loss` the true Fisher equals the generalised Gauss-Newton
matrix, ``F = (1/N) Σ_n J_n^T H_n J_n`` with ``J_n`` the Jacobian of example ``n``'s logits w.r.t. the
parameters and ``H_n`` the Hessian of its loss at the logits (block diagonal over the example's
locations): ``diag(p) − pp^T`` per location for softmax cross-entropy, ``2I`` for squared error,
``diag(σ(1 − σ))`` for binary cross-entropy. A Fisher/GGN-vector product (Schraudolph 2002) is
``J^T H J v`` — a jvp and a vjp — but the quadratic form needs only the forward half:

    v^T F v = (1/N) Σ_n u_n^T H_n u_n,     u_n = J_n v
            (cross-entropy: u^T H u = Σ_c p_c u_c² − (Σ_c p_c u_c)² per location),

one forward-mode pass (``torch.func.jvp``) per direction and batch, with no backward pass at all.
Labels equal to the loss's ``ignore_index`` add nothing, and ``N`` counts the examples with a counted
label (:meth:`curvlab.capture.loss.Loss.quadratic_form`, :meth:`~curvlab.capture.loss.Loss.num_examples`).
The model is run through the :class:`~curvlab.capture.task.Task` (tuple or dict inputs, dict outputs).
Where an operation has no forward-mode derivative (PyTorch's fused attention on the CPU, for one),
``J v`` is taken by the double-backward identity ``J v = ∂/∂w [w ↦ ⟨J^T w, v⟩]`` instead: two
reverse passes, same numbers.

Directions are weight perturbations of one entry, given as the ``m × n`` matrix of design.md (bias as
the last column); the entry's adapter (:mod:`curvlab.capture.layers`) turns one into parameter tangents
(:func:`parameter_tangents`). For a tied embedding / pre-softmax weight the layer is the pre-softmax
Linear (``W = E``) and the tangent moves the one shared Parameter, in both of its uses; for an
attention projection it moves the projection's rows of the packed ``in_proj_weight``/``in_proj_bias``
(the other rows' tangents are zero); for a ``NormAffine`` entry the ``1 × C·k`` matrix is
``[γ_1, β_1, γ_2, β_2, ...]``. The forward pass goes through the same visible attention forward as
capture does (so jvp sees the projections PyTorch's fused kernels would hide, and gets the same
numbers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvlab import distributed
from curvlab.capture.attention import tap, unsupported
from curvlab.capture.factors import select_layers
from curvlab.capture.layers import adapter_for
from curvlab.capture.task import Task, batch_context, default_task


def split_weight_matrix(module: nn.Module, matrix: Tensor) -> dict[str, Tensor]:
    """The ``weight`` (and ``bias``) tangents of a layer from an ``m × n`` direction matrix."""
    adapter = adapter_for(module)
    if adapter is None:
        raise ValueError(f"{type(module).__name__} has no K-FAC adapter")
    weight, bias = adapter.from_matrix(module, matrix)
    return {"weight": weight} if bias is None else {"weight": weight, "bias": bias}


def parameter_tangents(source: object, adapter: object, matrix: Tensor) -> list[tuple[Tensor, Tensor]]:
    """``(Parameter, tangent)`` of an entry's Parameters from an ``m × n`` direction matrix: tangents
    are shaped like the whole Parameter, zero outside the rows the entry uses."""
    params = adapter.parameters(source)
    pieces = adapter.from_matrix(source, matrix)
    out = []
    for param, rows, piece in zip(params, adapter.rows(source), pieces, strict=True):
        if param is None:
            continue
        if rows is None:
            tangent = piece.reshape(param.shape)
        else:
            tangent = torch.zeros(param.shape, dtype=piece.dtype, device=piece.device)
            tangent[rows] = piece
        out.append((param, tangent))
    return out


def quadratic_form_at_logits(logits: Tensor, u: Tensor) -> Tensor:
    """``Σ_locations u^T (diag(p) − p p^T) u``, per example (logits ``(B, ..., C)``): softmax
    cross-entropy's; other losses: :meth:`curvlab.capture.loss.Loss.quadratic_form`."""
    from curvlab.capture.loss import CrossEntropy

    return CrossEntropy().quadratic_form(logits, u)


def _jvp_reverse(fn: Callable[..., Tensor], primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...]):
    """``(fn(*primals), J v)`` by double backward, for operations without forward-mode AD."""
    with torch.enable_grad():
        params = tuple(p.detach().requires_grad_(True) for p in primals)
        out = fn(*params)
        dummy = torch.zeros_like(out, requires_grad=True)
        grads = torch.autograd.grad(out, params, grad_outputs=dummy, create_graph=True)
        inner = sum((g * t).sum() for g, t in zip(grads, tangents, strict=True))
        (jv,) = torch.autograd.grad(inner, dummy)
    return out.detach(), jv


def directional_curvature(
    model: nn.Module,
    layer: str,
    directions: Sequence[Tensor],
    batches: Iterable[Any],
    *,
    task: Task | None = None,
) -> Tensor:
    """``v^T F v`` of the true Fisher (= GGN) for each ``m × n`` direction of ``layer`` (float64).

    ``batches`` and ``task`` as in :func:`curvlab.capture.factors.collect_factors` (the labels only
    mark ignored ones). Under ``torchrun`` each process takes every ``world_size``-th batch and the sums
    are all-reduced (:mod:`curvlab.distributed`); every process returns the mean over all the data.
    """
    task = default_task(task)
    entries = select_layers(model)
    if layer not in entries:
        raise ValueError(f"layer {layer} is not a layer of the model with K-FAC factors")
    source, adapter = entries[layer]
    device = next(model.parameters()).device
    name_of = {id(p): name for name, p in model.named_parameters()}
    params = {k: v.detach() for k, v in model.named_parameters()}
    dtype = adapter.parameters(source)[0].dtype
    per_direction = [
        parameter_tangents(source, adapter, d.to(device=device, dtype=dtype)) for d in directions
    ]
    names = {name_of[id(p)]: name_of[id(p)] for p, _ in per_direction[0]} if per_direction else {}
    primals = tuple(params[full] for full in names)
    tangents = [tuple(t for _, t in pairs) for pairs in per_direction]
    totals = torch.zeros(len(directions), dtype=torch.float64, device=device)
    count = 0
    forward_mode = True
    # Fused attention kernels have neither forward-mode nor double-backward derivatives; the math
    # kernel is made of ordinary differentiable operations.
    with sdpa_kernel(SDPBackend.MATH), _visible_attention(model):
        for k, batch in distributed.my_batches(batches):
            with batch_context(k):
                inputs, labels = task.split_batch(batch)
                inputs, labels = task.move(inputs, device), task.move(labels, device)
                logits_of = logits_of_factory(model, params, names, inputs, task)
                forward_mode, examples = _accumulate_batch(
                    logits_of, primals, tangents, totals, forward_mode, task.loss, labels
                )
            count += examples
    counts = torch.tensor([count], dtype=torch.int64, device=device)
    distributed.all_reduce_sum([totals, counts], f"adding up the curvature of layer {layer}")
    return totals / int(counts.item())


@contextlib.contextmanager
def _visible_attention(model: nn.Module) -> Iterator[None]:
    """Every ``nn.MultiheadAttention`` of the model runs its visible forward (as in capture)."""
    handles = [
        tap(module, "out", lambda x, out: None) for module in model.modules()
        if isinstance(module, nn.MultiheadAttention) and unsupported(module) is None
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _TaskModel(nn.Module):
    """``inputs -> logits`` through the task, as one module (so ``functional_call`` can swap its
    parameters, which it names ``model.<name>``)."""

    def __init__(self, model: nn.Module, task: Task) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, inputs: Any) -> Tensor:
        return self.task.forward(self.model, inputs)


def logits_of_factory(
    model: nn.Module, params: dict, names: dict, inputs: Any, task: Task | None = None
) -> Callable[..., Tensor]:
    """``layer params -> logits`` on ``inputs`` with every other parameter fixed."""
    wrapped = _TaskModel(model, default_task(task))

    def logits_of(*layer_params: Tensor) -> Tensor:
        replaced = dict(params, **dict(zip(names.values(), layer_params, strict=True)))
        return functional_call(wrapped, {f"model.{k}": v for k, v in replaced.items()}, (inputs,))

    return logits_of


def _accumulate_batch(
    logits_of, primals, tangents, totals: Tensor, forward_mode: bool, loss: Any, labels: Any
) -> tuple[bool, int]:
    """Add ``Σ_n u_n^T H_n u_n`` of one batch for every direction; returns whether jvp still works and
    the batch's number of examples (with a counted label)."""
    examples = 0
    for k, tangent in enumerate(tangents):
        if forward_mode:
            try:
                logits, u = jvp(logits_of, primals, tangent)
            except (RuntimeError, NotImplementedError):
                forward_mode = False  # an operation without a forward-mode derivative
        if not forward_mode:
            logits, u = _jvp_reverse(logits_of, primals, tangent)
        if k == 0:  # the same logits for every direction: check them and count the examples once
            labels = loss.check(logits, labels)
            examples = loss.num_examples(logits, labels)
        totals[k] += loss.quadratic_form(logits.double(), u.double(), labels).sum()
    return forward_mode, examples
