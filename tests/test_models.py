"""Tests of the model registry (curvlab.models) and the three image models of seed F.2."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from curvlab.errors import CurvlabError, ModelError
from curvlab.models import (
    available_models,
    build_from_config,
    build_model,
    model_config,
    parse_model_args,
)
from curvlab.models.resnet8 import NUM_CONVS

DIGITS = (1, 8, 8)
CIFAR = (3, 32, 32)
MODELS = ["mlp", "resnet8", "simple_cnn"]
SMALL_ARGS = {
    "mlp": {"widths": [16, 8]},
    "simple_cnn": {"channels": [4, 6], "hidden": 12},
    "resnet8": {"widths": [4, 8, 8]},
}


def conv_params(c_in: int, c_out: int, k: int, bias: bool = True) -> int:
    return c_out * c_in * k * k + (c_out if bias else 0)


def linear_params(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_out * n_in + (n_out if bias else 0)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_available_models() -> None:
    assert set(MODELS) <= set(available_models())


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("shape", [DIGITS, CIFAR, (2, 5, 7), (3, 4, 4)])
def test_output_shape(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build_model(name, shape, 7, SMALL_ARGS[name])
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 7)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("shape", [DIGITS, CIFAR])
def test_default_models_forward(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build_model(name, shape, 10)
    assert model(torch.randn(2, *shape)).shape == (2, 10)


def test_only_conv2d_and_linear_weight_layers() -> None:
    for name in MODELS:
        model = build_model(name, CIFAR, 10)
        for module in model.modules():
            assert not isinstance(module, nn.modules.batchnorm._BatchNorm | nn.Dropout)
            if isinstance(module, nn.Conv2d):
                assert module.groups == 1
        owners = {n.rsplit(".", 1)[0] for n, _ in model.named_parameters()}
        for owner in owners:
            assert isinstance(model.get_submodule(owner), nn.Conv2d | nn.Linear), (name, owner)


# --------------------------------------------------------------------------- parameter counts


def test_mlp_parameter_count() -> None:
    model = build_model("mlp", DIGITS, 10)
    expected = linear_params(64, 128) + linear_params(128, 128) + linear_params(128, 10)
    assert count(model) == expected
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert names == ["hidden.0", "hidden.1", "fc"]


def test_mlp_no_bias_and_no_hidden_layers() -> None:
    model = build_model("mlp", (3, 4, 4), 5, {"widths": [], "bias": False})
    assert count(model) == linear_params(48, 5, bias=False)
    model = build_model("mlp", (3, 4, 4), 5, parse_model_args(["widths=", "bias=false"]))
    assert count(model) == linear_params(48, 5, bias=False)


@pytest.mark.parametrize(("shape", "pooled"), [(DIGITS, 2 * 2), (CIFAR, 8 * 8), ((1, 7, 9), 1 * 2)])
def test_simple_cnn_parameter_count(shape: tuple[int, int, int], pooled: int) -> None:
    model = build_model("simple_cnn", shape, 10)
    expected = (
        conv_params(shape[0], 32, 5)
        + conv_params(32, 64, 5)
        + linear_params(64 * pooled, 1024)
        + linear_params(1024, 10)
    )
    assert count(model) == expected
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert layers == ["conv1", "conv2", "hidden", "fc"]
    assert model.conv1.kernel_size == (5, 5) and model.conv1.padding == (2, 2)
    assert model.conv1.stride == (1, 1)


@pytest.mark.parametrize("shape", [DIGITS, CIFAR])
def test_resnet8_parameter_count(shape: tuple[int, int, int]) -> None:
    model = build_model("resnet8", shape, 10)
    expected = (
        conv_params(shape[0], 16, 3)
        + 2 * conv_params(16, 16, 3)
        + conv_params(16, 32, 3)
        + conv_params(32, 32, 3)
        + conv_params(32, 64, 3)
        + conv_params(64, 64, 3)
        + linear_params(64, 10)
    )
    assert count(model) == expected
    if shape == DIGITS:
        assert expected == 74762  # written out once by hand


def test_resnet8_has_seven_convs_and_one_linear() -> None:
    model = build_model("resnet8", CIFAR, 10, {"bias": False})
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert NUM_CONVS == 7
    assert len(convs) == NUM_CONVS
    assert convs == ["conv1"] + [f"blocks.{i}.conv{j}" for i in range(3) for j in (1, 2)]
    assert linears == ["fc"]
    assert all(model.get_submodule(n).kernel_size == (3, 3) for n in convs)
    strides = [model.get_submodule(n).stride[0] for n in convs]
    assert strides == [1, 1, 1, 2, 1, 2, 1]
    assert all(p.dim() > 1 for p in model.parameters())  # bias=false: weights only


def test_resnet8_activations_bounded() -> None:
    torch.manual_seed(0)
    model = build_model("resnet8", CIFAR, 10)
    x = torch.randn(16, *CIFAR)
    h = torch.relu(model.conv1(x))
    for block in model.blocks:
        h = block(h)
        rms = h.pow(2).mean().sqrt().item()
        assert 0.3 < rms < 3.0
    assert model(x).std().item() < 3.0


# --------------------------------------------------------------------------- determinism, configs


@pytest.mark.parametrize("name", MODELS)
def test_same_seed_same_model(name: str) -> None:
    torch.manual_seed(3)
    a = build_model(name, DIGITS, 10, SMALL_ARGS[name])
    torch.manual_seed(3)
    b = build_model(name, DIGITS, 10, SMALL_ARGS[name])
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


@pytest.mark.parametrize("name", MODELS)
def test_config_json_round_trip(name: str) -> None:
    config = model_config(name, DIGITS, 10, SMALL_ARGS[name])
    assert set(config) == {"name", "input_shape", "num_classes", "args"}
    text = json.dumps(config)
    torch.manual_seed(5)
    original = build_model(name, DIGITS, 10, SMALL_ARGS[name])
    torch.manual_seed(5)
    rebuilt = build_from_config(json.loads(text))
    sa, sb = original.state_dict(), rebuilt.state_dict()
    assert list(sa) == list(sb)
    assert all(sa[k].shape == sb[k].shape for k in sa)
    x = torch.randn(4, *DIGITS)
    assert torch.equal(original(x), rebuilt(x))


def test_config_fills_defaults() -> None:
    config = model_config("simple_cnn", torch.Size(CIFAR), 10, {"hidden": 256})
    assert config == {
        "name": "simple_cnn",
        "input_shape": [3, 32, 32],
        "num_classes": 10,
        "args": {"channels": [32, 64], "hidden": 256},
    }
    assert model_config("resnet8", DIGITS, 10)["args"] == {"widths": [16, 32, 64], "bias": True}
    assert model_config("mlp", DIGITS, 10, {"widths": 32})["args"]["widths"] == [32]


def test_build_from_config_errors() -> None:
    with pytest.raises(ModelError, match="missing"):
        build_from_config({"name": "mlp"})
    with pytest.raises(ModelError, match="unknown model"):
        build_from_config({"name": "vgg", "input_shape": [1, 8, 8], "num_classes": 10})
    with pytest.raises(ModelError, match="mapping"):
        build_from_config([1, 2])


# --------------------------------------------------------------------------- --model-arg parsing


def test_parse_model_args_values() -> None:
    parsed = parse_model_args(
        [
            "widths=64,32",
            "hidden=256",
            "bias=False",
            "scale=0.5",
            "mix=1,2.5",
            "act=tanh",
            " spaced = 7 ",
            "neg=-3",
            "expr=1e-3",
        ]
    )
    assert parsed == {
        "widths": [64, 32],
        "hidden": 256,
        "bias": False,
        "scale": 0.5,
        "mix": [1.0, 2.5],
        "act": "tanh",
        "spaced": 7,
        "neg": -3,
        "expr": 1e-3,
    }
    assert isinstance(parsed["hidden"], int) and isinstance(parsed["bias"], bool)
    assert parse_model_args(["flag=TRUE", "name=a,b", "tail=64,", "inf=inf"]) == {
        "flag": True,
        "name": "a,b",
        "tail": "64,",
        "inf": "inf",
    }
    assert parse_model_args([]) == {}


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["widths"], "expected key=value"),
        (["=3"], "not a valid argument name"),
        (["two words=3"], "not a valid argument name"),
        (["hidden=1", "hidden=2"], "given twice"),
    ],
)
def test_parse_model_args_errors(items: list[str], message: str) -> None:
    with pytest.raises(ModelError, match=message) as info:
        parse_model_args(items)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- invalid names/args


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ModelError) as info:
        build_model("resnet9", DIGITS, 10)
    message = str(info.value)
    assert "resnet9" in message and all(name in message for name in MODELS)
    assert isinstance(info.value, CurvlabError)


def test_unknown_argument_lists_valid_keys() -> None:
    with pytest.raises(ModelError) as info:
        build_model("simple_cnn", DIGITS, 10, {"width": 3})
    message = str(info.value)
    assert "'width'" in message and "channels" in message and "hidden" in message


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("mlp", {"widths": [16, 0]}, "positive integers"),
        ("mlp", {"widths": "wide"}, "positive integers"),
        ("mlp", {"widths": [1.5]}, "positive integers"),
        ("mlp", {"bias": 1}, "true or false"),
        ("simple_cnn", {"hidden": 2.0}, "positive integer"),
        ("simple_cnn", {"hidden": True}, "positive integer"),
        ("simple_cnn", {"channels": [8]}, "2 entries"),
        ("resnet8", {"widths": [8, 16]}, "3 entries"),
        ("resnet8", {"widths": [32, 16, 8]}, "non-decreasing"),
        ("resnet8", {"widths": ""}, "positive integers"),
    ],
)
def test_invalid_argument_values(name: str, args: dict, message: str) -> None:
    with pytest.raises(ModelError, match=message) as info:
        build_model(name, DIGITS, 10, args)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "shape", "classes", "message"),
    [
        ("mlp", (8, 8), 10, "input_shape"),
        ("mlp", (1, 0, 8), 10, "input_shape"),
        ("mlp", DIGITS, 0, "num_classes"),
        ("simple_cnn", (1, 3, 8), 10, "H, W >= 4"),
    ],
)
def test_invalid_shapes(name: str, shape: tuple, classes: int, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        build_model(name, shape, classes)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("shape", [DIGITS, (3, 12, 12)])
def test_gradients_reach_every_parameter(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(1)
    model = build_model(name, shape, 10, SMALL_ARGS[name] if shape != DIGITS else None)
    x = torch.randn(16, *shape)
    y = torch.randint(0, 10, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, param_name
        assert param.grad.abs().sum() > 0, param_name
        assert torch.isfinite(param.grad).all(), param_name
