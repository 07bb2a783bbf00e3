"""``data.augment``: per-example augmentation of the training split, for built-in and user data alike.

Augmentation is random per example, so it runs where examples are read one by one: the training split becomes a
Dataset (:class:`Augmented`) read through the ``DataLoader`` path of :mod:`kfac_tune.batches`, while validation and
test examples stay as they are. Randomness comes from torch's generator of the process reading the example (the
training process, or a DataLoader worker seeded from ``training.seed``), so a run is reproducible. The built-ins
are plain tensor operations on ``(..., height, width)`` examples, so no torchvision import is needed.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from kfac_tune.config import AugmentConfig, import_callable
from kfac_tune.userdata import DataProblem

Transform = Callable[[torch.Tensor], torch.Tensor]


class Augmented(Dataset[tuple[torch.Tensor, Any]]):
    """``dataset`` with ``transform`` applied to each example's input (the label is kept)."""

    def __init__(self, dataset: Dataset[Any], transform: Transform) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        x, y = self.dataset[index]
        return self.transform(x), y


class RandomCrop:
    """Pad by ``padding`` zero pixels on each side, crop back to the original size at a uniform random offset."""

    def __init__(self, padding: int) -> None:
        self.padding = padding

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = self.padding
        height, width = x.shape[-2:]
        top, left = torch.randint(0, 2 * p + 1, (2,)).tolist()
        return F.pad(x, (p, p, p, p))[..., top : top + height, left : left + width]


def horizontal_flip(x: torch.Tensor) -> torch.Tensor:
    """Mirror left-right with probability 1/2."""
    return x.flip(-1) if bool(torch.rand(()) < 0.5) else x


class Compose:
    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for transform in self.transforms:
            x = transform(x)
        return x


def training_transform(settings: AugmentConfig, example: torch.Tensor) -> Transform:
    """The transform ``settings`` describe, checked on ``example`` (a training input): the built-ins need images
    (at least 2 dimensions), and every transform must keep the example's shape, since validation and test
    examples are not transformed. Raises ``DataProblem`` naming the setting."""
    steps: list[tuple[str, Transform]] = []
    if settings.random_crop is not None:
        steps.append(("random_crop", RandomCrop(settings.random_crop)))
    if settings.horizontal_flip:
        steps.append(("horizontal_flip", horizontal_flip))
    if settings.callable is not None:
        steps.append(("callable", import_callable(settings.callable)))
    x = example
    for key, transform in steps:
        if key != "callable" and x.dim() < 2:
            raise DataProblem(f"data.augment.{key}", "image examples (..., height, width)",
                              f"examples of shape {tuple(example.shape)}")
        try:
            out = transform(x)
        except Exception as error:  # the user's transform may raise anything
            raise DataProblem(f"data.augment.{key}", "a transform from an example tensor to a tensor",
                              f"{type(error).__name__}: {error}") from None
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            found = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
            raise DataProblem(f"data.augment.{key}", f"a tensor of the example's shape {tuple(x.shape)} (validation "
                              "and test examples are not augmented)", found)
        x = out
    return Compose([transform for _, transform in steps])
