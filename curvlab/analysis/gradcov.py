"""Per-example gradients in the Kronecker-factored eigenbasis: mean, variance and curvature (seed E.2).

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
from curvlab.capture import layers as layer_math
from curvlab.capture.factors import FactorSource, select_layers
from curvlab.capture.loss import logit_gradient_samples

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
class LayerBasis:
    """The Kronecker-factored eigenbasis of one layer: ``Q_S`` (m×m), ``Q_A`` (n×n), eigenvalues.

    ``Q_A`` includes the bias row when the layer has a bias. Columns are eigenvectors, eigenvalues
    ascending (the order of ``torch.linalg.eigh``). For a ``NormAffine`` entry (blocks ``A``) ``Q_A``
    is ``(C, k, k)``: block ``c``'s eigenvectors, so ``Q_A`` as a matrix is ``diag(Q_A[0], ...,
    Q_A[C-1])`` and ``eigenvalues_A`` lists each block's, in block order (length ``n = C·k``).
    """

    Q_S: Tensor
    Q_A: Tensor
    eigenvalues_S: Tensor
    eigenvalues_A: Tensor

    @classmethod
    def from_factors(cls, S: np.ndarray | Tensor, A: np.ndarray | Tensor) -> LayerBasis:
        """Eigendecompose dense (2-D), diagonal (1-D) or blocks (3-D) factors in float64."""
        lam_s, q_s = _eigh(torch.as_tensor(S, dtype=torch.float64))
        lam_a, q_a = _eigh(torch.as_tensor(A, dtype=torch.float64))
        return cls(q_s, q_a, lam_s, lam_a)

    @property
    def blocks(self) -> bool:
        """Whether ``Q_A`` holds per-channel blocks (a ``NormAffine`` entry)."""
        return self.Q_A.dim() == 3

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)`` of the layer's weight matrix ``W``."""
        return self.Q_S.shape[0], self.eigenvalues_A.shape[0]

    def A_column(self, j: int) -> Tensor:  # noqa: N802 (the math name)
        """Column ``j`` of ``Q_A`` as a dense vector (length ``n``)."""
        if not self.blocks:
            return self.Q_A[:, j]
        k = self.Q_A.shape[1]
        column = self.Q_A.new_zeros(self.eigenvalues_A.shape[0])
        column[(j // k) * k : (j // k + 1) * k] = self.Q_A[j // k, :, j % k]
        return column

    def direction(self, i: int, j: int) -> Tensor:
        """The weight perturbation ``Q_S[:, i] Q_A[:, j]^T`` of direction ``(i, j)``, ``m × n``."""
        return torch.outer(self.Q_S[:, i], self.A_column(j))

    def kfac_eigenvalues(self) -> Tensor:
        """``λ_S[i] λ_A[j]`` as an ``m × n`` matrix."""
        return torch.outer(self.eigenvalues_S, self.eigenvalues_A)


def _eigh(x: Tensor) -> tuple[Tensor, Tensor]:
    if x.ndim == 1:
        order = torch.argsort(x)
        return x[order], torch.eye(len(x), dtype=x.dtype)[:, order]
    if x.ndim == 3:
        values, vectors = torch.linalg.eigh((x + x.transpose(1, 2)) / 2)
        return values.reshape(-1), vectors
    return torch.linalg.eigh((x + x.T) / 2)


@dataclass
class _LayerSums:
    """Running float64 sums of one layer, all ``m × n``."""

    sum_c: Tensor
    sum_c2: Tensor
    sum_curvature: Tensor
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
    ``curvature`` is ``None`` (gradients only), ``"exact"`` (one extra backward pass per class) or
    ``"mc"`` (``mc_samples`` sampled labels).
    """

    def __init__(
        self,
        model: nn.Module,
        bases: Mapping[str, LayerBasis],
        *,
        curvature: str | None = "exact",
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        if curvature is not None and curvature not in CURVATURE_ROUTES:
            raise ValueError(f"curvature route must be one of {CURVATURE_ROUTES}, got {curvature!r}")
        sources = _sources(model, list(bases))
        self.model = model
        self.curvature = curvature
        self.mc_samples = mc_samples
        self.generator = generator
        self.num_examples = 0
        self.orders: dict[str, str] = {}
        self.layers: dict[str, tuple[FactorSource, Any, LayerBasis, _LayerSums]] = {}
        for name, basis in bases.items():
            module, adapter = sources[name]
            # projections run in the model's precision; the sums are accumulated in float64
            weight = adapter.parameters(module)[0]
            device = weight.device
            basis = LayerBasis(*(t.to(device=device, dtype=weight.dtype) for t in vars(basis).values()))
            _check_basis(name, module, adapter, basis)
            zeros = [torch.zeros(basis.shape, dtype=torch.float64, device=device) for _ in range(3)]
            sums = _LayerSums(*zeros, basis_A=basis.Q_A)
            if isinstance(module, layer_math.TiedPair):
                sums.order_S = _permutation(basis.Q_S, name)
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

    def add_batch(self, inputs: Tensor, labels: Tensor) -> None:
        """Forward one batch; accumulate gradient statistics and (if asked) curvature."""
        self._recording = True
        try:
            logits = self.model(inputs)
        finally:
            self._recording = False
        try:
            passes = [(u, w, False) for u, w in logit_gradient_samples(logits, labels, "empirical")]
            if self.curvature is not None:
                passes += [
                    (u, w, True)
                    for u, w in logit_gradient_samples(
                        logits, None, self.curvature, mc_samples=self.mc_samples, generator=self.generator
                    )
                ]
            self._prepare_inputs(len(passes))
            outputs = [out for *_, sums in self.layers.values() for out in sums.outputs]
            for k, (u, weight, is_curvature) in enumerate(passes):
                grads = torch.autograd.grad(logits, outputs, grad_outputs=u, retain_graph=k + 1 < len(passes))
                self._accumulate(grads, weight, is_curvature)
        finally:
            for *_, sums in self.layers.values():
                sums.inputs.clear()
                sums.outputs.clear()
                sums.roles.clear()
        self.num_examples += inputs.shape[0]

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
            order = contraction_order(locations, basis.Q_S.shape[0], basis.Q_A.shape[0], passes)
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

    def _accumulate(self, grads: Sequence[Tensor], weight: float, is_curvature: bool) -> None:
        position = 0
        for name, (module, adapter, basis, sums) in self.layers.items():
            layer = _Layer(module, adapter, basis, sums.input_rows)
            layer_grads = grads[position : position + len(sums.outputs)]
            position += len(sums.outputs)
            if isinstance(module, layer_math.TiedPair):
                chunks = _tied_coefficients(sums, layer_grads, layer)
            elif self.orders[name] == "blocks":
                chunks = _block_coefficients(sums.inputs, layer_grads, layer)
            else:
                calls = list(zip(sums.inputs, layer_grads, strict=True))
                chunks = _coefficients(calls, layer, self.orders[name])
            for c, c2 in chunks:
                if is_curvature:
                    sums.sum_curvature.add_(c2, alpha=weight)
                else:
                    sums.sum_c.add_(c)
                    sums.sum_c2.add_(c2)

    def reduce(self) -> None:
        """Add up the sums ``Σ c``, ``Σ c²``, the curvature sums and the example count of all processes
        (one collective; a no-op in a single process)."""
        sums = [t for *_, s in self.layers.values() for t in (s.sum_c, s.sum_c2, s.sum_curvature)]
        count = torch.tensor([self.num_examples], dtype=torch.int64, device=sums[0].device if sums else "cpu")
        distributed.all_reduce_sum([*sums, count], "adding up the gradient statistics")
        self.num_examples = int(count.item())

    def statistics(self) -> dict[str, DirectionStatistics]:
        """Mean, unbiased variance, second moment and curvature of every direction of every layer."""
        n = self.num_examples
        if n < 2:
            raise ValueError("the gradient variance needs at least two examples")
        result = {}
        for name, (_, _, basis, sums) in self.layers.items():
            mean = sums.sum_c / n
            variance = (sums.sum_c2 - n * mean * mean) / (n - 1)
            result[name] = DirectionStatistics(
                kfac_eigenvalue=basis.kfac_eigenvalues().double().cpu().numpy(),
                mean=mean.cpu().numpy(),
                variance=variance.clamp_min(0).cpu().numpy(),
                second_moment=(sums.sum_c2 / n).cpu().numpy(),
                curvature=None if self.curvature is None else (sums.sum_curvature / n).cpu().numpy(),
                num_examples=n,
                order=self.orders.get(name, ""),
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
        g_hat = layer.adapter.output_grads(layer.module, grad_output)[:, 0] @ basis.Q_S
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
                term = torch.bmm((g[part] @ basis.Q_S).transpose(1, 2), a[part])
            else:
                # G_n = g_n^T [a_n, 1] from the adapter's per-example gradient; its bias column is Σ_t g_nt
                gradients = layer.adapter.per_example_gradients(layer.module, a[part], grad_output[part])
                term = gradients @ rows
                if bias_row is not None:
                    term += g[part].sum(dim=1).unsqueeze(-1) * bias_row
            c = term if c is None else c + term
        if order == "gradient_first":
            c = basis.Q_S.T @ c
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


def _permutation(Q_S: Tensor, name: str) -> Tensor:
    """``order`` with ``Q_S = I[:, order]``, the eigenbasis of a diagonal factor (see :func:`_eigh`)."""
    order = Q_S.argmax(dim=0)
    size = len(order)
    ones = bool((Q_S[order, torch.arange(size, device=Q_S.device)] == 1).all())
    if not (ones and int(torch.count_nonzero(Q_S)) == size and order.unique().numel() == size):
        raise ValueError(f"layer {name}: the tied entry's S must be diagonal (its eigenbasis a permutation)")
    return order


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
    sums: _LayerSums, grads: Sequence[Tensor], layer: _Layer
) -> Iterable[tuple[Tensor, Tensor]]:
    """Yield ``(Σ_n c_n, Σ_n c_n²)`` of the tied embedding / pre-softmax weight over chunks of the batch.

    ``c_n = Q_S^T G_n Q_A`` with ``G_n Q_A = Σ_t g_t Â_t^T + Σ_τ onehot(x_τ) ĥ_τ^T`` (``Â = [a, 1] Q_A``
    prepared, ``ĥ = [h, 0] Q_A`` projected here) from the adapter, both uses summed before squaring.
    ``S`` is diagonal, so ``Q_S = I[:, order]`` and ``Q_S^T M = M[order]``: the rows of the chunk sums
    are permuted, not the per-example matrices.
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
    m, n = layer.basis.Q_S.shape[0], layer.basis.Q_A.shape[0]
    chunk = max(1, CHUNK_BYTES // (8 * m * n))  # the float64 copy of a chunk of coefficients
    for start in range(0, sums.inputs[0].shape[0], chunk):
        part = slice(start, start + chunk)
        rotated = adapter.per_example_gradients(
            pair, [(a[part], g[part]) for a, g in linear], [(ids[part], h[part]) for ids, h in embedding]
        ).double()
        yield rotated.sum(dim=0)[sums.order_S], (rotated * rotated).sum(dim=0)[sums.order_S]


def project_gradients(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    bases: Mapping[str, LayerBasis],
    *,
    curvature: str | None = "exact",
    mc_samples: int = 1,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, DirectionStatistics]:
    """KFE statistics of every layer in ``bases`` over ``batches`` (see the module docstring).

    Monte-Carlo labels of batch ``k`` are drawn with the seed ``(seed, k)``; under ``torchrun`` each
    process takes every ``world_size``-th batch and the sums are all-reduced once at the end
    (:mod:`curvlab.distributed`), so every process returns the statistics of all the data.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    projector = KFEProjector(model, bases, curvature=curvature, mc_samples=mc_samples, generator=generator)
    ctx = distributed.context()
    if progress and ctx.is_main:
        from tqdm import tqdm

        batches = tqdm(batches, desc="gradcov", unit="batch", leave=False)
    with projector:
        for k, (inputs, labels) in distributed.my_batches(batches, ctx):
            generator.manual_seed(distributed.batch_seed(seed, k))
            projector.add_batch(inputs.to(device), labels.to(device))
    projector.reduce()
    return projector.statistics()
