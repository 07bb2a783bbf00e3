"""Built-in architectures, addressed by name from the model YAML.

Every model is made of layers K-FAC gives curvature to (``nn.Linear``, ``nn.Conv2d``, ``nn.BatchNorm2d``,
``nn.Embedding`` and :mod:`kfac_tune.nn`'s recurrent layers) plus parameter-free activations; weight-normalised
layers are left to K-FAC's first-order fallback. Models take ``(batch, *input_shape)`` tensors: classifiers return
logits ``(batch, num_classes)``; the autoencoder returns the flattened reconstruction ``(batch, prod(input_shape))``
without an output nonlinearity by default, so that the loss (``bce`` with logits or ``mse``) decides how outputs
are read; the language model (task ``"sequence"``) takes ``(batch, time)`` token ids and returns next-token logits
``(batch, time, num_classes)``, the classes last as K-FAC's Fisher expects.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm as apply_weight_norm

from kfac_tune.nn import GRU, LSTM
from kfac_tune.zoo._args import BadArgument, boolean, choice, positive_int, positive_ints


_ACTIVATIONS: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}
# "linear" (and YAML null) mean no nonlinearity; accepted wherever a layer may be left linear.
_LINEAR = ("linear", None)


def architecture_signature(model: nn.Module) -> dict[str, Any]:
    """A stable, YAML/JSON-safe description of the parameterised layers, and a short hash of it.

    Recipes store it to recognise "the same network" later. Layers that own a ``weight`` are listed (module
    path, layer type, weight shape, bias): this is what K-FAC's curvature blocks depend on. The parameter-free
    leaf modules (activations, pooling, flatten) are recorded in order as ``activations``, because a recipe tuned
    for a sigmoid network does not transfer to the same shapes with ReLUs. A parametrised layer (e.g. weight
    norm) is recorded as ``"Linear[parametrized:weight]"`` so it differs from the plain layer.
    """
    layers = []
    for path, module in model.named_modules():
        if isinstance(module, parametrize.ParametrizationList) or ".parametrizations." in f".{path}.":
            continue  # the internals of a parametrised layer; the layer itself is listed
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        layer_type = type(module).__name__
        if parametrize.is_parametrized(module):
            base = type(module).__bases__[0].__name__
            layer_type = f"{base}[parametrized:{','.join(sorted(module.parametrizations))}]"
        layers.append(
            {"path": path, "type": layer_type, "weight_shape": list(weight.shape),
             "bias": isinstance(getattr(module, "bias", None), torch.Tensor)}
        )
    activations = [type(m).__name__ for m in model.modules()
                   if not any(True for _ in m.children()) and not any(True for _ in m.parameters(recurse=False))]
    described = {"layers": layers, "activations": activations}
    digest = hashlib.sha256(json.dumps(described, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return {**described, "hash": digest[:16]}


# --------------------------------------------------------------------------------------------- helpers
def _check_activation(argument: str, value: Any, *, allow_linear: bool) -> None:
    """Validate an activation name; "linear" (or null) only where a layer may stay linear."""
    choice(argument, value, (*_ACTIVATIONS, *_LINEAR) if allow_linear else tuple(_ACTIVATIONS))


def _activation_module(name: str | None) -> nn.Module | None:
    """A fresh activation module, or None for a linear layer."""
    return None if name in _LINEAR else _ACTIVATIONS[name]()


def _image_shape(input_shape: tuple[int, ...], min_side: int) -> tuple[int, int, int]:
    if len(input_shape) != 3 or min(input_shape[1:]) < min_side:
        raise BadArgument("input_shape", f"(channels, height, width) with height and width >= {min_side}", input_shape)
    return input_shape  # type: ignore[return-value]


def _ufldl_init_(layer: nn.Linear) -> None:
    """Uniform ±sqrt(6 / (fan_in + fan_out + 1)), zero bias: the init of Bulatov's K-FAC experiment."""
    bound = math.sqrt(6.0 / (layer.in_features + layer.out_features + 1))
    nn.init.uniform_(layer.weight, -bound, bound)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


# ----------------------------------------------------------------------------------------- autoencoder
class Autoencoder(nn.Module):
    """Fully connected encoder/decoder; ``forward`` flattens the input and returns the flat reconstruction."""

    def __init__(self, encoder: nn.Sequential, decoder: nn.Sequential) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x.flatten(1)))


def _build_autoencoder(input_shape: tuple[int, ...], num_classes: int | None, *,
                       widths: Sequence[int] = (1000, 500, 250, 30), activation: str = "sigmoid", bias: bool = True,
                       output_activation: str | None = None, code_activation: str | None = "linear",
                       init: str = "default", weight_norm: bool = False) -> nn.Module:
    widths = positive_ints("widths", widths)
    bias = boolean("bias", bias)
    weight_norm = boolean("weight_norm", weight_norm)
    choice("init", init, ("default", "ufldl"))
    _check_activation("activation", activation, allow_linear=False)
    _check_activation("code_activation", code_activation, allow_linear=True)
    _check_activation("output_activation", output_activation, allow_linear=True)

    def stack(dims: Sequence[int], last_activation: str | None) -> nn.Sequential:
        """Linear layers through ``dims``, ``activation`` after each but the last, which gets ``last_activation``."""
        modules: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])):
            layer = nn.Linear(fan_in, fan_out, bias=bias)
            if init == "ufldl":
                _ufldl_init_(layer)
            if weight_norm:
                layer = apply_weight_norm(layer)
            act = _activation_module(last_activation if i == len(dims) - 2 else activation)
            modules += [layer] if act is None else [layer, act]
        return nn.Sequential(*modules)

    features = math.prod(input_shape)
    return Autoencoder(stack((features, *widths), code_activation),
                       stack((*reversed(widths), features), output_activation))


# ------------------------------------------------------------------------------------------------- mlp
def _build_mlp(input_shape: tuple[int, ...], num_classes: int, *, hidden: Sequence[int] = (256, 128),
               activation: str = "relu", dropout: float = 0.0) -> nn.Module:
    hidden = positive_ints("hidden", hidden)
    _check_activation("activation", activation, allow_linear=False)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise BadArgument("dropout", "a number in [0, 1)", dropout)
    modules: list[nn.Module] = [nn.Flatten()]
    fan_in = math.prod(input_shape)
    for width in hidden:
        modules += [nn.Linear(fan_in, width), _activation_module(activation)]
        if dropout > 0:
            modules.append(nn.Dropout(dropout))
        fan_in = width
    modules.append(nn.Linear(fan_in, num_classes))
    return nn.Sequential(*modules)


# --------------------------------------------------------------------------------------------- convnet
def _build_convnet(input_shape: tuple[int, ...], num_classes: int, *, channels: Sequence[int] = (32, 64),
                   hidden: int = 128) -> nn.Module:
    channels = positive_ints("channels", channels)
    hidden = positive_int("hidden", hidden)
    if len(channels) > 4:
        raise BadArgument("channels", "a list of 1 to 4 positive integers", list(channels))
    # each block halves the image; the smallest side must survive all of them
    c_in, height, width = _image_shape(input_shape, min_side=2 ** len(channels))
    modules: list[nn.Module] = []
    for c_out in channels:
        modules += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c_in, height, width = c_out, height // 2, width // 2
    modules += [nn.Flatten(), nn.Linear(c_in * height * width, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]
    return nn.Sequential(*modules)


# ---------------------------------------------------------------------------------------------- resnet
class _BasicBlock(nn.Module):
    """Two 3x3 convolutions with a parameter-free shortcut (option A of He et al. 2016: subsample, zero-pad)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride = stride
        self.pad = c_out - c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.pad))
        return F.relu(out + shortcut)


def _build_resnet(input_shape: tuple[int, ...], num_classes: int, *, depth: int = 20, width: int = 16) -> nn.Module:
    depth = positive_int("depth", depth)
    width = positive_int("width", width)
    if depth < 8 or (depth - 2) % 6:
        raise BadArgument("depth", "6n+2 for some n >= 1 (8, 14, 20, 32, 44, 56, 110)", depth)
    blocks_per_stage = (depth - 2) // 6
    c_in = _image_shape(input_shape, min_side=4)[0]  # two stride-2 stages
    modules: list[nn.Module] = [nn.Conv2d(c_in, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    c = width
    for stage in range(3):
        c_out = width * 2**stage
        for block in range(blocks_per_stage):
            modules.append(_BasicBlock(c, c_out, stride=2 if stage and not block else 1))
            c = c_out
    modules += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
    return nn.Sequential(*modules)


# --------------------------------------------------------------------------------------- language model
class LanguageModel(nn.Module):
    """Token ids ``(batch, time)`` (any dtype holding integers) -> next-token logits ``(batch, time, vocab)``."""

    def __init__(self, vocab: int, embedding: int, hidden: int, layers: int, dropout: float, cell: str) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embedding)
        self.rnn = (LSTM if cell == "lstm" else GRU)(embedding, hidden, layers, batch_first=True, dropout=dropout)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.rnn(self.embed(x.long()))[0])


def _build_lstm_lm(input_shape: tuple[int, ...], num_classes: int, *, embedding: int = 32, hidden: int = 128,
                   layers: int = 1, dropout: float = 0.0, cell: str = "lstm") -> nn.Module:
    if len(input_shape) != 1:
        raise BadArgument("input_shape", "(sequence length,): token ids per example", input_shape)
    embedding, hidden, layers = (positive_int(n, v) for n, v in
                                 (("embedding", embedding), ("hidden", hidden), ("layers", layers)))
    choice("cell", cell, ("lstm", "gru"))
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise BadArgument("dropout", "a number in [0, 1)", dropout)
    return LanguageModel(num_classes, embedding, hidden, layers, float(dropout), cell)
