"""Data-parallel K-FAC on ``torch.distributed``: everything the optimizer needs from a process group.

Under data parallelism every rank holds the same model and sees its own shard of the batch.  Gradients are averaged
by ``DistributedDataParallel`` (or by :func:`average_gradients` for a plain process group); K-FAC adds two things,
in the spirit of KAISA (Pauloski et al. 2021):

- **Factor statistics are averaged** across ranks before they enter the moving average, with one flattened
  ``all_reduce`` per bucket of factors (25 MB by default: one call for most models).  This is exact: a rank's
  ``A`` is the mean of ``a aᵀ`` over its rows, and its ``G = N_r Σ g gᵀ`` where ``g = u / N_r`` is the gradient of
  its own mean loss over ``N_r`` terms (``u``: the per-term output gradient), i.e. ``G_r = (1/N_r) Σ u uᵀ``.  On
  the combined batch of ``N = Σ N_r`` terms the same formulas give ``(1/N) Σ a aᵀ`` and ``(1/N) Σ u uᵀ``; with
  equal shards (the assumption under which DDP's gradient average is the combined-batch gradient) both are the
  plain average of the per-rank values, so every rank keeps the factors of single-process K-FAC on the combined
  batch.
- **Eigendecompositions are spread**: a :class:`WorkAssignment` gives each layer an owner rank, each rank
  decomposes only the factors it owns, and the owners broadcast the results, so every rank ends with bitwise
  identical decompositions.  This is KAISA's communication-optimal placement (``grad_worker_fraction = 1``):
  decompositions travel once per ``inv_update_freq`` steps and every rank preconditions its own gradients, so a step
  without an inverse refresh needs no K-FAC communication beyond the statistics.  KAISA's memory-optimal end
  (only the owner preconditions, then broadcasts the preconditioned gradient every step) is not implemented.

Every rank must call ``step()`` on the same schedule and capture the same layers (the same requirement DDP has),
since the collectives are matched by order.
"""
from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kfac_tune.optim import blocks as blocks_mod

DEFAULT_BUCKET_CAP_MB = 25.0


# ------------------------------------------------------------------------------------------------ assignment
class WorkAssignment(ABC):
    """Which rank eigendecomposes each layer's factors; both factors of a layer stay on one rank."""

    @abstractmethod
    def owner(self, layer: str) -> int:
        """The rank (within the process group) that decomposes ``layer``'s factors."""

    def layers_of(self, rank: int, layers: Iterable[str]) -> list[str]:
        """The layers among ``layers`` that ``rank`` owns, in the given order."""
        return [name for name in layers if self.owner(name) == rank]


class GreedyLPTAssignment(WorkAssignment):
    """Longest-processing-time-first: the costliest layer goes to the least loaded rank, and so on.

    Eigendecomposition dominates the inverse refresh and grows as the cube of a factor's dimension, so the cost of
    a Kronecker layer is ``a_dim³ + g_dim³`` (each block type states its own: ``block.decomposition_cost``).  LPT is within 4/3 of the optimal makespan and, being deterministic (ties
    broken by layer order and the lowest rank), gives every rank the same assignment without communication.
    """

    def __init__(self, costs: Mapping[str, float], world_size: int) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        order = {name: i for i, name in enumerate(costs)}
        loads = [(0.0, rank) for rank in range(world_size)]
        self._owner: dict[str, int] = {}
        for name in sorted(costs, key=lambda n: (-costs[n], order[n])):
            load, rank = heapq.heappop(loads)
            self._owner[name] = rank
            heapq.heappush(loads, (load + costs[name], rank))

    def owner(self, layer: str) -> int:
        return self._owner[layer]


# ------------------------------------------------------------------------------------------------ process group
def resolve_group(process_group: Optional[dist.ProcessGroup]) -> Optional[dist.ProcessGroup]:
    """The group K-FAC communicates over, or None when it runs alone.

    ``None`` means the default group when ``torch.distributed`` is initialised, as everywhere in
    ``torch.distributed``; a group of one rank needs no communication and counts as alone.
    """
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        process_group = dist.group.WORLD
    size = dist.get_world_size(process_group)
    if size < 1:
        raise ValueError("KFAC: this rank is not a member of the process group it was given")
    return process_group if size > 1 else None


def unwrap(model: nn.Module) -> nn.Module:
    """The module DistributedDataParallel wraps (the model itself otherwise).

    K-FAC hooks the inner module, so its layer names (no ``module.`` prefix), ``exclude`` lists and checkpoints
    are the same with and without DDP, and the quadratic model never runs DDP's forward.
    """
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ------------------------------------------------------------------------------------------------ communication
class DataParallel:
    """K-FAC's collectives over one process group: statistic averaging and distributed eigendecompositions."""

    def __init__(
        self,
        group: dist.ProcessGroup,
        costs: Mapping[str, float],
        assignment: Optional[WorkAssignment] = None,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
    ) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.assignment = assignment or GreedyLPTAssignment(dict(costs), self.world_size)
        self.bucket_cap_bytes = int(bucket_cap_mb * 2**20)
        self._global_ranks = dist.get_process_group_ranks(group)

    def average(self, tensors: list[Tensor]) -> None:
        """Average ``tensors`` in place across the ranks: factor statistics, quadratic-model scalars, losses."""
        all_reduce_mean(tensors, self.group, self.bucket_cap_bytes)

    def decompose(self, blocks: Mapping[str, Any]) -> None:
        """Eigendecompose ``blocks`` (the same names on every rank): each rank its own, then broadcast."""
        names = list(blocks)
        blocks_mod.decompose([blocks[n] for n in self.assignment.layers_of(self.rank, names)])
        for src in range(self.world_size):
            owned = [blocks[n] for n in self.assignment.layers_of(src, names)]
            if owned:
                self._broadcast_decompositions(owned, src)

    def _broadcast_decompositions(self, owned: list[Any], src: int) -> None:
        """Send the owner's decompositions to every rank; a flag per block says whether it has one at all."""
        payload: list[Tensor] = []
        for block in owned:
            payload.extend(_decomposition_tensors(block, self.rank == src))
        root = self._global_ranks[src]
        _bucketed(payload, lambda flat: dist.broadcast(flat, src=root, group=self.group), self.bucket_cap_bytes)
        if self.rank == src:
            return
        start = 0
        for block in owned:
            *tensors, valid = payload[start : start + len(block.decomposition_shapes()) + 1]
            start += len(tensors) + 1
            if bool(valid):
                block.set_decomposition(*tensors)


def average_gradients(params: Iterable[nn.Parameter], group: Optional[dist.ProcessGroup] = None,
                      bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB) -> None:
    """Average ``.grad`` across the ranks: DDP's job, done by hand for a plain process group.

    Call it after ``loss.backward()`` and before ``KFAC.step()`` (inside the closure when there is one); every
    rank must have gradients for the same parameters.
    """
    resolved = resolve_group(group)
    if resolved is not None:
        all_reduce_mean([p.grad for p in params if p.grad is not None], resolved, int(bucket_cap_mb * 2**20))


def all_reduce_mean(tensors: list[Tensor], group: dist.ProcessGroup, cap_bytes: int) -> None:
    """Replace every tensor by its mean over the ranks of ``group``, one ``all_reduce`` per bucket."""
    world = dist.get_world_size(group)

    def reduce(flat: Tensor) -> None:
        dist.all_reduce(flat, group=group)
        flat.div_(world)

    _bucketed(tensors, reduce, cap_bytes)


def _decomposition_tensors(block: Any, is_owner: bool) -> list[Tensor]:
    """The block's decomposition tensors and a ``valid`` flag: the owner's values, or buffers of the same shapes
    to receive them."""
    device, dtype = block.ready.device, block.dtype
    if is_owner and block.has_statistics:
        return [*block.decomposition(), torch.ones((), device=device, dtype=dtype)]
    return [torch.zeros(shape, device=device, dtype=dtype) for shape in [*block.decomposition_shapes(), ()]]


def _bucketed(tensors: list[Tensor], op: Callable[[Tensor], object], cap_bytes: int) -> None:
    """Apply an in-place collective ``op`` to ``tensors`` through flat buffers of at most ``cap_bytes`` each.

    One call per bucket instead of one per tensor: small factors cost latency, not bandwidth.  Tensors are
    grouped by dtype and device (a flat buffer has one of each) and keep their order within a group, so every
    rank builds the same buckets.
    """
    for bucket in _buckets(tensors, cap_bytes):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        op(flat)
        for t, piece in zip(bucket, flat.split([t.numel() for t in bucket])):
            t.copy_(piece.view_as(t))


def _buckets(tensors: list[Tensor], cap_bytes: int) -> Iterator[list[Tensor]]:
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        bucket: list[Tensor] = []
        size = 0
        for t in group:
            nbytes = t.numel() * t.element_size()
            if bucket and size + nbytes > cap_bytes:
                yield bucket
                bucket, size = [], 0
            bucket.append(t)
            size += nbytes
        if bucket:
            yield bucket
