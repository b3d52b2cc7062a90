"""K-FAC factors in and out of the peers' formats: curvlinops' ``KFACLinearOperator`` and kronfluence's
factor files (safetensors).

Both peers estimate the same Kronecker factors as curvlab with other normalisations (docs/factors.md,
"Mapping to curvlinops" and "Mapping to kronfluence"); the conversions need, per layer, its number of
locations ``T`` (1 for a Linear on vectors, the output pixels of a convolution, the tokens of a
sequence), which the factors do not record: it is measured by one forward pass of an example input
(:func:`layer_locations`). Only the layer types a peer supports (Linear and Conv2d for both) are
converted; any other layer is refused by name.

* :mod:`curvlab.io.peers.curvlinops` — :func:`to_curvlinops`, :func:`from_curvlinops`;
* :mod:`curvlab.io.peers.kronfluence` — :func:`save_kronfluence`, :func:`load_kronfluence`.

Neither peer is a dependency of curvlab: they are imported only when converting (``pip install
'curvlab[bench]'``, or ``make bench``).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from curvlab.errors import OptionError

PEER_MODULES = ("Linear", "Conv2d")


def layer_locations(model: nn.Module, example_input: Tensor, names: list[str]) -> dict[str, int]:
    """``T`` of every layer in ``names``: its locations per example, from one forward pass of
    ``example_input`` (one example suffices; its batch dimension is kept)."""
    from curvlab.capture.factors import select_layers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        selected = select_layers(model)
    found: dict[str, int] = {}
    handles = []
    for name in names:
        if name not in selected:
            raise OptionError(f"layer {name}: not a layer with K-FAC factors in the model")
        source, adapter = selected[name]
        if adapter.module_type not in PEER_MODULES:
            raise OptionError(
                f"layer {name}: {adapter.module_type} layers are not supported by the peers "
                f"({', '.join(PEER_MODULES)} only)"
            )

        def hook(module, inputs, output, name=name, adapter=adapter):
            found[name] = int(adapter.output_grads(module, output).shape[1])

        handles.append(source.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in found]
    if missing:
        raise OptionError(f"layer {missing[0]} was not used in the forward pass of the example input")
    return found
