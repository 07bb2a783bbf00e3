"""Data-parallel K-FAC: 2 processes on halves of a batch take the steps of 1 process on the whole batch.

The ranks run in spawned processes (gloo on CPU, NCCL on two GPUs) through :func:`kfac_tune.launch.run_local`;
the single-process references run here.  The Fisher is ``"exact"`` or ``"empirical"``, so no random targets are
drawn and the only differences left are float32 rounding: the order of the sums (per-rank partial sums, DDP's
gradient all-reduce, the statistics all-reduce) differs from the single-process sums.

Why the averaged statistics equal the single-process ones: with the mean-reduced loss, a rank's ``A`` is the mean
of ``a aᵀ`` over its rows and its ``G`` is ``(1/N_r) Σ u uᵀ`` over its ``N_r`` loss terms (``u``: per-term output
gradient; see :mod:`kfac_tune.optim.distributed`).  The whole batch gives ``(1/N) Σ`` of the same terms, and with
equal halves ``N_r = N/2``, so the mean of the two ranks' statistics is exactly the whole batch's.
"""
from __future__ import annotations

import contextlib
import functools
import os
from collections import Counter
from typing import Any, Callable, Iterator

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from kfac_tune import KFAC
from kfac_tune.optim import blocks
from kfac_tune.optim.distributed import GreedyLPTAssignment, average_gradients

WORLD, STEPS, PER_RANK = 2, 4, 32
COMMON = dict(lr=0.1, damping=1e-2, momentum=0.9, factor_decay=0.9, inv_update_freq=2, kl_clip=1e-2)
# name -> (how the model is given to K-FAC, K-FAC arguments)
MODES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddp": ("ddp", dict(COMMON, fisher="exact")),
    "ddp_inner_module": ("inner", dict(COMMON, fisher="exact", damping_mode="exact")),
    "process_group": ("plain", dict(COMMON, fisher="empirical", adaptive_lr=True, adaptive_momentum=True,
                                    adaptive_damping=True, damping_adaptation_interval=2)),
}
# Sampled targets differ between ranks and from one process, so this mode is only checked for replica consistency
# and for the extra backward pass running inside DDP's backward.
REPLICA_MODES = {**MODES, "ddp_true_fisher": ("ddp", dict(COMMON, fisher="true", seed=0))}
LAYERS = ("0", "2", "5")

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


def _convnet(dtype: torch.dtype) -> nn.Sequential:
    """Conv2d + Linear on 1x8x8 digits; seeded, built in float32 whatever the default dtype, then cast."""
    torch.manual_seed(0)
    f32 = dict(dtype=torch.float32)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, **f32), nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1, **f32), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 10, **f32),
    )
    return model.to(dtype)


def _batches(x: Tensor, y: Tensor, shard: int, shards: int) -> list[tuple[Tensor, Tensor]]:
    """Step s uses examples [s·B, (s+1)·B), B = PER_RANK·WORLD, cut into ``shards`` equal slices; one of them."""
    size = PER_RANK * WORLD // shards
    starts = [s * PER_RANK * WORLD + shard * size for s in range(STEPS)]
    return [(x[i : i + size].reshape(-1, 1, 8, 8), y[i : i + size]) for i in starts]


def _train(model: nn.Module, opt: KFAC, batches: list[tuple[Tensor, Tensor]],
           after_backward: Callable[[], None] = lambda: None) -> None:
    for x, y in batches:
        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            after_backward()
            return loss

        opt.step(closure)


@contextlib.contextmanager
def _recording() -> Iterator[dict[str, Any]]:
    """Count this process's eigendecompositions (by block) and statistic/gradient all-reduce calls."""
    seen: dict[str, Any] = {"blocks": [], "all_reduce": 0}
    decompose, all_reduce = blocks.decompose, dist.all_reduce

    def counting_decompose(bs: list[blocks.KroneckerBlock]) -> None:
        seen["blocks"].extend(bs)
        decompose(bs)

    def counting_all_reduce(*args: Any, **kwargs: Any) -> Any:
        seen["all_reduce"] += 1
        return all_reduce(*args, **kwargs)

    blocks.decompose, dist.all_reduce = counting_decompose, counting_all_reduce
    try:
        yield seen
    finally:
        blocks.decompose, dist.all_reduce = decompose, all_reduce


def _rank_worker(x: Tensor, y: Tensor, device: str) -> dict[str, Any]:
    """One rank: train every mode from the same initial model; report parameters, factors and counts."""
    rank = dist.get_rank()
    dev = torch.device(device, rank) if device == "cuda" else torch.device(device)
    batches = [(a.to(dev), b.to(dev)) for a, b in _batches(x, y, rank, WORLD)]
    report: dict[str, Any] = {}
    for mode, (given, kwargs) in REPLICA_MODES.items():
        model = _convnet(torch.float32).to(dev)
        ddp = nn.parallel.DistributedDataParallel(model) if given in ("ddp", "inner") else None
        opt = KFAC(ddp if given == "ddp" else model, **kwargs)
        forward = ddp if ddp is not None else model
        sync = (lambda: None) if ddp is not None else functools.partial(average_gradients, list(model.parameters()))
        with _recording() as seen:
            _train(forward, opt, batches, sync)
        names = {id(b): n for n, (_, b) in opt.layers.items()}
        assert opt.data_parallel is not None
        report[mode] = {
            "params": [p.detach().cpu() for p in model.parameters()],
            "factors": {n: [t.cpu() for t in (b.A, b.G, b.QA, b.dA, b.QG, b.dG)] for n, (_, b) in opt.layers.items()},
            "decomposed": Counter(names[id(b)] for b in seen["blocks"]),
            "owners": {n: opt.data_parallel.assignment.owner(n) for n in opt.layers},
            "all_reduce": seen["all_reduce"],
            "damping": opt.param_groups[0]["damping"],
        }
    return report


def _reference(x: Tensor, y: Tensor, mode: str, dtype: torch.dtype, device: str) -> list[Tensor]:
    """Single-process K-FAC on the whole batches of the same steps."""
    _, kwargs = MODES[mode]
    model = _convnet(dtype).to(device)
    opt = KFAC(model, **kwargs, factor_dtype=dtype)
    assert opt.data_parallel is None
    _train(model, opt, [(a.to(device, dtype), b.to(device)) for a, b in _batches(x, y, 0, 1)])
    return [p.detach().cpu() for p in model.parameters()]


def _max_diff(ps: list[Tensor], qs: list[Tensor]) -> float:
    return max(float((p.double() - q.double()).abs().max()) for p, q in zip(ps, qs))


def _check_against_single_process(reports: list[dict[str, Any]], x: Tensor, y: Tensor, mode: str,
                                  device: str) -> None:
    ref32 = _reference(x, y, mode, torch.float32, device)
    ref64 = _reference(x, y, mode, torch.float64, device)
    initial = [p.detach() for p in _convnet(torch.float32).parameters()]
    # The float32 error of the single-process run itself (against float64) measures how much rounding this
    # problem amplifies over the steps; reordered sums are rounding of the same kind, so the distributed run may
    # differ from the single-process one by a few times that, and no more.
    scale = max(float(p.abs().max()) for p in ref64)
    tol = 4 * max(_max_diff(ref32, ref64), torch.finfo(torch.float32).eps * scale)
    for rank, report in enumerate(reports):
        diff = _max_diff(report[mode]["params"], ref32)
        assert diff <= tol, f"rank {rank}: parameters differ from single-process K-FAC by {diff:.3g} > {tol:.3g}"
    moved = _max_diff(ref32, initial)
    assert moved > 100 * tol, f"training barely moved the parameters ({moved:.3g}): the comparison is vacuous"


@pytest.fixture(scope="module")
def gloo_reports(digits: tuple[Tensor, Tensor]) -> list[dict[str, Any]]:
    from kfac_tune.launch import run_local

    x, y = digits
    return run_local(_rank_worker, WORLD, x, y, "cpu", backend="gloo")


@pytest.mark.parametrize("mode", list(MODES))
def test_two_ranks_match_one_process_on_the_combined_batch(
        gloo_reports: list[dict[str, Any]], digits: tuple[Tensor, Tensor], mode: str) -> None:
    _check_against_single_process(gloo_reports, *digits, mode, "cpu")


@pytest.mark.parametrize("mode", list(REPLICA_MODES))
def test_ranks_hold_identical_factors_and_decompositions(gloo_reports: list[dict[str, Any]], mode: str) -> None:
    """All-reduced factors and broadcast decompositions are bitwise the same on every rank, and so are the
    parameters; so is the damping that Levenberg–Marquardt adapted from the averaged losses."""
    first, second = (r[mode] for r in gloo_reports)
    assert set(first["factors"]) == set(LAYERS)
    for name in LAYERS:
        for a, b in zip(first["factors"][name], second["factors"][name]):
            assert torch.equal(a, b), f"layer {name}: factors or decompositions differ between ranks"
    for a, b in zip(first["params"], second["params"]):
        assert torch.equal(a, b)
    assert first["damping"] == second["damping"]


def test_each_rank_decomposes_only_the_layers_it_owns(gloo_reports: list[dict[str, Any]]) -> None:
    refreshes = len(range(0, STEPS, MODES["ddp"][1]["inv_update_freq"]))
    for mode in REPLICA_MODES:
        owners = gloo_reports[0][mode]["owners"]
        assert owners == gloo_reports[1][mode]["owners"]
        # LPT on a³ + g³: the Linear layer (a = 129) alone outweighs both convolutions (a = 10 and 37).
        assert owners == {"5": 0, "2": 1, "0": 1}
        for rank, report in enumerate(gloo_reports):
            expected = Counter({n: refreshes for n, owner in owners.items() if owner == rank})
            assert report[mode]["decomposed"] == expected, f"{mode}, rank {rank}"


def test_one_all_reduce_per_factor_update_under_ddp(gloo_reports: list[dict[str, Any]]) -> None:
    """All factor statistics of a step travel in one flattened all_reduce (DDP's gradient buckets go through its
    C++ reducer, not through this Python call)."""
    for report in gloo_reports:
        assert report["ddp"]["all_reduce"] == STEPS


def test_greedy_lpt_gives_the_costliest_layer_to_the_least_loaded_rank() -> None:
    costs = {"a": 7.0, "b": 5.0, "c": 4.0, "d": 3.0, "e": 2.0, "f": 1.0}
    assignment = GreedyLPTAssignment(costs, world_size=2)
    # a→0 (7), b→1 (5), c→1 (9), d→0 (10), e→1 (11), f→0 (11, tie broken by the lower rank after e's turn).
    assert {n: assignment.owner(n) for n in costs} == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 1, "f": 0}
    assert assignment.layers_of(1, costs) == ["b", "c", "e"]
    assert GreedyLPTAssignment(costs, world_size=1).layers_of(0, costs) == list(costs)


def _rank_identity(fail_on: int) -> tuple[str, int, int]:
    if dist.get_rank() == fail_on:
        raise ValueError(f"rank {fail_on} fails on purpose")
    return os.environ["MASTER_ADDR"], dist.get_rank(), dist.get_world_size()


def test_run_local_returns_every_rank_result_and_raises_a_rank_failure() -> None:
    from kfac_tune.launch import run_local

    assert run_local(_rank_identity, 2, -1) == [("127.0.0.1", 0, 2), ("127.0.0.1", 1, 2)]
    with pytest.raises(Exception, match="rank 1 fails on purpose"):
        run_local(_rank_identity, 2, 1)


def test_without_a_process_group_kfac_is_single_process() -> None:
    assert not dist.is_initialized()
    assert KFAC(_convnet(torch.float32)).data_parallel is None


@pytest.fixture(scope="module")
def nccl_reports(digits: tuple[Tensor, Tensor]) -> list[dict[str, Any]]:
    if not (torch.cuda.is_available() and torch.cuda.device_count() >= WORLD and dist.is_nccl_available()):
        pytest.skip(f"needs {WORLD} CUDA devices and NCCL")
    from kfac_tune.launch import run_local

    x, y = digits
    return run_local(_rank_worker, WORLD, x, y, "cuda", backend="nccl")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", list(MODES))
def test_two_gpus_with_nccl_match_one_gpu(
        nccl_reports: list[dict[str, Any]], digits: tuple[Tensor, Tensor], mode: str) -> None:
    _check_against_single_process(nccl_reports, *digits, mode, "cuda")
