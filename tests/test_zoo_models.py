"""The architecture zoo: shapes, trainability, signatures and the user-facing errors."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kfac_tune.zoo import ARCHITECTURES, architecture_signature, build_model, load_dataset

LOSSES = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
    "bce": F.binary_cross_entropy_with_logits,
}

# small variants that train in well under a second on 8x8 digits
TINY = [
    ("autoencoder", {"widths": [32, 8]}),
    ("autoencoder", {"widths": [32, 8], "activation": "relu", "init": "ufldl", "weight_norm": True, "bias": False}),
    ("mlp", {"hidden": [32], "dropout": 0.1}),
    ("convnet", {"channels": [4, 8], "hidden": 16}),
    ("resnet", {"depth": 8, "width": 4}),
]


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    bundle = load_dataset("digits", train_size=64)
    return bundle.train_x, bundle.train_y


def _loss(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    spec = ARCHITECTURES[name]
    target = x.flatten(1) if spec.task == "reconstruction" else y
    return LOSSES[spec.default_loss](model(x), target)


def test_registry_entries_are_consistent() -> None:
    assert set(ARCHITECTURES) == {"autoencoder", "mlp", "convnet", "resnet", "lstm_lm"}
    for key, spec in ARCHITECTURES.items():
        assert spec.name == key
        assert spec.task in ("classification", "reconstruction", "sequence")
        assert spec.default_loss in LOSSES
        assert spec.description
    assert ARCHITECTURES["autoencoder"].arguments()["widths"] == (1000, 500, 250, 30)


@pytest.mark.parametrize(
    "name, input_shape, out_features",
    [
        ("autoencoder", (1, 28, 28), 784),
        ("mlp", (1, 28, 28), 10),
        ("convnet", (1, 28, 28), 10),
        ("convnet", (3, 32, 32), 10),
        ("convnet", (1, 8, 8), 10),
        ("resnet", (3, 32, 32), 10),
    ],
)
def test_defaults_build_and_forward(name: str, input_shape: tuple[int, ...], out_features: int) -> None:
    model = build_model(name, input_shape=input_shape, num_classes=10)
    with torch.no_grad():
        out = model.eval()(torch.rand(3, *input_shape))
    assert out.shape == (3, out_features)


def test_autoencoder_default_is_the_martens_grosse_net() -> None:
    model = build_model("autoencoder", input_shape=(1, 28, 28), num_classes=None)
    shapes = [layer["weight_shape"] for layer in architecture_signature(model)["layers"]]
    dims = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    assert shapes == [[fan_out, fan_in] for fan_in, fan_out in zip(dims, dims[1:])]
    # sigmoid after every layer except the linear code layer and the (logit) output
    assert sum(isinstance(m, nn.Sigmoid) for m in model.modules()) == 6
    assert sum(p.numel() for p in model.parameters()) == 2_837_314


def test_autoencoder_bulatov_variant() -> None:
    """No bias, sigmoid everywhere, UFLDL init: the C1 benchmark net."""
    widths = [256, 256, 256, 64]
    model = build_model(
        "autoencoder",
        input_shape=(1, 28, 28),
        num_classes=None,
        widths=widths,
        bias=False,
        code_activation="sigmoid",
        output_activation="sigmoid",
        init="ufldl",
    )
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert all(layer.bias is None for layer in linears)
    assert sum(isinstance(m, nn.Sigmoid) for m in model.modules()) == len(linears) == 8
    for layer in linears:
        bound = math.sqrt(6 / (layer.in_features + layer.out_features + 1))
        assert layer.weight.abs().max() <= bound
        assert layer.weight.abs().max() > 0.9 * bound
    with torch.no_grad():
        out = model(torch.rand(4, 1, 28, 28))
    assert out.shape == (4, 784) and 0 < out.min() and out.max() < 1
    assert sum(p.numel() for p in model.parameters()) == 696_320  # "0.70M params"


def test_resnet_depth_counts_weighted_layers() -> None:
    for depth in (8, 20, 32):
        model = build_model("resnet", input_shape=(3, 32, 32), num_classes=10, depth=depth, width=4)
        weighted = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        assert len(weighted) == depth
        assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("name, kwargs", TINY)
def test_trains_with_adam(name: str, kwargs: dict, digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    torch.manual_seed(0)
    x, y = digits
    model = build_model(name, input_shape=tuple(x.shape[1:]), num_classes=10, **kwargs)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = _loss(name, model, x, y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("name, kwargs", TINY)
def test_signature_is_stable_and_serialisable(name: str, kwargs: dict) -> None:
    def signature(seed: int) -> dict:
        torch.manual_seed(seed)  # different weights, same architecture
        return architecture_signature(build_model(name, input_shape=(1, 8, 8), num_classes=10, **kwargs))

    first, second = signature(0), signature(1)
    assert first == second
    assert json.loads(json.dumps(first)) == first
    assert yaml.safe_load(yaml.safe_dump(first)) == first
    assert isinstance(first["hash"], str) and len(first["hash"]) == 16


def test_signatures_differ_between_architectures_and_kwargs() -> None:
    images = [name for name, spec in ARCHITECTURES.items() if spec.task != "sequence"]
    builds = [(name, {}) for name in images] + TINY + [("autoencoder", {"widths": [32, 8], "bias": False})]
    hashes = [
        architecture_signature(build_model(name, input_shape=(1, 16, 16), num_classes=10, **kwargs))["hash"]
        for name, kwargs in builds
    ]
    assert len(set(hashes)) == len(builds)


def test_signature_marks_weight_norm() -> None:
    plain, normed = (
        architecture_signature(
            build_model("autoencoder", input_shape=(4,), num_classes=None, widths=[2], weight_norm=weight_norm)
        )
        for weight_norm in (False, True)
    )
    assert [layer["type"] for layer in plain["layers"]] == ["Linear", "Linear"]
    assert [layer["type"] for layer in normed["layers"]] == ["Linear[parametrized:weight]"] * 2
    assert [layer["weight_shape"] for layer in normed["layers"]] == [[2, 4], [4, 2]]


@settings(max_examples=15, deadline=None)
@given(
    widths=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    features=st.integers(1, 20),
    bias=st.booleans(),
)
def test_autoencoder_mirrors_any_widths(widths: list[int], features: int, bias: bool) -> None:
    model = build_model("autoencoder", input_shape=(features,), num_classes=None, widths=widths, bias=bias)
    layers = architecture_signature(model)["layers"]
    dims = [features, *widths, *reversed(widths[:-1]), features]
    assert [layer["weight_shape"] for layer in layers] == [[o, i] for i, o in zip(dims, dims[1:])]
    assert all(layer["bias"] is bias for layer in layers)
    assert model(torch.rand(2, features)).shape == (2, features)


@pytest.mark.parametrize(
    "name, kwargs, input_shape, num_classes, fragments",
    [
        ("mlp", {"hiden": [3]}, (1, 8, 8), 10, ["'mlp'", "'hiden'", "hidden, activation, dropout"]),
        ("resnet", {"depth": 21}, (3, 32, 32), 10, ["'resnet'", "'depth'", "6n+2", "21", "depth, width"]),
        ("autoencoder", {"activation": "gelu"}, (1, 8, 8), None, ["'autoencoder'", "'activation'", "'sigmoid'"]),
        ("autoencoder", {"widths": "1000,30"}, (1, 8, 8), None, ["'widths'", "list of positive integers"]),
        ("autoencoder", {"init": "xavier"}, (1, 8, 8), None, ["'init'", "'ufldl'"]),
        ("autoencoder", {"bias": "no"}, (1, 8, 8), None, ["'bias'", "true or false"]),
        ("mlp", {"dropout": 1.5}, (1, 8, 8), 10, ["'dropout'", "[0, 1)"]),
        ("mlp", {}, (1, 8, 8), None, ["'mlp'", "'num_classes'"]),
        ("convnet", {"channels": [4, 4, 4, 4]}, (1, 8, 8), 10, ["'convnet'", "'input_shape'", ">= 16"]),
        ("resnet", {}, (784,), 10, ["'resnet'", "'input_shape'", "(channels, height, width)"]),
    ],
)
def test_bad_arguments_name_architecture_argument_and_accepted(
    name: str, kwargs: dict, input_shape: tuple[int, ...], num_classes: int | None, fragments: list[str]
) -> None:
    with pytest.raises(ValueError) as excinfo:
        build_model(name, input_shape=input_shape, num_classes=num_classes, **kwargs)
    message = str(excinfo.value)
    for fragment in [*fragments, "accepted arguments:"]:
        assert fragment in message, message


def test_unknown_architecture_lists_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown architecture 'vgg'; known: autoencoder, convnet, lstm_lm, mlp, resnet"):
        build_model("vgg", input_shape=(3, 32, 32), num_classes=10)


def test_signature_tells_activations_apart() -> None:
    """Same shapes, different nonlinearity: a recipe tuned for one must not pass as tuned for the other."""
    shape = dict(input_shape=(1, 8, 8), num_classes=None, widths=[16, 4])
    sigmoid = architecture_signature(build_model("autoencoder", activation="sigmoid", **shape))
    relu = architecture_signature(build_model("autoencoder", activation="relu", **shape))
    assert sigmoid["layers"] == relu["layers"]
    assert "Sigmoid" in sigmoid["activations"] and "ReLU" in relu["activations"]
    assert sigmoid["hash"] != relu["hash"]
