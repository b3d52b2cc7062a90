"""The exact generalised Gauss-Newton matrix as an operator: GGN-vector products (Schraudolph 2002).

For a model with logits ``z_n = f(x_n; θ)`` and the per-example loss summed over its label locations,

    G = (1/N) Σ_n J_n^T H_n J_n,      J_n = ∂z_n/∂θ,      H_n = ∂²loss_n/∂z_n²,

the GGN (for softmax cross-entropy it equals the true Fisher, Martens 2014, and it is what K-FAC's
``S ⊗ A`` approximates block by block: docs/factors.md's normalisation). A product ``G v`` takes one
Jacobian-vector product (forward mode, ``torch.func.jvp``), the loss Hessian at the logits
(:func:`curvlab.capture.loss.hessian_vector_product`, the only thing this module asks of the loss) and
one vector-Jacobian product (``torch.func.vjp``, whose forward pass is shared by all the columns of a
``matmat``) per batch:

    G v = (1/N) Σ_batches vjp(H · jvp(v)).

``θ`` are the weights of the layers of a :class:`~curvlab.analysis.layout.ParameterLayout` (the layers
with K-FAC factors, by default all of them), in its ``vec W`` form, so a GGN and a K-FAC operator of
the same model multiply the same vectors; the other parameters (norm layers, ...) are held fixed.
A weight tied between an embedding and the pre-softmax layer moves in both uses. Where an operation
has no forward-mode derivative, ``J v`` is taken by double backward
(:func:`curvlab.analysis.curvature._jvp_reverse`); attention runs its math kernel.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvlab.analysis.curvature import _jvp_reverse
from curvlab.analysis.layout import ParameterLayout
from curvlab.analysis.operators import CurvatureOperator
from curvlab.capture.loss import hessian_vector_product
from curvlab.errors import OptionError


def model_layout(model: nn.Module, layers: Sequence[str] | None = None) -> ParameterLayout:
    """The layout of every layer of ``model`` with K-FAC factors (or those matching the globs ``layers``)."""
    from curvlab.capture.factors import select_layers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        selected = select_layers(model, layers)
    blocks = []
    for name, (source, adapter) in selected.items():
        weight, bias = adapter.parameters(source)
        m, n = adapter.to_matrix(source, weight.detach(), None if bias is None else bias.detach()).shape
        blocks.append(
            (name, adapter.module_type, adapter.weight_shape(source), adapter.has_bias(source), m, n)
        )
    layout = ParameterLayout(blocks)
    layout.bind(model)
    return layout


class GGNOperator(CurvatureOperator):
    """``G = (1/N) Σ_n J_n^T H_n J_n`` over ``batches`` of ``(inputs, labels)`` (module docstring).

    ``layout``: the layers (default: every layer with K-FAC factors), e.g. a K-FAC operator's
    ``layout`` to compare the two. The batches are kept (moved to the model's device); the model is used
    as it is (call ``.eval()`` first). ``matvecs`` counts GGN-vector products (one per column).
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Iterable[tuple[Tensor, Tensor]],
        *,
        layout: ParameterLayout | None = None,
        layers: Sequence[str] | None = None,
    ) -> None:
        self.model = model
        first = next(model.parameters())
        self.dtype, self.device = first.dtype, first.device
        if layout is None:
            layout = model_layout(model, layers)
        else:
            layout.bind(model)
        self.layout = layout
        self.batches = [(x.to(self.device), y) for x, y in batches]
        self.num_examples = sum(int(x.shape[0]) for x, _ in self.batches)
        if self.num_examples == 0:
            raise OptionError("the GGN needs at least one example")
        name_of = {id(p): name for name, p in model.named_parameters()}
        # functional_call names of the layout's parameters, each once (layout.parameters())
        self._names: list[str] = []
        for t in layout.parameters():
            if id(t) not in name_of:
                raise OptionError("a layer's weight is not a parameter of the model (a parametrization?)")
            self._names.append(name_of[id(t)])
        self.matvecs = 0
        self._forward_mode = True

    def _tangents(self, blocks: dict[str, Tensor], j: int) -> tuple[Tensor, ...]:
        """Column ``j`` as whole-parameter tangents (zero in rows no layer of the layout uses)."""
        out = self.layout.matrices_to_params({name: b[j] for name, b in blocks.items()})
        return tuple(t.to(self.dtype) for t in out)

    def _accumulate(self, out: dict[str, Tensor], grads: Sequence[Tensor], j: int) -> None:
        for name, matrix in self.layout.params_to_matrices(grads).items():
            out[name][j] += matrix

    def _apply(self, blocks: dict[str, Tensor]) -> dict[str, Tensor]:
        k = next(iter(blocks.values())).shape[0]
        out = {name: torch.zeros_like(b) for name, b in blocks.items()}
        tangents = [self._tangents(blocks, j) for j in range(k)]
        params = {name: p.detach() for name, p in self.model.named_parameters()}
        primals = tuple(params[n] for n in self._names)
        with sdpa_kernel(SDPBackend.MATH):
            for x, _ in self.batches:

                def logits_of(*layer_params: Tensor, x: Tensor = x) -> Tensor:
                    return functional_call(
                        self.model, dict(params, **dict(zip(self._names, layer_params, strict=True))), (x,)
                    )

                logits, pullback = vjp(logits_of, *primals)
                for j in range(k):
                    ju = self._jvp(logits_of, primals, tangents[j])
                    grads = pullback(hessian_vector_product(logits.detach(), ju))
                    self._accumulate(out, grads, j)
        self.matvecs += k
        return {name: b / self.num_examples for name, b in out.items()}

    def _jvp(self, fn, primals: tuple[Tensor, ...], tangent: tuple[Tensor, ...]) -> Tensor:
        if self._forward_mode:
            try:
                return jvp(fn, primals, tangent)[1]
            except (RuntimeError, NotImplementedError):
                self._forward_mode = False  # an operation without a forward-mode derivative
        return _jvp_reverse(fn, primals, tangent)[1]
