"""The zoo's registries: every built-in architecture and data set, named once, without importing torch.

Builders and loaders are ``module:function`` references resolved on first use (as the catalog's optimizers are),
so the config schema can check a name against ``ARCHITECTURES``/``DATASETS`` and validating a YAML imports no
torch; ``build_model`` and ``load_dataset`` (here, beside the registries they read) resolve them when a model or a
data set is actually made. The modules the references name (``models``, ``data``) never read the registries, so
the references run one way.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from kfac_tune.catalog import resolve
from kfac_tune.zoo._args import BadArgument, bad_value, check_known, check_kwargs, keyword_defaults, positive_int, \
    positive_ints

if TYPE_CHECKING:
    from torch import nn

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


ARCHITECTURES: dict[str, ArchSpec] = {spec.name: spec for spec in (
    ArchSpec("autoencoder", "kfac_tune.zoo.models:_build_autoencoder", "reconstruction", "bce",
             "Deep fully connected autoencoder (Hinton & Salakhutdinov 2006; Martens & Grosse 2015): "
             "784-1000-500-250-30 mirrored by default; outputs flattened logits."),
    ArchSpec("mlp", "kfac_tune.zoo.models:_build_mlp",
             "classification", "cross_entropy", "Multilayer perceptron classifier."),
    ArchSpec("convnet", "kfac_tune.zoo.models:_build_convnet", "classification", "cross_entropy",
             "Small convnet: conv3x3-ReLU-maxpool blocks, then a two-layer head."),
    ArchSpec("resnet", "kfac_tune.zoo.models:_build_resnet", "classification", "cross_entropy",
             "CIFAR-style ResNet (He et al. 2016), 6n+2 layers, BatchNorm."),
    ArchSpec("lstm_lm", "kfac_tune.zoo.models:_build_lstm_lm", "sequence", "cross_entropy",
             "Recurrent language model: embedding, kfac_tune.nn LSTM (or GRU) layers, Linear decoder; "
             "next-token logits per position."),
)}

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec("fashion_mnist", "kfac_tune.zoo.data:_load_fashion_mnist",
                "Fashion-MNIST 28x28 grey, 60k/10k, 10 classes; offline from Debian's dataset-fashion-mnist."),
    DatasetSpec("mnist", "kfac_tune.zoo.data:_load_mnist",
                "MNIST 28x28 grey, 60k/10k, 10 classes; needs `root` or `download`."),
    DatasetSpec("cifar10", "kfac_tune.zoo.data:_load_cifar10",
                "CIFAR-10 32x32 RGB, 50k/10k, 10 classes; via torchvision."),
    DatasetSpec("digits", "kfac_tune.zoo.data:_load_digits",
                "scikit-learn's 8x8 digits, 1,797 images, 10 classes; offline."),
    DatasetSpec("synthetic", "kfac_tune.zoo.data:_load_synthetic",
                "Generated Gaussian-cluster classification data; offline."),
    DatasetSpec("pydoc_text", "kfac_tune.zoo.data:_load_pydoc_text",
                "Character-level text: Python's bundled reference docs (pydoc_data), next-character targets; "
                "offline."),
)}


def build_model(name: str, *, input_shape: tuple[int, ...], num_classes: int | None, **kwargs: Any) -> nn.Module:
    """Build architecture ``name`` for inputs of shape ``(batch, *input_shape)``.

    ``num_classes`` is required by classifiers and ignored by reconstruction models (a dataset bundle always has
    one, so callers may pass it unconditionally). Raises ``ValueError`` naming the architecture, the offending
    argument and the accepted arguments.
    """
    check_known("architecture", name, ARCHITECTURES)
    spec = ARCHITECTURES[name]
    accepted = list(spec.arguments())
    check_kwargs("architecture", name, accepted, kwargs)
    try:
        shape = positive_ints("input_shape", input_shape)
        if spec.task == "classification":
            num_classes = positive_int("num_classes", num_classes)
        return spec.builder(shape, num_classes, **kwargs)
    except BadArgument as error:
        raise bad_value("architecture", name, error, accepted) from None


def load_dataset(name: str, **kwargs: Any) -> Any:
    """Load data set ``name`` as a ``zoo.data.DataBundle`` of tensors; ``kwargs`` and the errors are those of
    ``kfac_tune.zoo.data.load`` (subsets, ``root``, ``download``, ``seed``, the data set's own arguments)."""
    check_known("dataset", name, DATASETS)
    return resolve("kfac_tune.zoo.data:load")(DATASETS[name], **kwargs)
