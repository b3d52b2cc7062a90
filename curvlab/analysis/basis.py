"""The Kronecker-factored eigenbasis (KFE) of one layer (design.md, "Kronecker-factored eigenbasis").

``A = Q_A diag(λ_A) Q_A^T`` and ``S = Q_S diag(λ_S) Q_S^T``; direction ``(i, j)`` is the weight
perturbation ``Q_S[:, i] Q_A[:, j]^T`` with K-FAC eigenvalue ``λ_S[i] λ_A[j]``. A diagonal factor (the tied
embedding's V-side ``S``, seed A.1) has a permutation for its eigenbasis and is kept as one
(:class:`LayerBasis`), never as the dense ``V × V`` matrix.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class LayerBasis:
    """The Kronecker-factored eigenbasis of one layer: ``Q_S`` (m×m), ``Q_A`` (n×n), eigenvalues.

    ``Q_A`` includes the bias row when the layer has a bias. Columns are eigenvectors, eigenvalues
    ascending (the order of ``torch.linalg.eigh``). A diagonal ``S`` (the tied embedding's V-side factor)
    has a permutation for its eigenbasis, ``Q_S = I[:, order_S]``, kept as the permutation: at
    ``V = 32768`` the dense matrix would be 8.6 GB in float64. :attr:`Q_S` densifies it on request (tests,
    small layers); the projections use :meth:`project_S`, :meth:`rotate_S` and :meth:`column_S`, which
    gather rows instead.
    """

    def __init__(self, Q_S: Tensor | None, Q_A: Tensor, eigenvalues_S: Tensor, eigenvalues_A: Tensor,
                 order_S: Tensor | None = None) -> None:
        if (Q_S is None) == (order_S is None):
            raise ValueError("a layer basis needs exactly one of Q_S (dense) and order_S (a permutation)")
        self._dense_S = Q_S
        self.order_S = order_S
        self.Q_A = Q_A
        self.eigenvalues_S = eigenvalues_S
        self.eigenvalues_A = eigenvalues_A

    @classmethod
    def from_factors(cls, S: np.ndarray | Tensor, A: np.ndarray | Tensor) -> LayerBasis:
        """Eigendecompose dense (2-D), diagonal (1-D) or blocks (3-D, a ``NormAffine`` ``A``) factors in
        float64; a diagonal ``S`` keeps its eigenbasis as a permutation (eigenvalues ascending)."""
        S = torch.as_tensor(S, dtype=torch.float64)
        lam_a, q_a = _eigh(torch.as_tensor(A, dtype=torch.float64))
        if S.ndim == 1:
            order = torch.argsort(S, stable=True)
            return cls(None, q_a, S[order], lam_a, order_S=order)
        lam_s, q_s = _eigh(S)
        return cls(q_s, q_a, lam_s, lam_a)

    @property
    def size_S(self) -> int:
        return int(self.eigenvalues_S.shape[0])

    @property
    def Q_S(self) -> Tensor:
        """The dense ``m × m`` eigenvectors of ``S`` (densifies a permutation: ``m²`` numbers)."""
        if self._dense_S is not None:
            return self._dense_S
        eye = torch.eye(self.size_S, dtype=self.Q_A.dtype, device=self.Q_A.device)
        return eye[:, self.order_S]

    def project_S(self, g: Tensor) -> Tensor:
        """``g Q_S`` over the last dimension."""
        return g @ self._dense_S if self._dense_S is not None else g[..., self.order_S]

    def rotate_S(self, M: Tensor) -> Tensor:
        """``Q_S^T M`` over the second-to-last dimension."""
        return self._dense_S.T @ M if self._dense_S is not None else M[..., self.order_S, :]

    def column_S(self, i: int) -> Tensor:
        """Eigenvector ``i`` of ``S`` (column ``i`` of ``Q_S``)."""
        if self._dense_S is not None:
            return self._dense_S[:, i]
        column = torch.zeros(self.size_S, dtype=self.Q_A.dtype, device=self.Q_A.device)
        column[self.order_S[i]] = 1
        return column

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LayerBasis:
        """The basis on ``device`` in ``dtype`` (the permutation stays integer)."""
        def move(t: Tensor | None, floating: bool = True) -> Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if floating else None)

        return LayerBasis(move(self._dense_S), move(self.Q_A), move(self.eigenvalues_S),
                          move(self.eigenvalues_A), order_S=move(self.order_S, floating=False))

    @property
    def blocks(self) -> bool:
        """Whether ``Q_A`` holds per-channel blocks (a ``NormAffine`` entry): ``(C, k, k)``, block ``c``'s
        eigenvectors, so ``Q_A`` as a matrix is ``diag(Q_A[0], ..., Q_A[C-1])`` and ``eigenvalues_A``
        lists each block's, in block order (length ``n = C·k``)."""
        return self.Q_A.dim() == 3

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)`` of the layer's weight matrix ``W``."""
        return self.size_S, int(self.eigenvalues_A.shape[0])

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
        return torch.outer(self.column_S(i), self.A_column(j))

    def kfac_eigenvalues(self) -> Tensor:
        """``λ_S[i] λ_A[j]`` as an ``m × n`` matrix."""
        return torch.outer(self.eigenvalues_S, self.eigenvalues_A)


def _eigh(x: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a diagonal (1-D), dense (2-D) or blocks (3-D, each
    block's eigenvalues in block order) factor."""
    if x.ndim == 1:
        order = torch.argsort(x)
        return x[order], torch.eye(len(x), dtype=x.dtype)[:, order]
    if x.ndim == 3:
        values, vectors = torch.linalg.eigh((x + x.transpose(1, 2)) / 2)
        return values.reshape(-1), vectors
    return torch.linalg.eigh((x + x.T) / 2)


def _permutation(Q_S: Tensor, name: str) -> Tensor:
    """``order`` with ``Q_S = I[:, order]``, the eigenbasis of a diagonal factor (see :func:`_eigh`)."""
    order = Q_S.argmax(dim=0)
    size = len(order)
    ones = bool((Q_S[order, torch.arange(size, device=Q_S.device)] == 1).all())
    if not (ones and int(torch.count_nonzero(Q_S)) == size and order.unique().numel() == size):
        raise ValueError(f"layer {name}: the tied entry's S must be diagonal (its eigenbasis a permutation)")
    return order
