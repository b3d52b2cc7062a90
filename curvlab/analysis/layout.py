"""The parameter layout shared by every curvature operator: layers, their ``m × n`` matrices, one vector.

A curvature operator (:mod:`curvlab.analysis.operators`, :mod:`curvlab.analysis.ggn`) acts on the
weights of the layers that have K-FAC factors. Layer ``l`` is, in normal form
(:mod:`curvlab.capture.layers`, design.md), the ``m_l × n_l`` matrix ``W_l`` (bias as the last column;
``E^T`` for an Embedding, ``E`` for a tied embedding / pre-softmax weight), and the operator's vector
space is the concatenation of the row-major ``vec W_l`` in the layers' order::

    v = [vec W_1, vec W_2, …],      D = Σ_l m_l n_l,      vec(W)[i n + j] = W[i, j].

With this ``vec``, ``(S ⊗ A) vec W = vec(S W A)`` (seed eq. 13, ``A`` and ``S`` symmetric).

A vector (or ``k`` of them) can be given three ways, and comes back the way it was given:

* a tensor ``(D,)`` or ``(D, k)`` in the layout above;
* a dict ``{layer: (m, n)}`` or ``{layer: (k, m, n)}`` of matrices;
* a list of tensors shaped like the model's parameters (:meth:`ParameterLayout.parameters`: per layer
  its weight, then its bias, each parameter once), each with an extra trailing dimension ``k`` for
  several vectors (as curvlinops does). This needs the model: the layers' adapters map parameters to
  ``W`` and back (``to_matrix`` / ``from_matrix``, and ``rows``: the q, k and v entries of an attention
  are row blocks of one packed ``in_proj_weight``), so any layer type with an adapter plugs in. Rows of
  a parameter that no layer of the layout uses (a projection left out by ``layers=``) are not part of
  the operator's space: they are ignored on the way in and zero on the way out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.errors import OptionError


def factor_size(factor: Any) -> int:
    """The side of a factor as a matrix: ``n`` for dense ``(n, n)`` or diagonal ``(n,)``, ``C·k`` for blocks
    ``(C, k, k)`` (the block-diagonal ``A`` of a ``NormAffine`` entry)."""
    shape = tuple(factor.shape)
    return int(shape[0] * shape[1]) if len(shape) == 3 else int(shape[0])


@dataclass(frozen=True)
class LayerBlock:
    """One layer of a layout: its name, checkpoint metadata, matrix size ``m × n`` and offset in ``v``."""

    name: str
    module_type: str
    weight_shape: tuple[int, ...]
    has_bias: bool
    m: int
    n: int
    offset: int

    @property
    def size(self) -> int:
        return self.m * self.n


class ParameterLayout:
    """The layers of an operator in order, and the conversions between the three vector forms."""

    def __init__(self, blocks: Sequence[tuple[str, str, tuple[int, ...], bool, int, int]]) -> None:
        self.blocks: list[LayerBlock] = []
        offset = 0
        for name, module_type, weight_shape, has_bias, m, n in blocks:
            self.blocks.append(
                LayerBlock(name, module_type, tuple(weight_shape), bool(has_bias), m, n, offset)
            )
            offset += m * n
        if not self.blocks:
            raise OptionError("a curvature operator needs at least one layer")
        self.dim = offset
        self.index = {b.name: b for b in self.blocks}
        self._sources: dict[str, tuple[Any, Any]] | None = None

    @classmethod
    def from_factors(cls, factors: Mapping[str, Any]) -> ParameterLayout:
        """The layout of a FactorSet / checkpoint step: ``m`` = size of ``S``, ``n`` = size of ``A``
        (:func:`factor_size`: ``C·k`` for a ``NormAffine`` entry's blocks)."""
        return cls(
            [
                (name, f.module_type, f.weight_shape, f.has_bias, factor_size(f.S), factor_size(f.A))
                for name, f in factors.items()
            ]
        )

    def same_as(self, other: ParameterLayout) -> bool:
        return [(b.name, b.m, b.n) for b in self.blocks] == [(b.name, b.m, b.n) for b in other.blocks]

    # ------------------------------------------------------------------------------ the model

    def bind(self, model: nn.Module) -> None:
        """Find every layer of the layout in ``model`` (its module or tied pair, and its adapter).

        Raises :class:`OptionError` when a layer is missing or its matrix does not have the layout's size.
        """
        import warnings

        from curvlab.capture.factors import select_layers

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # factor capture warns about the layers it leaves out
            selected = select_layers(model)
        sources = {}
        for block in self.blocks:
            if block.name not in selected:
                raise OptionError(f"layer {block.name}: not a layer with K-FAC factors in the model")
            source, adapter = selected[block.name]
            weight, bias = adapter.parameters(source)
            m, n = adapter.to_matrix(source, weight.detach(), None if bias is None else bias.detach()).shape
            if (m, n) != (block.m, block.n):
                raise OptionError(
                    f"layer {block.name}: the model's weight matrix is {m} × {n}, "
                    f"the factors' {block.m} × {block.n}"
                )
            sources[block.name] = (source, adapter)
        self._sources = sources

    def sources(self) -> dict[str, tuple[Any, Any]]:
        if self._sources is None:
            raise OptionError(
                "parameter lists need the model: pass model= when building the operator (for a "
                "checkpoint: curvlab.io.restore.rebuild_model(path, step)[0])"
            )
        return self._sources

    def parameters(self) -> list[Tensor]:
        """The model's parameters the operator acts on, each once, in the layers' order (per layer its
        weight, then its bias). An attention's packed ``in_proj_weight`` is one parameter holding the
        rows of its q, k and v entries; a tied weight is one parameter."""
        out: dict[int, Tensor] = {}
        for source, adapter in self.sources().values():
            for param in adapter.parameters(source):
                if param is not None:
                    out.setdefault(id(param), param)
        return list(out.values())

    def _parts(self) -> list[tuple[LayerBlock, Any, Any, list[tuple[int, slice | None]]]]:
        """Per layer ``(block, source, adapter, [(index in parameters(), rows or None), ...])`` for its
        weight and bias (``rows``: the rows of the parameter that make up ``W``, ``None``: all)."""
        index = {id(p): i for i, p in enumerate(self.parameters())}
        out = []
        for block, (source, adapter) in zip(self.blocks, self.sources().values(), strict=True):
            params = adapter.parameters(source)
            parts = [
                (index[id(param)], rows)
                for param, rows in zip(params, adapter.rows(source), strict=True)
                if param is not None
            ]
            out.append((block, source, adapter, parts))
        return out

    def params_to_matrices(self, tensors: Sequence[Tensor]) -> dict[str, Tensor]:
        """``{layer: W (m × n)}`` from one tensor per :meth:`parameters` entry, shaped like it (e.g. a
        gradient): each layer reads its rows (rows no layer uses are not part of the operator's space)."""
        out = {}
        for block, source, adapter, parts in self._parts():
            weight, bias = (tensors[i] for i, _ in parts) if len(parts) == 2 else (tensors[parts[0][0]], None)
            out[block.name] = adapter.to_matrix(source, weight, bias)
        return out

    def matrices_to_params(self, matrices: Mapping[str, Tensor]) -> list[Tensor]:
        """The inverse of :meth:`params_to_matrices`: one tensor per :meth:`parameters` entry, each layer's
        ``W`` written into its rows, zero in rows no layer uses."""
        params = self.parameters()
        first = next(iter(matrices.values()))
        out = [torch.zeros(p.shape, dtype=first.dtype, device=first.device) for p in params]
        for block, source, adapter, parts in self._parts():
            pieces = adapter.from_matrix(source, matrices[block.name])
            for (i, rows), piece in zip(parts, [p for p in pieces if p is not None], strict=True):
                if rows is None:
                    out[i] = piece.reshape(params[i].shape).to(first.dtype)
                else:
                    out[i][rows] = piece
        return out

    # ------------------------------------------------------------------------------ conversions

    def to_blocks(self, x: Any) -> tuple[dict[str, Tensor], str, bool]:
        """``({layer: (k, m, n)}, form, single)`` from any of the three forms (see the module docstring)."""
        if isinstance(x, Tensor):
            single = x.dim() == 1
            flat = x[:, None] if single else x
            if flat.dim() != 2 or flat.shape[0] != self.dim:
                raise OptionError(
                    f"expected a vector of length {self.dim} or a ({self.dim}, k) matrix, "
                    f"got {tuple(x.shape)}"
                )
            k = flat.shape[1]
            blocks = {b.name: flat[b.offset : b.offset + b.size].T.reshape(k, b.m, b.n) for b in self.blocks}
            return blocks, "flat", single
        if isinstance(x, Mapping):
            if set(x) != set(self.index):
                missing = sorted(set(self.index) - set(x)) or sorted(set(x) - set(self.index))
                raise OptionError(
                    f"the matrices must be exactly the operator's layers (differs at {missing[0]})"
                )
            first = next(iter(x.values()))
            single = first.dim() == 2
            blocks = {}
            for b in self.blocks:
                mat = x[b.name][None] if single else x[b.name]
                if tuple(mat.shape[1:]) != (b.m, b.n):
                    raise OptionError(
                        f"layer {b.name}: expected a {b.m} × {b.n} matrix, got {tuple(x[b.name].shape)}"
                    )
                blocks[b.name] = mat
            return blocks, "dict", single
        if isinstance(x, (list, tuple)):
            return self._params_to_blocks(list(x))
        raise OptionError(
            f"cannot multiply a {type(x).__name__}: give a tensor, a dict of matrices or a parameter list"
        )

    def _params_to_blocks(self, tensors: list[Tensor]) -> tuple[dict[str, Tensor], str, bool]:
        params = self.parameters()
        if len(tensors) != len(params):
            raise OptionError(
                f"expected {len(params)} tensors (the operator's parameters), got {len(tensors)}"
            )
        single = tuple(tensors[0].shape) == tuple(params[0].shape)
        for t, p in zip(tensors, params, strict=True):
            want = tuple(p.shape) if single else (*p.shape, tensors[0].shape[-1])
            if not isinstance(t, Tensor) or tuple(t.shape) != want:
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise OptionError(
                    f"parameter {self._param_name(p)}: expected a tensor of shape {want}, got {got}"
                )
        columns = [tensors] if single else [[t[..., j] for t in tensors] for j in range(tensors[0].shape[-1])]
        matrices = [self.params_to_matrices(c) for c in columns]
        blocks = {b.name: torch.stack([m[b.name] for m in matrices]) for b in self.blocks}
        return blocks, "params", single

    def _param_name(self, param: Tensor) -> str:
        """Which layer's parameter ``param`` is, for messages (the first layer that uses it)."""
        for block, (source, adapter) in zip(self.blocks, self.sources().values(), strict=True):
            weight, bias = adapter.parameters(source)
            if param is weight:
                return f"{block.name} (weight)"
            if param is bias:
                return f"{block.name} (bias)"
        return "?"

    def from_blocks(self, blocks: Mapping[str, Tensor], form: str, single: bool) -> Any:
        """The inverse of :meth:`to_blocks`: ``{layer: (k, m, n)}`` back in ``form``."""
        if form == "flat":
            flat = torch.cat(
                [blocks[b.name].reshape(blocks[b.name].shape[0], -1) for b in self.blocks], dim=1
            ).T
            return flat[:, 0] if single else flat
        if form == "dict":
            return {b.name: (blocks[b.name][0] if single else blocks[b.name]) for b in self.blocks}
        k = next(iter(blocks.values())).shape[0]
        columns = [self.matrices_to_params({name: b[j] for name, b in blocks.items()}) for j in range(k)]
        if single:
            return columns[0]
        return [torch.stack([c[i] for c in columns], dim=-1) for i in range(len(columns[0]))]
