"""A user's data callable: the settings it is given, what it may return, and Dataset data in general.

Why by signature: a data section that says ``train_size: 100`` must train on 100 examples or stop, never silently
on whatever the callable chose. So the callable is given each setting its signature names (``root``,
``train_size``, ``test_size``, ``test_from_train``, ``download``, ``validation``, and ``seed``, the run's
``training.seed``; an unset size or root is left to the callable's own default), and ``data.kwargs`` items as
keyword arguments. A setting only the callable can honour (the sizes, ``root``, ``test_from_train``, ``download``)
that the config changes from its default, while the callable does not take it, is a config error naming the key
and the callable; kfac-tune honours the rest itself (the validation split, when the callable returns none; batch
sizes, workers, augmentation).

The callable returns tensors or numpy arrays (``(train_x, train_y, test_x, test_y)`` or the six-tuple with a
validation split after the training one; integer labels become int64), kept whole in memory, or map-style ``torch.utils.data.Dataset``\\ s
(``(train, test)`` or ``(train, validation, test)``) whose examples are ``(input tensor, label)`` pairs, read
through a ``DataLoader`` (see :mod:`kfac_tune.batches`).
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from kfac_tune.zoo import DataBundle
from kfac_tune.zoo.data import validation_indices

# settings only the callable can honour: changed from their default, the callable must take them
MUST_TAKE = ("root", "train_size", "test_size", "test_from_train", "download")
# settings kfac-tune honours itself; passed when the callable asks for them
MAY_TAKE = ("validation",)


class DataProblem(ValueError):
    """A data setting that cannot be honoured: ``field`` (``data.train_size``), what was expected, what was found.
    The preflight turns it into a config error (exit 2)."""

    def __init__(self, field: str, expected: str, found: str) -> None:
        super().__init__(f"{field}: {expected}; found {found}")
        self.field, self.expected, self.found = field, expected, found


@dataclass(frozen=True)
class DatasetBundle:
    """Data as map-style Datasets of ``(input, label)`` examples (the ``DataBundle`` of data that is not, or not
    only, in memory). ``input_shape`` is one example's; ``num_classes`` 0 for real-valued labels."""

    train: Dataset[Any]
    test: Dataset[Any]
    input_shape: tuple[int, ...]
    num_classes: int
    name: str
    source: str
    validation: Dataset[Any] | None = None

    @property
    def train_examples(self) -> int:
        return len(self.train)  # type: ignore[arg-type]

    @property
    def has_validation(self) -> bool:
        return self.validation is not None


Data = DataBundle | DatasetBundle


def call_data(function: Callable[..., Any], reference: str, settings: Mapping[str, Any],
              defaults: Mapping[str, Any], kwargs: Mapping[str, Any], seed: int) -> Data:
    """Call the data callable with the settings it asks for (see the module docstring) and normalise its result."""
    return user_data(function(**callable_arguments(function, reference, settings, defaults, kwargs, seed)))


def callable_arguments(function: Callable[..., Any], reference: str, settings: Mapping[str, Any],
                       defaults: Mapping[str, Any], kwargs: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """The keyword arguments for ``function``: ``settings`` (the data section) its signature names, ``seed``, and
    ``kwargs``; raises ``DataProblem`` for a setting or kwarg it cannot take, or a parameter nobody sets."""
    parameters = inspect.signature(function).parameters
    named = {name for name, p in parameters.items()
             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    takes = f"{reference} takes ({', '.join(parameters) or 'no parameters'})"
    available = {**{key: settings[key] for key in (*MUST_TAKE, *MAY_TAKE)}, "seed": seed}
    for key in MUST_TAKE:
        if key not in named and settings[key] != defaults[key]:
            raise DataProblem(f"data.{key}", f"a setting the data callable can honour, but {takes} (add a {key} "
                              "parameter, or remove the setting)", repr(settings[key]))
    for key in kwargs:
        if key in available:
            raise DataProblem(f"data.kwargs.{key}", f"a key that is not a data setting (set data.{key} instead)",
                              repr(kwargs[key]))
        if key not in named and not takes_any:
            raise DataProblem(f"data.kwargs.{key}", f"an argument the data callable takes, but {takes}",
                              repr(kwargs[key]))
    arguments = {key: value for key, value in available.items() if key in named and value is not None}
    arguments.update(kwargs)
    missing = [name for name in named - set(arguments) if parameters[name].default is inspect.Parameter.empty]
    if missing:
        raise DataProblem("data.kwargs", f"a value for every required parameter of {reference}",
                          f"none for {', '.join(sorted(missing))}")
    return arguments


def user_data(result: Any) -> Data:
    """Accept a ``DataBundle``, 4 or 6 tensors, or 2 or 3 Datasets from a user's data callable."""
    if isinstance(result, DataBundle):
        return result
    if isinstance(result, (tuple, list)) and len(result) in (2, 3) and all(isinstance(d, Dataset) for d in result):
        return dataset_bundle(result[0], result[-1], result[1] if len(result) == 3 else None, "callable",
                              "user callable")
    if isinstance(result, (tuple, list)):  # numpy arrays (scikit-learn's loaders, a pandas .to_numpy()) as tensors
        result = [torch.from_numpy(_native(t)) if isinstance(t, np.ndarray) else t for t in result]
    if not (isinstance(result, (tuple, list)) and len(result) in (4, 6)
            and all(isinstance(t, torch.Tensor) for t in result)):
        raise TypeError("a data callable must return a tuple (train_x, train_y, test_x, test_y) or (train_x, "
                        "train_y, val_x, val_y, test_x, test_y) of tensors or numpy arrays, or a tuple (train, test) "
                        f"or (train, validation, test) of torch.utils.data.Dataset, got {_describe(result)}")
    tensors = [t.detach().cpu() for t in result]
    tensors = [t.long() if i % 2 and not (t.is_floating_point() or t.dtype == torch.bool) else t  # int32 labels
               for i, t in enumerate(tensors)]
    train_x, train_y, test_x, test_y = tensors[:2] + tensors[-2:]
    val_x, val_y = (tensors[2].float(), tensors[3]) if len(tensors) == 6 else (None, None)
    classes = int(train_y.max()) + 1 if not train_y.is_floating_point() else 0
    return DataBundle(train_x.float(), train_y, test_x.float(), test_y, tuple(train_x.shape[1:]), classes,
                      "callable", "user callable", val_x, val_y)


def _native(array: np.ndarray) -> np.ndarray:
    """``array`` in a form ``torch.from_numpy`` takes: native byte order and contiguous (a pandas column or a
    loaded ``.npy`` may be neither)."""
    array = np.ascontiguousarray(array)
    return array.astype(array.dtype.newbyteorder("=")) if not array.dtype.isnative else array


def dataset_bundle(train: Dataset[Any], test: Dataset[Any], validation: Dataset[Any] | None, name: str,
                   source: str) -> DatasetBundle:
    """A ``DatasetBundle``, after checking each split's first example is an ``(input tensor, label)`` pair of one
    input shape (a PIL image left unconverted is the usual slip)."""
    shapes = {}
    for split, dataset in (("training", train), ("validation", validation), ("test", test)):
        if dataset is None:
            continue
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise TypeError(f"the {split} Dataset is empty")
        example = dataset[0]
        if not (isinstance(example, (tuple, list)) and len(example) == 2 and isinstance(example[0], torch.Tensor)):
            raise TypeError(f"expected the {split} Dataset's examples to be (input tensor, label) pairs (a "
                            f"transform ending in ToTensor() or ToImage()+ToDtype makes images tensors), its first "
                            f"example is {_describe(example)}")
        shapes[split] = tuple(example[0].shape)
    if len(set(shapes.values())) > 1:
        raise TypeError(f"expected one input shape in every split, found {shapes}")
    return DatasetBundle(train, test, shapes["training"], _num_classes(train), name, source, validation)


def as_datasets(data: Data) -> DatasetBundle:
    """``data`` as Datasets (tensors become ``TensorDataset``\\ s, which the training loop slices in memory)."""
    if isinstance(data, DatasetBundle):
        return data
    validation = None if data.val_x is None else TensorDataset(data.val_x, data.val_y)
    return DatasetBundle(TensorDataset(data.train_x, data.train_y), TensorDataset(data.test_x, data.test_y),
                         data.input_shape, data.num_classes, data.name, data.source, validation)


def hold_out_datasets(data: DatasetBundle, fraction: float, seed: int) -> DatasetBundle:
    """:func:`kfac_tune.zoo.data.hold_out` for Datasets: the same examples, as ``Subset``\\ s of the training set.
    The validation examples go through the training Dataset's transforms; return a validation Dataset of your
    own to validate without augmentation."""
    if data.validation is not None or fraction <= 0:
        return data
    keep, chosen = validation_indices(len(data.train), fraction, seed)  # type: ignore[arg-type]
    return dataclasses.replace(data, train=Subset(data.train, keep.tolist()),
                               validation=Subset(data.train, chosen.tolist()))


def _num_classes(dataset: Dataset[Any]) -> int:
    """``len(classes)`` of the Dataset (or of the one a ``Subset`` wraps), as torchvision's have; otherwise the
    largest integer label + 1, reading every example once (0 for real-valued labels)."""
    inner: Any = dataset
    while inner is not None:
        if isinstance(getattr(inner, "classes", None), (list, tuple)):
            return len(inner.classes)
        inner = getattr(inner, "dataset", None)
    labels = torch.as_tensor([dataset[i][1] for i in range(len(dataset))])  # type: ignore[arg-type]
    return 0 if labels.is_floating_point() else int(labels.max()) + 1


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of ({', '.join(type(v).__name__ for v in value)})"
    return f"a {type(value).__name__}"
