"""K-FAC and EKFAC as linear operators: products, damped inverses, eigendecompositions, trace, log-det.

**K-FAC** (seed eq. 13). Layer ``l``'s curvature block is ``S_l ⊗ A_l`` acting on the row-major
``vec W_l`` (:mod:`curvlab.analysis.layout`), so ``(S ⊗ A) vec V = vec(S V A)``; the operator is
block diagonal over the layers. A diagonal factor (an Embedding's ``A``, a tied weight's ``S``) stays a
vector: ``S V = s[:, None] ∘ V``, never a ``V × V`` matrix.

**Its eigendecomposition** is the Kronecker-factored eigenbasis (KFE, George et al. 2018; design.md):
with ``S = Q_S diag(σ) Q_S^T`` and ``A = Q_A diag(α) Q_A^T`` (the spectrum engine,
:mod:`curvlab.analysis.spectrum.engine`: eigenvalues ascending, round-off negatives clipped),
``S ⊗ A = (Q_S ⊗ Q_A) diag(σ ⊗ α) (Q_S ⊗ Q_A)^T``: direction ``(i, j)`` is ``Q_S[:, i] Q_A[:, j]^T``
with eigenvalue ``σ_i α_j``. A diagonal factor's eigenvectors are a permutation, ``Q = I[:, order]``,
applied by indexing. The whole-network spectrum is a :class:`~curvlab.analysis.spectrum.KroneckerSpectrum`
(never materialised); trace ``Σ_l tr S_l tr A_l``; log-determinant ``Σ_l Σ_ij log(σ_i α_j + λ)``
(``= n log det S + m log det A`` at ``λ = 0``).

**Damped inverses**, two of them:

* ``method="exact"``: ``(S ⊗ A + λ I)^-1 vec V = vec Q_S [(Q_S^T V Q_A) / (σ α^T + λ)] Q_A^T`` — the
  inverse of the damped K-FAC matrix itself;
* ``method="factored"``: the K-FAC optimizer's factored Tikhonov damping (Martens & Grosse 2015, §6.3),
  ``(S + √λ/π I)^-1 V (A + π√λ I)^-1`` with ``π = sqrt((tr A/dim A)/(tr S/dim S))``, from
  :func:`curvlab.optim.kfac.factored_damping` — the same code the optimizer runs (with its ``S̃ = S / T``).

**EKFAC** (George et al. 2018): the same basis with the eigenvalues ``σ_i α_j`` replaced by the second
moments of the gradients along each direction, ``Λ_ij = E[(Q_S^T G Q_A)_ij²]`` — what ``curvlab
gradcov`` computes (its ``curvature``: the true Fisher's diagonal in the KFE, the Frobenius-optimal
diagonal; or ``second_moment``: the empirical Fisher's). ``EKFAC = Q diag(Λ) Q^T``, its damped inverse
``Q diag(1/(Λ + λ)) Q^T``, its spectrum the ``Λ_ij`` themselves.

Every operator multiplies torch tensors (``(D,)``, ``(D, k)``), dicts of layer matrices or parameter
lists (:mod:`curvlab.analysis.layout`) and offers :meth:`CurvatureOperator.to_scipy`, a
``scipy.sparse.linalg.LinearOperator``. Arithmetic runs in ``dtype`` (float64 by default) on ``device``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from curvlab.analysis.layout import ParameterLayout
from curvlab.errors import OptionError


@dataclass
class FactorBasis:
    """The eigendecomposition of one factor: ``values`` (ascending) and the eigenvectors, either a dense
    ``q`` (columns), or, for a diagonal factor, the permutation ``order`` with ``Q = I[:, order]``, or,
    for a blocks factor ``(C, k, k)`` (a ``NormAffine`` entry's ``A = diag(F_1, ..., F_C)``), the blocks'
    own eigenvectors ``blocks`` ``(C, k, k)`` (columns) and ``order``: column ``i`` of ``Q`` is
    eigenvector ``order[i] % k`` of block ``order[i] // k`` (the spectrum engine's convention,
    :class:`~curvlab.analysis.spectrum.engine.FactorEig`), so ``Q`` is never a ``C·k × C·k`` matrix."""

    values: Tensor
    q: Tensor | None = None
    order: Tensor | None = None
    blocks: Tensor | None = None

    def __post_init__(self) -> None:
        if self.order is not None:
            self.inverse = torch.argsort(self.order)

    @property
    def size(self) -> int:
        return int(self.values.shape[0])

    def _blocks_right(self, V: Tensor, transpose: bool) -> Tensor:
        """``V diag(Q_1, ..., Q_C)`` (``transpose``: ``V diag(Q_1, ..., Q_C)^T``) on the last axis."""
        C, k, _ = self.blocks.shape
        pattern = "...ci,cij->...cj" if not transpose else "...cj,cij->...ci"
        return torch.einsum(pattern, V.reshape(*V.shape[:-1], C, k), self.blocks).reshape(V.shape)

    def rotate_cols(self, V: Tensor) -> Tensor:
        """``V Q`` on the last axis."""
        if self.blocks is not None:
            return self._blocks_right(V, transpose=False)[..., self.order]
        return V[..., self.order] if self.q is None else V @ self.q

    def unrotate_cols(self, C: Tensor) -> Tensor:
        """``C Q^T`` on the last axis."""
        if self.blocks is not None:
            return self._blocks_right(C[..., self.inverse], transpose=True)
        return C[..., self.inverse] if self.q is None else C @ self.q.T

    def rotate_rows(self, V: Tensor) -> Tensor:
        """``Q^T V`` on the second-to-last axis."""
        if self.blocks is not None:
            return self.rotate_cols(V.transpose(-1, -2)).transpose(-1, -2)
        return V[..., self.order, :] if self.q is None else self.q.T @ V

    def unrotate_rows(self, C: Tensor) -> Tensor:
        """``Q C`` on the second-to-last axis."""
        if self.blocks is not None:
            return self.unrotate_cols(C.transpose(-1, -2)).transpose(-1, -2)
        return C[..., self.inverse, :] if self.q is None else self.q @ C

    def column(self, i: int) -> Tensor:
        """Eigenvector ``i`` as a dense vector."""
        if self.q is not None:
            return self.q[:, i]
        out = torch.zeros(self.size, dtype=self.values.dtype, device=self.values.device)
        if self.blocks is not None:
            k = self.blocks.shape[1]
            c, j = divmod(int(self.order[i]), k)
            out[c * k : (c + 1) * k] = self.blocks[c, :, j]
            return out
        out[self.order[i]] = 1.0
        return out

    def dense(self) -> Tensor:
        """``Q`` as a dense matrix (``size²`` numbers: for tests and small factors)."""
        if self.q is not None:
            return self.q
        return torch.stack([self.column(i) for i in range(self.size)], dim=1)

    @classmethod
    def of(
        cls, factor: np.ndarray | Tensor, *, dtype: torch.dtype, device: torch.device, name: str = "X"
    ) -> FactorBasis:
        """Decompose a dense ``(n, n)``, diagonal ``(n,)`` or blocks ``(C, k, k)`` factor with the spectrum
        engine (float64)."""
        from curvlab.analysis.spectrum.engine import decompose_factor

        x = factor.detach().cpu().numpy() if isinstance(factor, Tensor) else np.asarray(factor)
        eig = decompose_factor(x, dtype="float64", name=name)
        values = torch.as_tensor(eig.eigenvalues, dtype=dtype, device=device)
        if eig.kind == "diagonal":
            return cls(values, order=torch.as_tensor(eig.order, device=device))
        if eig.kind == "blocks":
            return cls(
                values,
                order=torch.as_tensor(eig.order, device=device),
                blocks=torch.as_tensor(np.asarray(eig.eigenvectors), dtype=dtype, device=device),
            )
        return cls(values, q=torch.as_tensor(np.asarray(eig.eigenvectors), dtype=dtype, device=device))


_KINDS = {1: "diagonal", 2: "dense", 3: "blocks"}


def _factor_times(S: Tensor, V: Tensor) -> Tensor:
    """``S V`` on the second-to-last axis (``S`` dense or diagonal)."""
    return S[:, None] * V if S.dim() == 1 else S @ V


def _times_factor(V: Tensor, A: Tensor) -> Tensor:
    """``V A`` on the last axis (``A`` dense, diagonal, or blocks ``(C, k, k)``: ``diag(A_1, ..., A_C)``)."""
    if A.dim() == 1:
        return V * A
    if A.dim() == 3:
        C, k, _ = A.shape
        return torch.einsum("...ci,cij->...cj", V.reshape(*V.shape[:-1], C, k), A).reshape(V.shape)
    return V @ A


def _trace(X: Tensor) -> Tensor:
    """``tr X`` of a dense, diagonal or blocks factor."""
    return X.sum() if X.dim() == 1 else X.diagonal(dim1=-2, dim2=-1).sum()


def to_kfe(V: Tensor, bs: FactorBasis, ba: FactorBasis) -> Tensor:
    """``Q_S^T V Q_A`` for a batch ``V`` of shape ``(k, m, n)``."""
    return ba.rotate_cols(bs.rotate_rows(V))


def from_kfe(C: Tensor, bs: FactorBasis, ba: FactorBasis) -> Tensor:
    """``Q_S C Q_A^T`` (the inverse of :func:`to_kfe`)."""
    return ba.unrotate_cols(bs.unrotate_rows(C))


class CurvatureOperator:
    """A symmetric linear operator on the weights of a :class:`ParameterLayout` (block-wise ``_apply``)."""

    layout: ParameterLayout
    dtype: torch.dtype
    device: torch.device

    def _apply(self, blocks: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int]:
        return (self.layout.dim, self.layout.dim)

    def matmat(self, x: Any) -> Any:
        """The operator times ``x`` — ``(D,)``/``(D, k)`` tensor, dict of matrices or parameter list —
        returned in the same form (and, for tensors, the same floating dtype)."""
        blocks, form, single = self.layout.to_blocks(x)
        dtypes = {name: b.dtype for name, b in blocks.items()}
        inputs = {name: b.to(device=self.device, dtype=self.dtype) for name, b in blocks.items()}
        for name, b in inputs.items():
            if not torch.isfinite(b).all():
                raise OptionError(f"layer {name}: the vector has non-finite entries")
        out = self._apply(inputs)
        out = {
            name: b.to(dtype=dtypes[name] if dtypes[name].is_floating_point else self.dtype)
            for name, b in out.items()
        }
        return self.layout.from_blocks(out, form, single)

    matvec = matmat

    def __matmul__(self, x: Any) -> Any:
        return self.matmat(x)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` view (float64 numpy vectors in the flat layout)."""
        from scipy.sparse.linalg import LinearOperator

        def apply(x: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.asarray(x, dtype=np.float64))
            return self.matmat(t).cpu().numpy()

        return LinearOperator(
            self.shape, matvec=apply, rmatvec=apply, matmat=apply, rmatmat=apply, dtype=np.float64
        )

    def to_dense(self, max_dim: int = 8192) -> Tensor:
        """The ``D × D`` matrix (for small models and tests; refused above ``max_dim``)."""
        if self.layout.dim > max_dim:
            raise OptionError(f"the operator has dimension {self.layout.dim}, above max_dim={max_dim}")
        return self.matmat(torch.eye(self.layout.dim, dtype=self.dtype, device=self.device))


class FunctionOperator(CurvatureOperator):
    """An operator given by its block-wise application (the inverses below)."""

    def __init__(
        self,
        layout: ParameterLayout,
        apply: Callable[[dict[str, Tensor]], dict[str, Tensor]],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.layout, self._fn, self.dtype, self.device = layout, apply, dtype, device

    def _apply(self, blocks: dict[str, Tensor]) -> dict[str, Tensor]:
        return self._fn(blocks)


def _check_damping(damping: float, *, positive: bool) -> float:
    damping = float(damping)
    if not math.isfinite(damping) or damping < 0 or (positive and damping == 0):
        raise OptionError(f"damping must be {'> 0' if positive else '>= 0'} and finite, got {damping}")
    return damping


class _KFEOperator(CurvatureOperator):
    """What K-FAC and EKFAC share: a basis per layer and eigenvalues in it."""

    def bases(self) -> dict[str, tuple[FactorBasis, FactorBasis]]:
        raise NotImplementedError

    def kfe_eigenvalues(self, name: str) -> Tensor:
        """The ``m × n`` eigenvalues of layer ``name`` in its KFE (rows: ``S`` side, columns: ``A`` side)."""
        raise NotImplementedError

    def _exact_inverse(self, damping: float) -> FunctionOperator:
        bases = self.bases()
        values = {name: self.kfe_eigenvalues(name) + damping for name in bases}

        def apply(blocks: dict[str, Tensor]) -> dict[str, Tensor]:
            return {
                name: from_kfe(to_kfe(V, *bases[name]) / values[name], *bases[name])
                for name, V in blocks.items()
            }

        return FunctionOperator(self.layout, apply, self.dtype, self.device)

    def eigenvalues(self):
        """The whole spectrum as a :class:`~curvlab.analysis.spectrum.KroneckerSpectrum` (exact counts,
        quantiles and order statistics without materialising it)."""
        raise NotImplementedError

    def top_eigenpairs(self, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` largest eigenvalues (descending) and their eigenvectors as the columns of a ``(D, k)``
        tensor in the flat layout (ties broken by layer order)."""
        k = min(int(k), self.layout.dim)
        candidates = []  # (value, layer, i, j)
        for block in self.layout.blocks:
            for value, i, j in self._layer_top(block.name, k):
                candidates.append((value, block.name, i, j))
        candidates.sort(key=lambda c: -c[0])
        chosen = candidates[:k]
        bases = self.bases()
        vectors = torch.zeros(self.layout.dim, len(chosen), dtype=self.dtype, device=self.device)
        for col, (_, name, i, j) in enumerate(chosen):
            block = self.layout.index[name]
            bs, ba = bases[name]
            vectors[block.offset : block.offset + block.size, col] = torch.outer(
                bs.column(i), ba.column(j)
            ).reshape(-1)
        values = torch.tensor([c[0] for c in chosen], dtype=self.dtype, device=self.device)
        return values, vectors

    def _layer_top(self, name: str, k: int) -> list[tuple[float, int, int]]:
        values = self.kfe_eigenvalues(name)
        flat = values.reshape(-1)
        top = torch.topk(flat, min(k, flat.numel()))
        n = values.shape[1]
        return [(float(v), int(p) // n, int(p) % n) for v, p in zip(top.values, top.indices, strict=True)]

    def trace(self) -> float:
        return float(sum(self.kfe_eigenvalues(b.name).sum() for b in self.layout.blocks))

    def logdet(self, damping: float = 0.0) -> float:
        """``log det(F + λ I) = Σ log(λ_i + λ)`` over every eigenvalue (``-inf`` if one is 0 at ``λ = 0``)."""
        damping = _check_damping(damping, positive=False)
        return float(sum(torch.log(self.kfe_eigenvalues(b.name) + damping).sum() for b in self.layout.blocks))

    def frobenius_norm(self) -> float:
        return math.sqrt(float(sum((self.kfe_eigenvalues(b.name) ** 2).sum() for b in self.layout.blocks)))


class KFACOperator(_KFEOperator):
    """The K-FAC curvature ``blockdiag_l(S_l ⊗ A_l)`` of a FactorSet or a checkpoint step (module docstring).

    ``factors``: a mapping layer -> :class:`~curvlab.io.checkpoint.LayerFactors` (a
    :class:`~curvlab.capture.factors.FactorSet`, or ``Step.factors``). ``model``: optional, needed only
    to multiply parameter lists (:mod:`curvlab.analysis.layout`).
    """

    def __init__(
        self,
        factors: Mapping[str, Any],
        *,
        model: nn.Module | None = None,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device = "cpu",
    ) -> None:
        self.layout = ParameterLayout.from_factors(factors)
        self.dtype, self.device = dtype, torch.device(device)
        self.kinds: dict[str, tuple[str, str]] = {}
        self.S: dict[str, Tensor] = {}
        self.A: dict[str, Tensor] = {}
        for name, f in factors.items():
            for which in ("S", "A"):
                x = torch.as_tensor(np.asarray(getattr(f, which)), dtype=dtype, device=self.device)
                if not torch.isfinite(x).all():
                    raise OptionError(f"layer {name}: factor {which} has non-finite entries")
                getattr(self, which)[name] = x if x.dim() == 1 else (x + x.transpose(-1, -2)) / 2
            self.kinds[name] = (_KINDS[self.S[name].dim()], _KINDS[self.A[name].dim()])
        self.fisher_type = getattr(factors, "fisher_type", None)
        self.num_examples = getattr(factors, "num_examples", None)
        self._bases: dict[str, tuple[FactorBasis, FactorBasis]] | None = None
        if model is not None:
            self.layout.bind(model)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        step: int | str = "latest",
        *,
        layers: Sequence[str] | str | None = None,
        model: nn.Module | None = None,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device = "cpu",
    ) -> KFACOperator:
        """The operator of one step of a factor checkpoint (``"latest"`` or a step number; ``layers``:
        fnmatch globs). The file is validated while it is read (docs/format.md)."""
        from curvlab.io.checkpoint import load

        ckpt = load(os.fspath(path), steps=step, layers=layers, weights=False)
        (record,) = ckpt.steps.values()
        op = cls(record.factors, model=model, dtype=dtype, device=device)
        op.fisher_type, op.num_examples, op.step = record.fisher_type, record.num_examples, record.step
        return op

    def _apply(self, blocks: dict[str, Tensor]) -> dict[str, Tensor]:
        return {
            name: _times_factor(_factor_times(self.S[name], V), self.A[name]) for name, V in blocks.items()
        }

    def bases(self) -> dict[str, tuple[FactorBasis, FactorBasis]]:
        """The KFE of every layer, decomposed once by the spectrum engine (float64)."""
        if self._bases is None:
            self._bases = {
                name: (
                    FactorBasis.of(self.S[name], dtype=self.dtype, device=self.device, name=f"{name}: S"),
                    FactorBasis.of(self.A[name], dtype=self.dtype, device=self.device, name=f"{name}: A"),
                )
                for name in self.S
            }
        return self._bases

    def kfe_eigenvalues(self, name: str) -> Tensor:
        bs, ba = self.bases()[name]
        return torch.outer(bs.values, ba.values)

    def inverse(self, damping: float, method: str = "exact") -> FunctionOperator:
        """``(K-FAC + λ I)^-1`` (``"exact"``) or the optimizer's factored Tikhonov inverse
        (``"factored"``; a ``NormAffine`` entry, whose blocks the optimizer damps with plain Tikhonov
        ``(S F_c + λ I)^-1``, is inverted exactly by both)."""
        damping = _check_damping(damping, positive=True)
        if method == "exact":
            return self._exact_inverse(damping)
        if method != "factored":
            raise OptionError(f"unknown inverse method {method!r}; choose exact or factored")
        from curvlab.optim.kfac import factored_damping

        bases = self.bases()
        damped = {}
        for name, (bs, ba) in bases.items():
            if ba.blocks is not None:  # the optimizer's Tikhonov (s F_c + λ I)^-1 per channel: exact here
                damped[name] = torch.outer(bs.values, ba.values) + damping
            else:
                ds, da = factored_damping(bs.values, ba.values, damping)
                damped[name] = ds[:, None] * da[None, :]

        def apply(blocks: dict[str, Tensor]) -> dict[str, Tensor]:
            return {
                name: from_kfe(to_kfe(V, *bases[name]) / damped[name], *bases[name])
                for name, V in blocks.items()
            }

        return FunctionOperator(self.layout, apply, self.dtype, self.device)

    def eigenvalues(self):
        from curvlab.analysis.spectrum.kronecker import KroneckerSpectrum

        return KroneckerSpectrum(
            [(bs.values.cpu().numpy(), ba.values.cpu().numpy()) for bs, ba in self.bases().values()]
        )

    def _layer_top(self, name: str, k: int) -> list[tuple[float, int, int]]:
        """Top ``k`` products from the top ``k`` of each factor (the ``k`` largest products use no others)."""
        bs, ba = self.bases()[name]
        i0, j0 = max(bs.size - k, 0), max(ba.size - k, 0)
        sub = torch.outer(bs.values[i0:], ba.values[j0:])
        top = torch.topk(sub.reshape(-1), min(k, sub.numel()))
        n = sub.shape[1]
        return [
            (float(v), i0 + int(p) // n, j0 + int(p) % n)
            for v, p in zip(top.values, top.indices, strict=True)
        ]

    def trace(self) -> float:
        """``Σ_l tr(S_l) tr(A_l)``, from the factors (no decomposition)."""
        total = 0.0
        for name in self.S:
            S, A = self.S[name], self.A[name]
            total += float(_trace(S) * _trace(A))
        return total

    def logdet(self, damping: float = 0.0, method: str = "exact") -> float:
        """``log det`` of ``K-FAC + λ I`` (``"exact"``) or of the factored damping's matrix
        ``(S + √λ/π I) ⊗ (A + π√λ I)`` (``"factored"``: ``n Σ log(σ_i + √λ/π) + m Σ log(α_j + π√λ)``;
        a ``NormAffine`` entry's ``S ⊗ A + λ I`` either way, as :meth:`inverse`)."""
        damping = _check_damping(damping, positive=False)
        total = 0.0
        for bs, ba in self.bases().values():
            if method == "factored" and ba.blocks is None:
                from curvlab.optim.kfac import factored_damping

                ds, da = factored_damping(bs.values, ba.values, _check_damping(damping, positive=True))
                total += ba.size * float(torch.log(ds).sum()) + bs.size * float(torch.log(da).sum())
            elif damping == 0.0:
                total += ba.size * float(torch.log(bs.values).sum()) + bs.size * float(
                    torch.log(ba.values).sum()
                )
            else:
                rows = max(1, (1 << 22) // ba.size)  # ~32 MiB of products at a time
                for start in range(0, bs.size, rows):
                    total += float(
                        torch.log(torch.outer(bs.values[start : start + rows], ba.values) + damping).sum()
                    )
        return total

    def frobenius_norm(self) -> float:
        """``sqrt(Σ_l ‖S_l‖_F² ‖A_l‖_F²)``."""
        return math.sqrt(sum(float((self.S[n] ** 2).sum() * (self.A[n] ** 2).sum()) for n in self.S))


class EKFACOperator(_KFEOperator):
    """EKFAC: the KFE of K-FAC with eigenvalues ``Λ_l`` (``m × n`` per layer) in place of ``σ α^T``.

    ``bases``: per layer ``(basis of S, basis of A)`` — the basis the eigenvalues were computed in;
    ``eigenvalues``: per layer the ``m × n`` second moments, ``Λ[i, j]`` along ``Q_S[:, i] Q_A[:, j]^T``.
    """

    def __init__(
        self,
        layout: ParameterLayout,
        bases: Mapping[str, tuple[FactorBasis, FactorBasis]],
        eigenvalues: Mapping[str, np.ndarray | Tensor],
        *,
        model: nn.Module | None = None,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device = "cpu",
    ) -> None:
        self.layout, self.dtype, self.device = layout, dtype, torch.device(device)
        self._bases = dict(bases)
        self.values: dict[str, Tensor] = {}
        for block in layout.blocks:
            if block.name not in eigenvalues or block.name not in bases:
                raise OptionError(f"layer {block.name}: no EKFAC eigenvalues or basis")
            lam = torch.as_tensor(
                np.asarray(eigenvalues[block.name])
                if not isinstance(eigenvalues[block.name], Tensor)
                else eigenvalues[block.name],
                dtype=dtype,
                device=self.device,
            )
            if tuple(lam.shape) != (block.m, block.n):
                raise OptionError(
                    f"layer {block.name}: EKFAC eigenvalues of shape {tuple(lam.shape)}, "
                    f"expected {block.m} × {block.n}"
                )
            if not torch.isfinite(lam).all() or (lam < 0).any():
                raise OptionError(f"layer {block.name}: EKFAC eigenvalues must be finite and >= 0")
            self.values[block.name] = lam
        if model is not None:
            self.layout.bind(model)

    @classmethod
    def from_kfac(cls, kfac: KFACOperator, eigenvalues: Mapping[str, np.ndarray | Tensor]) -> EKFACOperator:
        """EKFAC in ``kfac``'s own basis (:meth:`KFACOperator.bases`); ``eigenvalues`` in that order."""
        op = cls(kfac.layout, kfac.bases(), eigenvalues, dtype=kfac.dtype, device=kfac.device)
        return op

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        step: int | str = "latest",
        *,
        model: nn.Module | None = None,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device = "cpu",
    ) -> EKFACOperator:
        """The operator of an EKFAC file written by ``curvlab gradcov --ekfac`` (docs/format.md)."""
        from curvlab.io.ekfac import read_ekfac

        record = read_ekfac(os.fspath(path), step)
        dev = torch.device(device)
        layout = ParameterLayout(
            [
                (name, layer.module_type, layer.weight_shape, layer.has_bias, *layer.eigenvalues.shape)
                for name, layer in record.layers.items()
            ]
        )
        bases = {}
        for name, layer in record.layers.items():
            pair = []
            for which in ("S", "A"):
                values = torch.as_tensor(getattr(layer, f"{which}_eigenvalues"), dtype=dtype, device=dev)
                vectors, order = getattr(layer, f"{which}_eigenvectors"), getattr(layer, f"{which}_order")
                if order is None:
                    pair.append(FactorBasis(values, q=torch.as_tensor(vectors, dtype=dtype, device=dev)))
                    continue
                blocks = None if vectors is None else torch.as_tensor(vectors, dtype=dtype, device=dev)
                pair.append(FactorBasis(values, order=torch.as_tensor(order, device=dev), blocks=blocks))
            bases[name] = tuple(pair)
        op = cls(
            layout,
            bases,
            {n: lay.eigenvalues for n, lay in record.layers.items()},
            model=model,
            dtype=dtype,
            device=device,
        )
        op.step, op.fisher_type, op.num_examples = record.step, record.fisher_type, record.num_examples
        return op

    def bases(self) -> dict[str, tuple[FactorBasis, FactorBasis]]:
        return self._bases

    def kfe_eigenvalues(self, name: str) -> Tensor:
        return self.values[name]

    def _apply(self, blocks: dict[str, Tensor]) -> dict[str, Tensor]:
        return {
            name: from_kfe(to_kfe(V, *self._bases[name]) * self.values[name], *self._bases[name])
            for name, V in blocks.items()
        }

    def inverse(self, damping: float) -> FunctionOperator:
        """``(EKFAC + λ I)^-1 = Q diag(1 / (Λ + λ)) Q^T``."""
        return self._exact_inverse(_check_damping(damping, positive=True))

    def eigenvalues(self):
        """The ``Λ_ij`` of every layer as a :class:`~curvlab.analysis.spectrum.KroneckerSpectrum`: each layer
        enters as the pair ``(all its Λ_ij, [1])``, whose products are the ``Λ_ij`` themselves."""
        from curvlab.analysis.spectrum.kronecker import KroneckerSpectrum

        return KroneckerSpectrum([(v.reshape(-1).cpu().numpy(), np.ones(1)) for v in self.values.values()])
