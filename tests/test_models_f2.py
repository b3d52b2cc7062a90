"""Tests of the seed F.2 models with batch norm and the Transformer: resnet32, vgg11, transformer_shallow.

References are independent of the code under test: ghost batch norm is compared with
``torch.nn.functional.batch_norm`` called on each ghost batch in turn, attention with a hand-written
masked softmax, the tied weight's gradient with an untied copy, parameter counts with formulas.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvlab.capture.factors import collect_factors
from curvlab.errors import ModelError
from curvlab.io.data import iterate_batches, load_dataset
from curvlab.models import (
    available_models,
    build_from_config,
    build_model,
    data_options,
    model_config,
    parse_model_args,
)
from curvlab.models.layers import (
    GhostBatchNorm2d,
    attach_weight_projection,
    channel_norms,
    project_weights_,
    weight_normalized_convs,
)
from curvlab.models.transformer import PAPER_ARGS, sinusoidal_positions
from curvlab.models.vgg11 import pooled_size

CIFAR = (3, 32, 32)
DIGITS = (1, 8, 8)
NEW_MODELS = ["resnet32", "vgg11", "transformer_shallow"]
SMALL = {
    "resnet32": {"widths": [4, 8, 8]},
    "vgg11": {"channels": [4, 4, 8, 8, 8, 8, 8, 8]},
    "transformer_shallow": {"d_model": 16, "d_ff": 24, "heads": 2, "seq_len": 8, "vocab": 50},
}
SEQ = (8,)
VOCAB = 50


def shape_of(name: str) -> tuple[int, ...]:
    return SEQ if name == "transformer_shallow" else CIFAR


def classes_of(name: str) -> int:
    return VOCAB if name == "transformer_shallow" else 10


def inputs_for(name: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    if name == "transformer_shallow":
        return torch.randint(0, VOCAB, (n, *SEQ), generator=generator)
    return torch.randn(n, *CIFAR, generator=generator)


def labels_for(name: str, n: int) -> torch.Tensor:
    shape = (n, *SEQ) if name == "transformer_shallow" else (n,)
    return torch.randint(0, classes_of(name), shape)


def small(name: str, **extra) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, shape_of(name), classes_of(name), {**SMALL[name], **extra})


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registered() -> None:
    assert set(NEW_MODELS) <= set(available_models())


# --------------------------------------------------------------------------- ghost batch norm


def per_chunk_reference(
    bn: GhostBatchNorm2d, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """F.batch_norm on each ghost batch in turn, updating copies of the running statistics."""
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    outs = [
        F.batch_norm(chunk, mean, var, bn.weight, bn.bias, True, bn.momentum, bn.eps)
        for chunk in torch.split(x, bn.ghost_batch)
    ]
    return torch.cat(outs), mean, var


@pytest.mark.parametrize("n", [64, 70, 20, 33 + 32])
def test_ghost_bn_equals_per_chunk_batch_norm(n: int) -> None:
    # float64 so that the only difference is summation order: agreement to 1e-12.
    torch.manual_seed(0)
    bn = GhostBatchNorm2d(3, ghost_batch=32).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    reference = GhostBatchNorm2d(3, ghost_batch=32).double()
    reference.load_state_dict(bn.state_dict())
    x = (torch.randn(n, 3, 4, 5, dtype=torch.float64) * 3 + 1).requires_grad_()
    upstream = torch.randn(n, 3, 4, 5, dtype=torch.float64)

    out = bn(x)
    expected, mean, var = per_chunk_reference(reference, x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(bn.running_mean, mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(bn.running_var, var, rtol=0, atol=1e-12)
    assert int(bn.num_batches_tracked) == math.ceil(n / 32)

    grads = torch.autograd.grad(out, (x, bn.weight, bn.bias), upstream)
    expected_grads = torch.autograd.grad(expected, (x, reference.weight, reference.bias), upstream)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_ghost_bn_below_ghost_size_is_plain_batch_norm() -> None:
    torch.manual_seed(0)
    ghost = GhostBatchNorm2d(4, ghost_batch=32)
    plain = nn.BatchNorm2d(4)
    x = torch.randn(16, 4, 3, 3)
    # float32, one chunk: same arithmetic up to reduction order (a few ulps of values of order 1).
    torch.testing.assert_close(ghost(x), plain(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(ghost.running_var, plain.running_var, rtol=0, atol=1e-6)


def test_ghost_bn_eval_uses_running_stats() -> None:
    torch.manual_seed(0)
    bn = GhostBatchNorm2d(3, ghost_batch=4)
    for _ in range(3):
        bn(torch.randn(12, 3, 2, 2) * 2 + 5)
    bn.eval()
    x = torch.randn(7, 3, 2, 2)
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    expected = (x - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
    torch.testing.assert_close(bn(x), expected * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1))
    # eval mode: one example's output does not depend on the others, and nothing is updated
    torch.testing.assert_close(bn(x[:1]), bn(x)[:1])
    for key, value in bn.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_ghost_bn_single_value_remainder_is_an_error() -> None:
    bn = GhostBatchNorm2d(2, ghost_batch=4)
    with pytest.raises(ModelError, match="one value per channel"):
        bn(torch.randn(5, 2, 1, 1))
    bn(torch.randn(5, 2, 2, 1))  # a remainder of one example with 2 pixels is fine


def test_examples_interact_only_within_their_ghost_batch() -> None:
    model = small("resnet32").train()
    x = torch.randn(64, *CIFAR)
    changed = x.clone()
    changed[40] += 1.0  # in the second ghost batch (examples 32..63)
    out, out_changed = model(x), model(changed)
    assert torch.equal(out[:32], out_changed[:32])
    assert not torch.allclose(out[32:], out_changed[32:])


# --------------------------------------------------------------------------- weight normalisation


@pytest.mark.parametrize("name", ["resnet32", "vgg11"])
def test_weight_norm_holds_at_init_and_after_steps(name: str) -> None:
    model = small(name).train()
    normalized = weight_normalized_convs(model)
    assert [conv for _, conv in normalized] == convs(model)  # every conv, nothing else
    assert all(conv.bias is None for conv in convs(model))
    for _, conv in normalized:
        # float32 weights divided by a float64 norm: |norm - 1| is a few float32 ulps.
        torch.testing.assert_close(
            channel_norms(conv.weight), torch.ones(conv.out_channels, dtype=torch.float64), rtol=0, atol=1e-6
        )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = inputs_for(name, 40), labels_for(name, 40)
    loss_of(model, x, y).backward()
    optimizer.step()
    drift = max((channel_norms(c.weight) - 1).abs().max().item() for _, c in normalized)
    assert drift > 1e-4  # the step leaves the sphere (second order), so projection is needed
    model.project_weights_()
    for _, conv in normalized:
        torch.testing.assert_close(
            channel_norms(conv.weight), torch.ones(conv.out_channels, dtype=torch.float64), rtol=0, atol=1e-6
        )


def test_weight_projection_hook_runs_after_every_step() -> None:
    model = small("resnet32").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    handle = attach_weight_projection(optimizer, model)
    for _ in range(3):
        optimizer.zero_grad()
        loss_of(model, inputs_for("resnet32", 32), labels_for("resnet32", 32)).backward()
        optimizer.step()
        for _, conv in weight_normalized_convs(model):
            assert (channel_norms(conv.weight) - 1).abs().max() < 1e-6
    handle.remove()


def test_gradient_orthogonal_to_each_normalised_channel() -> None:
    # Each conv is followed by batch norm, so the loss is invariant to rescaling a channel (up to
    # BN's eps, relative size ~eps/var ~ 1e-5): the gradient has no radial component.
    model = small("vgg11").double().train()
    loss_of(model, inputs_for("vgg11", 32).double(), labels_for("vgg11", 32)).backward()
    for name, conv in weight_normalized_convs(model):
        w, g = conv.weight.flatten(1), conv.weight.grad.flatten(1)
        radial = (w * g).sum(1).abs()
        assert (radial <= 1e-3 * g.norm(dim=1) + 1e-12).all(), name


def test_project_weights_is_a_no_op_without_constraints() -> None:
    torch.manual_seed(0)
    model = build_model("resnet8", DIGITS, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    project_weights_(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- resnet32


def resnet32_params(c_in: int, widths: list[int], blocks: int, classes: int) -> int:
    total = 9 * c_in * widths[0] + 2 * widths[0]  # stem conv (no bias) + BN gamma, beta
    previous = widths[0]
    for width in widths:
        for _ in range(blocks):
            total += 9 * previous * width + 9 * width * width + 4 * width
            previous = width
    return total + widths[-1] * classes + classes


@pytest.mark.parametrize("shape", [CIFAR, DIGITS, (2, 9, 7)])
def test_resnet32_structure(shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build_model("resnet32", shape, 10)
    assert len(convs(model)) == 31 and len(linears(model)) == 1
    assert all(c.kernel_size == (3, 3) and c.groups == 1 for c in convs(model))
    assert len([m for m in model.modules() if isinstance(m, GhostBatchNorm2d)]) == 31
    assert all(m.ghost_batch == 32 for m in model.modules() if isinstance(m, GhostBatchNorm2d))
    assert count(model) == resnet32_params(shape[0], [16, 32, 64], 5, 10)
    assert model.label_smoothing == 0.1
    assert model(torch.randn(3, *shape)).shape == (3, 10)
    names = dict(model.named_modules())
    assert {"conv1", "bn1", "stages.0.0.conv1", "stages.2.4.conv2", "stages.1.0.bn2", "fc"} <= set(names)
    assert names["stages.1.0.conv1"].stride == (2, 2) and names["stages.1.1.conv1"].stride == (1, 1)


def test_resnet32_paper_parameter_count() -> None:
    # He et al. 2016, Table 6: ResNet-32 has 0.46M parameters.
    torch.manual_seed(0)
    assert round(count(build_model("resnet32", CIFAR, 10)) / 1e6, 2) == 0.46


def test_resnet32_blocks_argument() -> None:
    torch.manual_seed(0)
    model = build_model("resnet32", DIGITS, 10, {"blocks": 1, "widths": [4, 4, 8], "ghost_batch": 8})
    assert len(convs(model)) == 7 and count(model) == resnet32_params(1, [4, 4, 8], 1, 10)
    assert all(m.ghost_batch == 8 for m in model.modules() if isinstance(m, GhostBatchNorm2d))


# --------------------------------------------------------------------------- vgg11


@pytest.mark.parametrize(
    ("shape", "pools", "final"),
    [(CIFAR, 5, (1, 1)), (DIGITS, 3, (1, 1)), ((3, 64, 48), 5, (2, 1)), ((1, 5, 9), 2, (1, 2))],
)
def test_vgg11_structure(shape: tuple[int, int, int], pools: int, final: tuple[int, int]) -> None:
    channels = SMALL["vgg11"]["channels"]
    torch.manual_seed(0)
    model = build_model("vgg11", shape, 10, SMALL["vgg11"])
    assert len(convs(model)) == 8 and len(linears(model)) == 1
    flags, h, w = pooled_size(*shape[1:])
    assert sum(flags) == pools and (h, w) == final
    assert [b.pool for b in model.blocks] == flags
    assert model.fc.in_features == channels[-1] * h * w
    c_in, expected = shape[0], 0
    for width in channels:
        expected += 9 * c_in * width + 2 * width
        c_in = width
    assert count(model) == expected + channels[-1] * h * w * 10 + 10
    assert model(torch.randn(2, *shape)).shape == (2, 10)
    assert model.label_smoothing == 0.1


def test_vgg11_default_cifar_pools_every_stage() -> None:
    torch.manual_seed(0)
    model = build_model("vgg11", CIFAR, 10)
    assert [b.pool for b in model.blocks] == [True, True, False, True, False, True, False, True]
    assert [c.out_channels for c in convs(model)] == [64, 128, 256, 256, 512, 512, 512, 512]
    assert model.fc.in_features == 512


# --------------------------------------------------------------------------- transformer


def transformer_params(v: int, d: int, d_ff: int, layers: int) -> int:
    block = 4 * d * d + (d * d_ff + d_ff) + (d_ff * d + d) + 2 * 2 * d
    return v * d + layers * block + 2 * d  # tied: the pre-softmax weight is counted once


def test_transformer_shapes_and_parameter_count() -> None:
    model = small("transformer_shallow")
    x = inputs_for("transformer_shallow", 3)
    assert model(x).shape == (3, 8, VOCAB)
    assert model(x[:, :5]).shape == (3, 5, VOCAB)  # shorter sequences are fine
    assert count(model) == transformer_params(VOCAB, 16, 24, 2)
    with pytest.raises(ValueError, match="T <= 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_transformer_paper_size() -> None:
    torch.manual_seed(0)
    model = build_model("transformer_shallow", (16,), 32768, {**PAPER_ARGS, "seq_len": 16})
    assert count(model) == transformer_params(32768, 512, 2048, 2)
    assert model.pre_softmax.weight.shape == (32768, 512)


def test_transformer_is_causal() -> None:
    model = small("transformer_shallow").eval()
    x = inputs_for("transformer_shallow", 4)
    base = model(x)
    for t in range(7):
        changed = x.clone()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 7) % VOCAB
        out = model(changed)
        # positions <= t see identical inputs; masked scores contribute exp(-inf) = 0 exactly,
        # the tolerance only allows for a different summation blocking in the kernels.
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, t + 1], base[:, t + 1])


def test_attention_matches_hand_written_reference() -> None:
    model = small("transformer_shallow").eval()
    attn = model.blocks[0].attn
    h = torch.randn(2, 8, 16)
    n, t, d, heads = 2, 8, 16, 2
    q, k, v = (h @ m.weight.T for m in (attn.q, attn.k, attn.v))
    outs = []
    for head in range(heads):
        cols = slice(head * d // heads, (head + 1) * d // heads)
        scores = q[..., cols] @ k[..., cols].transpose(1, 2) / math.sqrt(d // heads)
        scores = scores.masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf"))
        outs.append(torch.softmax(scores, -1) @ v[..., cols])
    expected = torch.cat(outs, -1) @ attn.out.weight.T
    torch.testing.assert_close(attn(h), expected, rtol=1e-5, atol=1e-6)
    assert expected.shape == (n, t, d)


def test_sinusoidal_positions() -> None:
    table = sinusoidal_positions(10, 6)
    for pos, i in [(0, 0), (3, 1), (9, 2)]:
        angle = pos / 10000 ** (2 * i / 6)
        assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-7)
        assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-7)
    assert sinusoidal_positions(4, 5).shape == (4, 5)  # odd d_model


def test_tied_weight_is_one_parameter() -> None:
    model = small("transformer_shallow")
    assert model.pre_softmax.weight is model.embedding.weight
    assert isinstance(model.pre_softmax, nn.Linear) and model.pre_softmax.bias is None
    names = [n for n, _ in model.named_parameters()]
    assert "embedding.weight" in names and "pre_softmax.weight" not in names
    state = model.state_dict()
    assert torch.equal(state["embedding.weight"], state["pre_softmax.weight"])
    twin = small("transformer_shallow")
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(1.0)
    twin.load_state_dict(state)
    assert twin.pre_softmax.weight is twin.embedding.weight
    assert torch.equal(twin.embedding.weight, model.embedding.weight)


def test_tied_gradient_is_the_sum_of_both_uses() -> None:
    model = small("transformer_shallow")
    untied = small("transformer_shallow")
    untied.pre_softmax.weight = nn.Parameter(untied.embedding.weight.detach().clone())
    x, y = inputs_for("transformer_shallow", 5), labels_for("transformer_shallow", 5)
    loss_of(model, x, y).backward()
    loss_of(untied, x, y).backward()
    expected = untied.embedding.weight.grad + untied.pre_softmax.weight.grad
    torch.testing.assert_close(model.embedding.weight.grad, expected, rtol=1e-5, atol=1e-7)
    assert untied.embedding.weight.grad.abs().sum() > 0 and untied.pre_softmax.weight.grad.abs().sum() > 0


def test_transformer_shape_and_vocabulary_checks() -> None:
    args = SMALL["transformer_shallow"]
    with pytest.raises(ModelError, match=r"does not match seq_len=8"):
        build_model("transformer_shallow", (9,), 50, args)
    with pytest.raises(ModelError, match=r"\(seq_len,\)"):
        build_model("transformer_shallow", CIFAR, 50, args)
    with pytest.raises(ModelError, match="exceeds vocab=50"):
        build_model("transformer_shallow", SEQ, 51, args)
    torch.manual_seed(0)
    smaller = build_model("transformer_shallow", SEQ, 30, args)  # a data vocabulary below the cap
    assert smaller.embedding.num_embeddings == 30
    with pytest.raises(ModelError, match="multiple of heads"):
        build_model("transformer_shallow", SEQ, 50, {**args, "heads": 3})
    with pytest.raises(ModelError, match=r"dropout must be in \[0, 1\)"):
        build_model("transformer_shallow", SEQ, 50, {**args, "dropout": 1.0})
    with pytest.raises(ModelError, match="non-negative number"):
        build_model("transformer_shallow", SEQ, 50, {**args, "dropout": "high"})
    with pytest.raises(ModelError, match="non-negative number"):
        build_model("resnet32", CIFAR, 10, {"label_smoothing": -0.1})
    with pytest.raises(ModelError, match=r"label_smoothing must be in \[0, 1\)"):
        build_model("vgg11", CIFAR, 10, {"label_smoothing": 1})
    with pytest.raises(ModelError, match="8 entries"):
        build_model("vgg11", CIFAR, 10, {"channels": [4, 4]})


def test_float_arguments_from_the_command_line() -> None:
    args = parse_model_args(["label_smoothing=0", "dropout=0.25", "d_model=16", "heads=2"])
    torch.manual_seed(0)
    model = build_model("transformer_shallow", (32,), 100, args)
    assert model.label_smoothing == 0.0 and model.blocks[0].attn.dropout == 0.25
    config = model_config("transformer_shallow", (32,), 100, args)
    assert config["args"]["label_smoothing"] == 0.0 and isinstance(config["args"]["label_smoothing"], float)
    assert model_config("resnet32", CIFAR, 10, {"label_smoothing": 0.2})["args"]["label_smoothing"] == 0.2


def test_data_options_feed_load_dataset() -> None:
    assert data_options("resnet32") == {}
    assert data_options("transformer_shallow", {"vocab": 300}) == {"vocab": 300, "seq_len": 32}
    options = data_options("transformer_shallow", {"vocab": 300, "seq_len": 16})
    data = load_dataset("pystdlib", limit=64, **options)
    torch.manual_seed(0)
    model = build_model("transformer_shallow", data.input_shape, data.num_classes, options)
    assert model(data.x[:2]).shape == (2, 16, 300)


def test_transformer_trains_on_pystdlib() -> None:
    # A few Adam steps on one batch must lower the loss (gradients flow through the whole LM).
    data = load_dataset("pystdlib", limit=32, vocab=200, seq_len=16)
    torch.manual_seed(0)
    model = build_model(
        "transformer_shallow", data.input_shape, data.num_classes, {"vocab": 200, "seq_len": 16}
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = loss_of(model, data.x, data.y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(200), rel=0.2)  # about uniform at init
    assert losses[-1] < 0.8 * losses[0]


# --------------------------------------------------------------------------- common properties


@pytest.mark.parametrize("name", NEW_MODELS)
def test_same_seed_same_model_and_config_round_trip(name: str) -> None:
    config = model_config(name, shape_of(name), classes_of(name), SMALL[name])
    model = small(name)
    torch.manual_seed(0)
    again = build_from_config(json.loads(json.dumps(config)))
    torch.manual_seed(1)
    other = build_from_config(config)
    assert (
        model_config(config["name"], config["input_shape"], config["num_classes"], config["args"]) == config
    )
    state, state_again, state_other = model.state_dict(), again.state_dict(), other.state_dict()
    assert list(state) == list(state_again)
    assert all(torch.equal(state[k], state_again[k]) for k in state)
    assert any(not torch.equal(state[k], state_other[k]) for k in state if state[k].is_floating_point())
    x = inputs_for(name, 4)
    model.eval(), again.eval()
    assert torch.equal(model(x), again(x))


@pytest.mark.parametrize("name", NEW_MODELS)
def test_gradients_reach_every_parameter(name: str) -> None:
    model = small(name).train()
    x, y = inputs_for(name, 40), labels_for(name, 40)
    loss_of(model, x, y).backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, param_name
        assert param.grad.abs().sum() > 0, param_name
        assert torch.isfinite(param.grad).all(), param_name


@pytest.mark.parametrize("name", NEW_MODELS)
def test_factor_capture_sees_the_weight_layers(name: str) -> None:
    model = small(name).eval()
    data = [(inputs_for(name, 6), labels_for(name, 6))]
    factors = collect_factors(model, data, fisher="mc")
    expected = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    if name == "transformer_shallow":
        expected.discard("pre_softmax")  # the tied weight: the K-FAC engineer's TiedEmbedding entry
    assert expected <= set(factors)
    # normalisation layers (eval mode) get their exact per-channel blocks; nothing is left out
    norms = {n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm | nn.BatchNorm2d)}
    assert norms <= set(factors) and all(factors[n].module_type == "NormAffine" for n in norms)
    assert factors.coverage.complete
    for layer in expected:
        module = model.get_submodule(layer)
        assert tuple(factors[layer].weight_shape) == tuple(module.weight.shape)


def test_label_smoothing_attribute() -> None:
    assert small("resnet32").label_smoothing == 0.1
    assert small("vgg11").label_smoothing == 0.1
    assert small("transformer_shallow").label_smoothing == 0.0
    assert small("vgg11", label_smoothing=0.0).label_smoothing == 0.0


def test_digits_pipeline_with_batch_norm_models() -> None:
    data = load_dataset("digits", limit=64)
    for name in ("resnet32", "vgg11"):
        torch.manual_seed(0)
        model = build_model(name, data.input_shape, data.num_classes, SMALL[name]).train()
        for x, y in iterate_batches(data, 32):
            assert model(x).shape == (32, 10)
            loss_of(model, x, y).backward()
