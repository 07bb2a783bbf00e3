"""The zoo's registries: every built-in architecture and data set, named once, without importing torch.

Builders and loaders are ``module:function`` references resolved on first use (as the catalog's optimizers are),
so the config schema can check a name against ``ARCHITECTURES``/``DATASETS`` and validating a YAML imports no
torch; ``build_model`` and ``load_dataset`` resolve them when a model or a data set is actually made.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from kfac_tune.catalog import resolve
from kfac_tune.zoo._args import keyword_defaults

Task = Literal["classification", "reconstruction", "sequence"]


@dataclass(frozen=True)
class _Entry:
    """What every registry entry has: a name and the ``module:function`` that makes it."""

    name: str
    ref: str  # module:function

    def resolved(self) -> Callable[..., Any]:
        return resolve(self.ref)

    def arguments(self) -> dict[str, Any]:
        """The keyword arguments the entry accepts, with their defaults."""
        return keyword_defaults(self.resolved())


@dataclass(frozen=True)
class ArchSpec(_Entry):
    """An architecture. ``builder(input_shape, num_classes, **kwargs)`` makes the module."""

    task: Task = "classification"
    default_loss: str = "cross_entropy"  # a name in kfac_tune.catalog.LOSSES
    description: str = ""
    builder = property(_Entry.resolved)


@dataclass(frozen=True)
class DatasetSpec(_Entry):
    """A data set. ``loader(request, **kwargs)`` returns the full splits; ``arguments`` are the dataset-specific
    keyword arguments of ``load_dataset``."""

    description: str = ""
    loader = property(_Entry.resolved)


_MODELS = "kfac_tune.zoo.models"
_DATA = "kfac_tune.zoo.data"

ARCHITECTURES: dict[str, ArchSpec] = {spec.name: spec for spec in (
    ArchSpec("autoencoder", f"{_MODELS}:_build_autoencoder", "reconstruction", "bce",
             "Deep fully connected autoencoder (Hinton & Salakhutdinov 2006; Martens & Grosse 2015): "
             "784-1000-500-250-30 mirrored by default; outputs flattened logits."),
    ArchSpec("mlp", f"{_MODELS}:_build_mlp", "classification", "cross_entropy", "Multilayer perceptron classifier."),
    ArchSpec("convnet", f"{_MODELS}:_build_convnet", "classification", "cross_entropy",
             "Small convnet: conv3x3-ReLU-maxpool blocks, then a two-layer head."),
    ArchSpec("resnet", f"{_MODELS}:_build_resnet", "classification", "cross_entropy",
             "CIFAR-style ResNet (He et al. 2016), 6n+2 layers, BatchNorm."),
    ArchSpec("lstm_lm", f"{_MODELS}:_build_lstm_lm", "sequence", "cross_entropy",
             "Recurrent language model: embedding, kfac_tune.nn LSTM (or GRU) layers, Linear decoder; "
             "next-token logits per position."),
)}

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec("fashion_mnist", f"{_DATA}:_load_fashion_mnist",
                "Fashion-MNIST 28x28 grey, 60k/10k, 10 classes; offline from Debian's dataset-fashion-mnist."),
    DatasetSpec("mnist", f"{_DATA}:_load_mnist", "MNIST 28x28 grey, 60k/10k, 10 classes; needs `root` or `download`."),
    DatasetSpec("cifar10", f"{_DATA}:_load_cifar10", "CIFAR-10 32x32 RGB, 50k/10k, 10 classes; via torchvision."),
    DatasetSpec("digits", f"{_DATA}:_load_digits", "scikit-learn's 8x8 digits, 1,797 images, 10 classes; offline."),
    DatasetSpec("synthetic", f"{_DATA}:_load_synthetic", "Generated Gaussian-cluster classification data; offline."),
    DatasetSpec("pydoc_text", f"{_DATA}:_load_pydoc_text",
                "Character-level text: Python's bundled reference docs (pydoc_data), next-character targets; "
                "offline."),
)}
