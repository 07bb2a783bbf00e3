"""Where the training loop's batches come from: tensors in device memory, or a Dataset through a ``DataLoader``.

Both paths draw the same batches: one seeded permutation of the training examples, reshuffled each epoch, cut in
batches (the last incomplete one dropped, so every K-FAC statistic comes from the same batch size) and, in a
data-parallel run, each batch cut again into this rank's slice (``part``). In-memory tensors (the built-in data,
a callable's tensors, a ``TensorDataset``) are indexed on the device: no per-example Python, no copies. Any other
Dataset is read by a ``DataLoader`` driven by those index batches (``data.workers`` processes, pinned memory on
CUDA, workers seeded from ``training.seed``), so a run reproduces and a Dataset holding the same examples as a
tensor trains on the same batches in the same order.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

Part = Callable[[torch.Tensor], torch.Tensor]  # this rank's slice of a batch of indices (identity for one process)
Batch = tuple[torch.Tensor, torch.Tensor]


class Batches:
    """Index batches of a seeded permutation, reshuffled each epoch; the last incomplete batch is dropped."""

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device) -> None:
        self.n, self.size, self.device = n, min(batch_size, n), device
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.position = self._shuffle(), 0

    def _shuffle(self) -> torch.Tensor:
        return torch.randperm(self.n, generator=self.generator).to(self.device)

    def next(self) -> torch.Tensor:
        if self.position + self.size > self.n:
            self.order, self.position = self._shuffle(), 0
        index = self.order[self.position : self.position + self.size]
        self.position += self.size
        return index


class TensorSplit:
    """A split held whole on the device; batches are index slices (the fast path)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> None:
        self.x, self.y, self.device = x.to(device), y.to(device), device

    def __len__(self) -> int:
        return len(self.x)

    def training(self, batch_size: int, seed: int, part: Part) -> Iterator[Batch]:
        batches = Batches(len(self.x), batch_size, seed, self.device)
        while True:
            index = part(batches.next())
            yield self.x[index], self.y[index]

    def chunks(self, size: int, part: Part) -> Iterator[Batch]:
        mine_x, mine_y = part(self.x), part(self.y)
        for start in range(0, len(mine_x), size):
            yield mine_x[start : start + size], mine_y[start : start + size]


class DatasetSplit:
    """A map-style Dataset read by a ``DataLoader`` (``workers`` processes) and moved to the device."""

    def __init__(self, dataset: Dataset[Any], device: torch.device, workers: int) -> None:
        self.dataset, self.device, self.workers = dataset, device, workers
        self.pin = device.type == "cuda"

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def training(self, batch_size: int, seed: int, part: Part) -> Iterator[Batch]:
        batches = Batches(len(self), batch_size, seed, torch.device("cpu"))
        sampler = _Endless(lambda: part(batches.next()).tolist())
        # the generator seeds the workers (base seed + worker id), so random transforms repeat run to run
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.workers, pin_memory=self.pin,
                            generator=torch.Generator().manual_seed(seed))
        return self._to_device(loader)

    def chunks(self, size: int, part: Part) -> Iterator[Batch]:
        mine = Subset(self.dataset, part(torch.arange(len(self))).tolist())
        # a generator of its own: without one, each evaluation would draw the workers' seed from torch's global
        # generator and shift the random numbers training uses next (K-FAC's sampled targets)
        return self._to_device(DataLoader(mine, batch_size=size, num_workers=self.workers, pin_memory=self.pin,
                                          generator=torch.Generator().manual_seed(0)))

    def _to_device(self, loader: DataLoader[Any]) -> Iterator[Batch]:
        for x, y in loader:
            yield x.to(self.device, non_blocking=self.pin), y.to(self.device, non_blocking=self.pin)


class _Endless:
    """A ``batch_sampler`` that never ends: each item is the next index batch (the loop decides when to stop)."""

    def __init__(self, next_batch: Callable[[], list[int]]) -> None:
        self.next_batch = next_batch

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_batch()


Split = TensorSplit | DatasetSplit


def split(data: Dataset[Any] | tuple[torch.Tensor, torch.Tensor], device: torch.device, workers: int) -> Split:
    """The batch source for one split: tensors (or a plain ``TensorDataset`` of two) on the fast path, any other
    Dataset through a ``DataLoader``."""
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        data = data.tensors  # type: ignore[assignment]
    if isinstance(data, tuple):
        return TensorSplit(*data, device)
    return DatasetSplit(data, device, workers)
