"""Per-example gradients in the Kronecker-factored eigenbasis: mean, variance and curvature (seed E.2).

(One concept at about 600 lines: the projection of every entry kind — dense, tied, attention rows,
norm blocks — with its sums; the basis is :mod:`curvlab.analysis.basis`, a command run
:mod:`curvlab.analysis.gradcov_run`.)

For a layer with K-FAC factors ``A = Q_A diag(λ_A) Q_A^T`` and ``S = Q_S diag(λ_S) Q_S^T``, direction
``(i, j)`` is the weight perturbation ``Q_S[:, i] Q_A[:, j]^T`` with K-FAC eigenvalue ``λ_S[i] λ_A[j]``
(design.md, "Kronecker-factored eigenbasis"). The per-example coefficient along it is

    c_n(i, j) = (Q_S^T G_n Q_A)[i, j],      G_n = Σ_t g_nt a_nt^T,

and, with the layer in normal form (:mod:`curvlab.capture.layers`), ``Q_S^T G_n Q_A = Ĝ_n^T Â_n`` with
``Ĝ_n = g_n Q_S`` and ``Â_n = a_n Q_A`` (projections of the output gradients and inputs, ``[T, m]``
and ``[T, n]``). Accumulated over examples, in float64:

* ``Σ_n c_n`` and ``Σ_n c_n²`` with the true labels → mean, unbiased variance ``Var_n(v^T g_n)``
  and second moment ``E[c²]`` (the EKFAC eigenvalue correction, George et al. 2018);
* ``Σ_n Σ_u w_u c_{n,u}²`` with the logit-gradient vectors ``u`` of the ``exact`` or ``mc`` Fisher
  (:mod:`curvlab.capture.loss`) → the curvature ``v^T F v`` of the true Fisher (= GGN) for every direction at
  once, since ``v^T F v = (1/N) Σ_n Σ_u w_u (u^T J_n v)²`` and ``u^T J_n v = c_{n,u}``.

The loss (softmax cross-entropy, squared error or binary cross-entropy) and the way a batch goes into
the model are the :class:`~curvlab.capture.task.Task`'s. ``N`` counts the examples with a counted
label: one whose labels all equal the loss's ``ignore_index`` has ``c_n = 0`` on every pass and is not
an example of the mean, the variance or the curvature.

Contraction order, per layer, from its shapes (``T`` locations, ``m`` outputs, ``n`` inputs with the
bias, ``P`` backward passes per batch):

* one location: ``c_n = ĝ_n â_n^T`` is an outer product, so ``Σ c = Ĝ^T Â`` and ``Σ c² = (Ĝ∘Ĝ)^T (Â∘Â)``
  — no per-example matrix is ever formed (memory ``O(B (m + n) + m n)``);
* several locations, "project first": ``Â`` once per batch (``T n²``), then per pass ``T m²`` to project
  ``g`` and ``T m n`` per example for ``Ĝ_n^T Â_n``;
* several locations, "gradient first": per pass ``T m n`` for ``G_n = g_n^T a_n`` and ``m n (m + n)`` to
  rotate it, ``Q_S^T G_n Q_A``.
The cheaper of the last two is chosen from the flop counts; either holds per-example ``m × n`` matrices
only for a chunk of examples at a time (:data:`CHUNK_BYTES`), never for a whole batch.

A layer called several times in a forward pass has the locations of all its calls (docs/factors.md):
``G_n`` sums over them, so the per-example coefficients of the calls are added before they are squared
(one call per example with one location each is then no longer an outer product: project first). The
projections of an ``nn.MultiheadAttention`` (:mod:`curvlab.capture.attention`) are Linear layers on
their own inputs, seen through its visible forward. A ``NormAffine`` entry (the ``(γ, β)`` of a
normalisation layer, :mod:`curvlab.capture.norms`) has ``Q_S = [1]`` and a block-diagonal ``Q_A``:
its coefficients are ``c_n = r_n Q_A`` channel by channel, ``r_nc = Σ_t g_nct [x̂_nct, 1]``.

The tied embedding / pre-softmax weight ``E`` (seed eq. 16, a ``TiedEmbedding`` entry named after the
Linear, ``W = E``, ``V × d``) has a gradient from both uses, ``G_n = Σ_t g_t [a_t, 1]^T + Σ_τ
onehot(x_τ) [h_τ, 0]^T``; both modules are hooked and, project first, ``G_n Q_A`` is ``Σ_t g_t Â_t^T``
plus the rows ``ĥ_τ = [h_τ, 0] Q_A`` added at the token ids
(:class:`~curvlab.capture.layers.TiedEmbeddingAdapter`), summed before squaring. Its ``S`` is
diagonal, so ``Q_S`` is a permutation and ``Q_S^T`` permutes the rows of each chunk's sums.

**Noise of the curvature.** The ``exact`` route is exact. The ``mc`` route's value of a direction is a
mean over ``K`` sampled labels per location; its standard error (conditional on the examples: only the
label draws are random) comes from the ``K`` replicates of every batch: with ``R_bk = Σ_{n∈b} c_{n,k}²``
the batch's estimate is ``mean_k R_bk`` with variance ``s_b²/K`` (``s_b²`` the unbiased variance of the
``K`` replicates), and ``SE² = Σ_b s_b²/K / N²`` (``K ≥ 2``; with ``K = 1`` it is unknown, NaN).

**The tied weight, Rao-Blackwellised.** Along a tied direction ``v = e_i q_j^T`` (``S`` is diagonal, so
V-side eigenvectors are single tokens) the logit perturbation has a direct part, at the pre-softmax
Linear, ``u_t = e_i â_t(j)``, and an indirect part through the embedding. The coefficient of a sampled
logit vector ``b`` splits likewise, ``c = L + M`` (``L = Σ_t â_t(j) b_t(i)`` from the Linear use, ``M`` from
the embedding use), and ``E[L²] = Σ_t â_t(j)² p_ti (1 − p_ti)`` in closed form (the softmax Hessian's
diagonal; the locations' labels are independent). The estimator

    v^T F v ≈ (1/N) [ Σ_n Σ_t â_nt(j)² p_nti (1 − p_nti) + (1/K) Σ_k Σ_n (c_nk² − L_nk²) ]

keeps the Monte-Carlo draw only for ``M² + 2LM`` and is unbiased (its expectation is ``E[c²]``). For a
rare token, ``p_i ≪ 1`` and the label ``i`` is almost never drawn, so plain Monte Carlo sees
``L² ≈ (Σ_t â p_i)² ∝ p_i²`` almost always instead of the ``∝ p_i`` of the truth; the closed form has no
such noise. It applies when the Linear's output is the model's logits (checked per batch; otherwise the
plain ``mc`` estimate is used and the JSON says so).

A run of ``curvlab gradcov`` — the bases read from a checkpoint, the jvp cross-check on selected
directions, the JSON summary and the output file — is :mod:`curvlab.analysis.gradcov_run`; its public
names are importable from here too.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from curvlab import distributed
from curvlab.analysis.basis import LayerBasis, _permutation
from curvlab.capture import layers as layer_math
from curvlab.capture.factors import FactorSource, select_layers
from curvlab.capture.loss import CrossEntropy, logit_gradient_samples
from curvlab.capture.task import Task, batch_context, default_task
from curvlab.errors import OptionError

CHUNK_BYTES = 32 * 2**20
CURVATURE_ROUTES = ("exact", "mc")
#: Names that moved to :mod:`curvlab.analysis.gradcov_run` and are still importable from here.
_MOVED = (
    "GradcovResult",
    "NULL_FLOOR",
    "bases_from_checkpoint",
    "numerical_floor",
    "run_gradcov",
    "select_directions",
    "summarize",
    "write_result",
)


def __getattr__(name: str) -> Any:
    """A name of :data:`_MOVED`, from :mod:`curvlab.analysis.gradcov_run` (looked up on use: it imports
    this module)."""
    if name in _MOVED:
        return getattr(importlib.import_module("curvlab.analysis.gradcov_run"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class _LayerSums:
    """Running float64 sums of one layer, all ``m × n``."""

    sum_c: Tensor
    sum_c2: Tensor
    sum_curvature: Tensor
    curvature_var: Tensor | None = None  # Σ_b s_b²/K of the mc route (the variance of the summed estimate)
    replicate_sum: Tensor | None = None  # this batch's Σ_k R_bk and Σ_k R_bk²
    replicate_sq: Tensor | None = None
    estimator: str = ""
    basis_A: Tensor | None = None
    input_rows: tuple[Tensor, Tensor | None] | None = None  # Q_A rows for the prepared inputs' order
    order_S: Tensor | None = None  # tied entry: Q_S = I[:, order_S] (its V-side factor is diagonal)
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)  # which module of the entry each input came from


@dataclass
class DirectionStatistics:
    """Per-direction results of one layer (all ``m × n`` float64 numpy arrays)."""

    kfac_eigenvalue: np.ndarray
    mean: np.ndarray
    variance: np.ndarray
    second_moment: np.ndarray
    curvature: np.ndarray | None
    num_examples: int
    order: str
    curvature_se: np.ndarray | None = None  # standard error of ``curvature`` (0: exact; NaN: unknown)
    estimator: str = ""  # how the curvature was estimated: exact, mc, mc+closed-form direct path


def contraction_order(locations: int, m: int, n: int, passes: int) -> str:
    """``"outer"`` (one location), ``"project_first"`` or ``"gradient_first"``: the fewer flops."""
    if locations == 1:
        return "outer"
    project_first = locations * n * n + passes * (locations * m * m + locations * m * n)
    gradient_first = passes * (locations * m * n + m * n * (m + n))
    return "project_first" if project_first <= gradient_first else "gradient_first"


class KFEProjector:
    """Hooks that accumulate KFE coefficient statistics of every layer in ``bases``.

    Use as a context manager; call :meth:`add_batch` per batch, then :meth:`statistics`.
    ``curvature`` is ``None`` (gradients only), ``"exact"`` (one extra backward pass per column of the
    loss Hessian's square root) or ``"mc"`` (``mc_samples`` sampled labels, with standard errors from
    ``mc_samples ≥ 2``). ``task``: how inputs go in, the logits and the loss
    (:class:`~curvlab.capture.task.Task`; default softmax cross-entropy). ``rao_blackwell``: the tied
    weight's direct path in closed form with ``mc`` and softmax cross-entropy (module docstring).
    """

    def __init__(
        self,
        model: nn.Module,
        bases: Mapping[str, LayerBasis],
        *,
        curvature: str | None = "exact",
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        task: Task | None = None,
        rao_blackwell: bool = True,
    ) -> None:
        if curvature is not None and curvature not in CURVATURE_ROUTES:
            raise ValueError(f"curvature route must be one of {CURVATURE_ROUTES}, got {curvature!r}")
        sources = _sources(model, list(bases))
        self.model = model
        self.task = default_task(task)
        self.curvature = curvature
        self.mc_samples = mc_samples
        self.generator = generator
        self.rao_blackwell = rao_blackwell
        self.num_examples = 0
        self.orders: dict[str, str] = {}
        self.layers: dict[str, tuple[FactorSource, Any, LayerBasis, _LayerSums]] = {}
        for name, basis in bases.items():
            module, adapter = sources[name]
            # projections run in the model's precision; the sums are accumulated in float64
            weight = adapter.parameters(module)[0]
            device = weight.device
            basis = basis.to(device=device, dtype=weight.dtype)
            _check_basis(name, module, adapter, basis)
            zeros = [torch.zeros(basis.shape, dtype=torch.float64, device=device) for _ in range(3)]
            sums = _LayerSums(*zeros, basis_A=basis.Q_A)
            if curvature == "mc":
                sums.curvature_var, sums.replicate_sum, sums.replicate_sq = (
                    torch.zeros(basis.shape, dtype=torch.float64, device=device) for _ in range(3))
            if isinstance(module, layer_math.TiedPair):
                sums.order_S = basis.order_S if basis.order_S is not None else _permutation(basis.Q_S, name)
            self.layers[name] = (module, adapter, basis, sums)
        self._handles: list[Any] = []
        self._recording = False

    def __enter__(self) -> KFEProjector:
        for module, _, _, sums in self.layers.values():
            self._handles += layer_math.watch(module, self._on_use(sums), lambda: self._recording)
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @staticmethod
    def _on_use(sums: _LayerSums):
        def on_use(role: str, x: Tensor, output: Tensor) -> None:
            sums.inputs.append(x)  # raw; prepared per contraction order below
            sums.outputs.append(output)
            sums.roles.append(role)

        return on_use

    def add_batch(self, inputs: Any, labels: Tensor) -> None:
        """Forward one batch (the task's inputs); accumulate gradient statistics and (if asked) curvature."""
        self._recording = True
        try:
            logits = self.task.forward(self.model, inputs)
        finally:
            self._recording = False
        loss = self.task.loss
        try:
            empirical = logit_gradient_samples(logits, labels, "empirical", loss=loss)
            passes = [(u, w, False) for u, w in empirical]
            if self.curvature is not None:
                passes += [
                    (u, w, True)
                    for u, w in logit_gradient_samples(
                        logits, labels, self.curvature, loss=loss, mc_samples=self.mc_samples,
                        generator=self.generator,
                    )
                ]
            self._prepare_inputs(len(passes))
            direct = self._direct_terms(logits, labels) if self.curvature == "mc" else set()
            outputs = [out for *_, sums in self.layers.values() for out in sums.outputs]
            for k, (u, weight, is_curvature) in enumerate(passes):
                grads = torch.autograd.grad(logits, outputs, grad_outputs=u, retain_graph=k + 1 < len(passes))
                self._accumulate(grads, weight, is_curvature, direct)
            if self.curvature == "mc":
                self._close_batch()
        finally:
            for *_, sums in self.layers.values():
                sums.inputs.clear()
                sums.outputs.clear()
                sums.roles.clear()
        self.num_examples += loss.num_examples(logits, labels)

    def _prepare_inputs(self, passes: int) -> None:
        """Project the inputs once per batch where the contraction order wants ``Â = a Q_A``.

        A layer called several times has the locations of all its calls (docs/factors.md); its
        per-example coefficients are summed over the calls before they are squared.
        """
        for name, (module, adapter, basis, sums) in self.layers.items():
            if isinstance(module, layer_math.TiedPair):
                self.orders[name] = "project_first"
                _prepare_tied_inputs(module, adapter, sums)
                continue
            if isinstance(adapter, layer_math.NormAdapter):
                self.orders[name] = "blocks"
                sums.inputs[:] = [adapter.inputs(module, x) for x in sums.inputs]
                continue
            locations = sum(adapter.output_grads(module, out.detach()).shape[1] for out in sums.outputs)
            order = contraction_order(locations, basis.size_S, basis.Q_A.shape[0], passes)
            if order == "outer" and len(sums.outputs) > 1:
                order = "project_first"  # one location per call, but several calls: not one outer product
            self.orders[name] = order
            has_bias = adapter.has_bias(module)
            if order == "gradient_first":
                # raw inputs stay; per-example gradients come in the weight's order
                sums.input_rows = _input_rows(sums.basis_A, None, has_bias)
                continue
            prepared = []
            for x in sums.inputs:
                a, feature_order = adapter.inputs_any_order(module, x)
                sums.input_rows = _input_rows(sums.basis_A, feature_order, has_bias)
                prepared.append(_project_inputs(a, sums.input_rows))
            sums.inputs[:] = prepared

    def _direct_terms(self, logits: Tensor, labels: Tensor | None) -> set[str]:
        """Add the closed-form direct-path curvature of every tied layer whose Linear gives the logits
        (``Σ_n Σ_t â_nt(j)² p_nti (1 − p_nti)`` over the counted label locations, module docstring);
        return their names. Only for softmax cross-entropy, whose Hessian's diagonal that is."""
        done = set()
        loss = self.task.loss
        counted = loss.counted(labels) if isinstance(loss, CrossEntropy) else None
        for name, (module, _, _, sums) in self.layers.items():
            if not (self.rao_blackwell and isinstance(module, layer_math.TiedPair)):
                continue
            if not isinstance(loss, CrossEntropy):
                sums.estimator = f"mc (no closed form for the {loss.name} loss's direct path)"
                continue
            linear = [(a, out) for a, out, role in zip(sums.inputs, sums.outputs, sums.roles, strict=True)
                      if role == "linear"]
            if not linear or any(out is not logits for _, out in linear):
                sums.estimator = "mc (the tied Linear's output is not the logits: no closed form)"
                continue
            for a_hat, out in linear:
                p = torch.softmax(out.detach().double(), dim=-1)
                weight = p * (1 - p)
                if counted is not None:  # an ignored label location is no loss term
                    weight = weight * counted.unsqueeze(-1).to(weight.dtype)
                weight = weight.reshape(-1, p.shape[-1])
                direct = weight.T @ (a_hat.double() ** 2).reshape(-1, a_hat.shape[-1])
                sums.sum_curvature.add_(direct[sums.order_S])
            sums.estimator = "mc, direct path in closed form (Rao-Blackwellised)"
            done.add(name)
        return done

    def _accumulate(self, grads: Sequence[Tensor], weight: float, is_curvature: bool,
                    direct: set[str] = frozenset()) -> None:
        position = 0
        for name, (module, adapter, basis, sums) in self.layers.items():
            layer = _Layer(module, adapter, basis, sums.input_rows)
            layer_grads = grads[position : position + len(sums.outputs)]
            position += len(sums.outputs)
            if isinstance(module, layer_math.TiedPair):
                rao_blackwell = is_curvature and name in direct
                chunks = _tied_coefficients(sums, layer_grads, layer, rao_blackwell=rao_blackwell)
            elif self.orders[name] == "blocks":
                chunks = _block_coefficients(sums.inputs, layer_grads, layer)
            else:
                calls = list(zip(sums.inputs, layer_grads, strict=True))
                chunks = _coefficients(calls, layer, self.orders[name])
            if not is_curvature:
                for c, c2 in chunks:
                    sums.sum_c.add_(c)
                    sums.sum_c2.add_(c2)
                continue
            total = torch.zeros_like(sums.sum_curvature)
            for _, c2 in chunks:
                total.add_(c2)
            sums.sum_curvature.add_(total, alpha=weight)
            if sums.replicate_sum is not None:  # mc: this pass is one replicate R_bk of the batch's sum
                sums.replicate_sum.add_(total)
                sums.replicate_sq.add_(total * total)

    def _close_batch(self) -> None:
        """Add the batch's replicate variance ``s_b²/K`` of every layer (mc, ``K ≥ 2``)."""
        k = self.mc_samples
        for *_, sums in self.layers.values():
            if k >= 2:
                spread = (sums.replicate_sq - sums.replicate_sum**2 / k).clamp_min_(0) / (k - 1)
                sums.curvature_var.add_(spread, alpha=1.0 / k)
            sums.replicate_sum.zero_()
            sums.replicate_sq.zero_()

    def reduce(self) -> None:
        """Add up the sums ``Σ c``, ``Σ c²``, the curvature sums and the example count of all processes
        (one collective; a no-op in a single process)."""
        sums = [t for *_, s in self.layers.values()
                for t in (s.sum_c, s.sum_c2, s.sum_curvature, s.curvature_var) if t is not None]
        count = torch.tensor([self.num_examples], dtype=torch.int64, device=sums[0].device if sums else "cpu")
        distributed.all_reduce_sum([*sums, count], "adding up the gradient statistics")
        self.num_examples = int(count.item())

    def statistics(self) -> dict[str, DirectionStatistics]:
        """Mean, unbiased variance, second moment and curvature of every direction of every layer."""
        n = self.num_examples
        if n < 2:
            raise OptionError(
                f"the gradient variance needs two or more examples with a counted label, got {n}"
            )
        result = {}
        for name, (_, _, basis, sums) in self.layers.items():
            mean = sums.sum_c / n
            variance = (sums.sum_c2 - n * mean * mean) / (n - 1)
            se = None
            if self.curvature == "exact":
                se = np.zeros(tuple(sums.sum_curvature.shape))
            elif self.curvature == "mc":
                se = (sums.curvature_var.sqrt() / n).cpu().numpy()
                if self.mc_samples < 2:
                    se = np.full_like(se, np.nan)
            estimator = sums.estimator or (self.curvature or "")
            result[name] = DirectionStatistics(
                kfac_eigenvalue=basis.kfac_eigenvalues().double().cpu().numpy(),
                mean=mean.cpu().numpy(),
                variance=variance.clamp_min(0).cpu().numpy(),
                second_moment=(sums.sum_c2 / n).cpu().numpy(),
                curvature=None if self.curvature is None else (sums.sum_curvature / n).cpu().numpy(),
                num_examples=n,
                order=self.orders.get(name, ""),
                curvature_se=se,
                estimator=estimator,
            )
        return result


def _input_rows(Q_A: Tensor, order: Tensor | None, has_bias: bool) -> tuple[Tensor, Tensor | None]:
    """``Q_A`` split for inputs in the adapter's feature order: ``(rows, bias_row)`` such that
    ``[a_w, 1] Q_A = a_u rows + bias_row`` when ``a_w = a_u[..., order]`` (weight order)."""
    n = Q_A.shape[0] - int(has_bias)
    rows = Q_A[:n]
    if order is not None:
        rows = torch.empty_like(rows).index_copy_(0, order, rows)
    return rows, (Q_A[n] if has_bias else None)


def _project_inputs(a: Tensor, input_rows: tuple[Tensor, Tensor | None]) -> Tensor:
    """``Â = [a, 1] Q_A`` without building the bias-augmented or weight-ordered copy of ``a``."""
    rows, bias_row = input_rows
    projected = a @ rows
    return projected if bias_row is None else projected.add_(bias_row)


@dataclass
class _Layer:
    """What the coefficient kernels need of one layer."""

    module: FactorSource
    adapter: layer_math.LayerAdapter
    basis: LayerBasis
    input_rows: tuple[Tensor, Tensor | None]


def _coefficients(
    calls: list[tuple[Tensor, Tensor]], layer: _Layer, order: str
) -> Iterable[tuple[Tensor, Tensor]]:
    """Yield ``(Σ_n c_n, Σ_n c_n²)`` over chunks of the batch, ``c_n`` summed over the layer's calls.

    ``calls`` holds one ``(a, grad_output)`` per call: ``a`` is the projected input ``Â`` (outer,
    project-first) or the layer's raw input (gradient-first).
    """
    basis = layer.basis
    if order == "outer":
        ((a, grad_output),) = calls
        g_hat = basis.project_S(layer.adapter.output_grads(layer.module, grad_output)[:, 0])
        a_hat = a[:, 0]
        yield (g_hat.T @ a_hat).double(), ((g_hat * g_hat).T @ (a_hat * a_hat)).double()
        return
    m, n = basis.shape
    chunk = max(1, CHUNK_BYTES // (8 * m * n))  # the float64 copy of a chunk of coefficients
    rows, bias_row = layer.input_rows
    grads = [(a, out, layer.adapter.output_grads(layer.module, out)) for a, out in calls]
    for start in range(0, calls[0][0].shape[0], chunk):
        part = slice(start, start + chunk)
        c = None
        for a, grad_output, g in grads:
            if order == "project_first":
                term = torch.bmm(basis.project_S(g[part]).transpose(1, 2), a[part])
            else:
                # G_n = g_n^T [a_n, 1] from the adapter's per-example gradient; its bias column is Σ_t g_nt
                gradients = layer.adapter.per_example_gradients(layer.module, a[part], grad_output[part])
                term = gradients @ rows
                if bias_row is not None:
                    term += g[part].sum(dim=1).unsqueeze(-1) * bias_row
            c = term if c is None else c + term
        if order == "gradient_first":
            c = basis.rotate_S(c)
        c = c.double()
        yield c.sum(dim=0), (c * c).sum(dim=0)


def _block_coefficients(
    inputs: list[Tensor], grads: Sequence[Tensor], layer: _Layer
) -> Iterable[tuple[Tensor, Tensor]]:
    """Yield ``(Σ_n c_n, Σ_n c_n²)`` of a ``NormAffine`` entry: ``c_n = r_n Q_A`` block by block,
    ``r_nc = Σ_calls Σ_t g_nct [x̂_nct, 1]`` (``inputs`` are the calls' ``x̂``; ``Q_S = [1]``)."""
    adapter, module, basis = layer.adapter, layer.module, layer.basis
    r = None
    for x_hat, grad in zip(inputs, grads, strict=True):
        term = adapter.terms(module, x_hat, adapter.output_grads(module, grad))
        r = term if r is None else r + term
    c = (torch.einsum("nci,cij->ncj", r, basis.Q_A).reshape(r.shape[0], 1, -1) * basis.Q_S[0, 0]).double()
    yield c.sum(dim=0), (c * c).sum(dim=0)


def _check_basis(name: str, module: FactorSource, adapter: Any, basis: LayerBasis) -> None:
    """The basis must fit the layer: ``W`` is ``m × n`` and a blocks ``Q_A`` belongs to a norm entry."""
    weight, bias = adapter.parameters(module)
    m, n = adapter.to_matrix(module, weight.detach(), None if bias is None else bias.detach()).shape
    if basis.shape != (m, n) or basis.blocks != isinstance(adapter, layer_math.NormAdapter):
        raise ValueError(
            f"layer {name}: an eigenbasis of shape {basis.shape} does not fit the layer's {m} x {n}"
        )


def _sources(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[FactorSource, Any]]:
    """The source (module, :class:`~curvlab.capture.layers.TiedPair` or attention
    :class:`~curvlab.capture.layers.Projection`) and adapter of each named entry, named as factor
    capture names them (:func:`curvlab.capture.factors.select_layers`)."""
    selected = select_layers(model)
    modules = dict(model.named_modules())
    for name in names:
        if name not in selected:
            if name in modules:
                kind = type(modules[name]).__name__
                raise ValueError(f"layer {name}: {kind} is not a layer with K-FAC factors")
            raise ValueError(f"layer {name} of the eigenbasis is not a layer of the model")
    return {name: selected[name] for name in names}




def _prepare_tied_inputs(pair: layer_math.TiedPair, adapter: Any, sums: _LayerSums) -> None:
    """The Linear's inputs projected once per batch, ``Â = [a, 1] Q_A``; the token ids as ``[B, T]``."""
    sums.input_rows = _input_rows(sums.basis_A, None, adapter.has_bias(pair))
    sums.inputs[:] = [
        _project_inputs(adapter.inputs(pair, role, x), sums.input_rows)
        if role == "linear"
        else adapter.inputs(pair, role, x)
        for role, x in zip(sums.roles, sums.inputs, strict=True)
    ]


def _tied_coefficients(
    sums: _LayerSums, grads: Sequence[Tensor], layer: _Layer, *, rao_blackwell: bool = False
) -> Iterable[tuple[Tensor, Tensor]]:
    """Yield ``(Σ_n c_n, Σ_n c_n²)`` of the tied embedding / pre-softmax weight over chunks of the batch.

    ``c_n = Q_S^T G_n Q_A`` with ``G_n Q_A = Σ_t g_t Â_t^T + Σ_τ onehot(x_τ) ĥ_τ^T`` (``Â = [a, 1] Q_A``
    prepared, ``ĥ = [h, 0] Q_A`` projected here) from the adapter, both uses summed before squaring.
    ``S`` is diagonal, so ``Q_S = I[:, order]`` and ``Q_S^T M = M[order]``: the rows of the chunk sums
    are permuted, not the per-example matrices.

    ``rao_blackwell``: the second sums are ``Σ_n (c_n² − L_n²) = Σ_n M_n (M_n + 2 L_n)``, ``L`` the Linear
    use's part of ``c`` and ``M`` the embedding use's (its expectation's missing ``E[L²]`` is added in
    closed form, :meth:`KFEProjector._direct_terms`).
    """
    pair, adapter = layer.module, layer.adapter
    rows, _ = layer.input_rows
    linear, embedding = [], []
    for role, x, grad_output in zip(sums.roles, sums.inputs, grads, strict=True):
        grad = adapter.output_grads(pair, role, grad_output)
        if role == "linear":
            linear.append((x, grad))
        else:
            embedding.append((x, grad @ rows))
    m, n = layer.basis.size_S, layer.basis.Q_A.shape[0]
    chunk = max(1, CHUNK_BYTES // (8 * m * n))  # the float64 copy of a chunk of coefficients
    for start in range(0, sums.inputs[0].shape[0], chunk):
        part = slice(start, start + chunk)
        linear_part = [(a[part], g[part]) for a, g in linear]
        embedding_part = [(ids[part], h[part]) for ids, h in embedding]
        if rao_blackwell:
            L = adapter.per_example_gradients(pair, linear_part, []).double()
            M = adapter.per_example_gradients(pair, [], embedding_part).double() if embedding_part else None
            rotated = L if M is None else L + M
            square = torch.zeros_like(L) if M is None else M * (M + 2 * L)
            yield rotated.sum(dim=0)[sums.order_S], square.sum(dim=0)[sums.order_S]
            continue
        rotated = adapter.per_example_gradients(pair, linear_part, embedding_part).double()
        yield rotated.sum(dim=0)[sums.order_S], (rotated * rotated).sum(dim=0)[sums.order_S]


def project_gradients(
    model: nn.Module,
    batches: Iterable[Any],
    bases: Mapping[str, LayerBasis],
    *,
    curvature: str | None = "exact",
    mc_samples: int = 1,
    seed: int = 0,
    progress: bool = False,
    task: Task | None = None,
    rao_blackwell: bool = True,
) -> dict[str, DirectionStatistics]:
    """KFE statistics of every layer in ``bases`` over ``batches`` (see the module docstring).

    ``batches`` yields batches that ``task`` splits into inputs and labels (default ``(x, y)`` pairs
    and softmax cross-entropy; :class:`~curvlab.capture.task.Task`).

    Monte-Carlo labels of batch ``k`` are drawn with the seed ``(seed, k)``; under ``torchrun`` each
    process takes every ``world_size``-th batch and the sums are all-reduced once at the end
    (:mod:`curvlab.distributed`), so every process returns the statistics of all the data.
    """
    task = default_task(task)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    projector = KFEProjector(
        model, bases, curvature=curvature, mc_samples=mc_samples, generator=generator, task=task,
        rao_blackwell=rao_blackwell,
    )
    ctx = distributed.context()
    if progress and ctx.is_main:
        from curvlab.progress import progress_bar

        batches = progress_bar(batches, desc="gradcov", unit="batch")
    with projector:
        for k, batch in distributed.my_batches(batches, ctx):
            generator.manual_seed(distributed.batch_seed(seed, k))
            with batch_context(k):
                inputs, labels = task.split_batch(batch)
                projector.add_batch(task.move(inputs, device), task.move(labels, device))
    projector.reduce()
    return projector.statistics()
