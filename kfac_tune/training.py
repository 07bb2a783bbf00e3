"""One training run from a validated config and a point of hyperparameters.

This is the inner loop of every trial, so it is written for overhead as much as for clarity: the data go to the
device once, batches are index slices of a seeded permutation, losses stay on the device between evaluations
(one ``.item()`` per evaluation, not per step), and evaluation is excluded from the step clock so ``step_time``
measures the optimizer. A non-finite or exploded loss (``training.divergence_factor`` x the first step's loss)
raises ``Diverged`` at the next evaluation; the search turns that into a pruned trial. Huge learning rates often
leave the loss finite but astronomically large (ReLU units die, K-FAC skips non-finite updates), which is why
"exploded" counts as diverged too.

With ``training.processes: N`` a run is data-parallel: :func:`kfac_tune.launch.run_local` spawns N ranks, each
training a DistributedDataParallel replica on an equal slice of every batch (the batches of one process, cut in N),
so the run computes what one process would (up to float rounding, and the sampled Fisher's random targets).
Evaluation is sharded and summed across ranks; rank 0 sends each evaluation to this process, where ``on_eval`` (the
pruner, MLflow) runs as it does for one process, and its answer (go on or stop) goes back to every rank.
"""
from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kfac_tune.catalog import TASK_LOSSES, loss_function
from kfac_tune.config import MAX_STEPS, Config, Phrase, import_callable
from kfac_tune.optimizers import build_optimizer
from kfac_tune.zoo import ARCHITECTURES, DataBundle, DatasetNotFoundError, architecture_signature, build_model, load_dataset
from kfac_tune.zoo.data import hold_out

EvalCallback = Callable[[int, dict[str, float]], None]


class Diverged(RuntimeError):
    """The loss became NaN/inf or exploded past ``training.divergence_factor`` x its first value; ``step`` is the
    evaluation step where it was seen."""

    def __init__(self, step: int, metric: str, value: float, *, limit: float = math.inf,
                 cause: Exception | None = None) -> None:
        detail = f" ({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})" if cause else ""
        bound = f", above the divergence limit {limit:.4g}" if math.isfinite(value) else ""
        super().__init__(f"diverged: {metric} = {value:.6g} at step {step}{bound}{detail}")
        self.step, self.metric, self.value = step, metric, value

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle by message (a data-parallel rank sends its divergence to the parent)."""
        return _restore_diverged, (str(self), self.step, self.metric, self.value)


def _restore_diverged(message: str, step: int, metric: str, value: float) -> Diverged:
    error = Diverged.__new__(Diverged)
    RuntimeError.__init__(error, message)
    error.step, error.metric, error.value = step, metric, value
    return error


@dataclass
class TrainResult:
    """What one run produced. ``value`` is the configured metric at the end of the budget (what a recipe
    promises; ``eval_*`` metrics are on the validation split); ``best`` the best value seen at any evaluation.
    ``steps`` are the steps reached (under a time budget, however many fitted); ``max_step_seconds`` the longest
    single step, measured only under a time budget (the overshoot past the budget is at most one step)."""

    metric: str
    value: float
    best: float
    curves: list[dict[str, float]]
    steps: int
    seconds: float
    train_seconds: float
    device: str
    final: dict[str, float] = field(default_factory=dict)
    max_step_seconds: float | None = None

    @property
    def step_time(self) -> float:
        """Seconds per optimizer step, evaluation excluded."""
        return self.train_seconds / max(self.steps, 1)

    @property
    def test(self) -> dict[str, float]:
        """The test split's metrics at the end (empty unless ``train(..., test=True)``)."""
        return {k: v for k, v in self.final.items() if k.startswith("test_")}


@dataclass(frozen=True)
class Problem:
    """The fixed part of every trial of a config: what is trained, on what, judged by which loss."""

    architecture: str
    signature: dict[str, Any]
    task: str
    loss: str
    input_shape: tuple[int, ...]
    num_classes: int
    train_examples: int
    steps: int
    device: str
    parameter_groups: dict[str, Any] | None = None  # how a multi-optimizer (muon) splits the model; see recipes
    split: str = "validation"  # where eval_* metrics (the objective) are measured: validation, or test


# ------------------------------------------------------------------------------------------------ building


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when one is visible; asking for ``cuda`` without one is an error, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("training.device is 'cuda' but torch sees no CUDA device")
    return torch.device(name)


def load_data(cfg: Config) -> DataBundle:
    """The dataset the config names, with its validation split (cached per process: every trial of a study uses
    the same one, whatever batch size it samples)."""
    data_json = json.dumps(cfg.data.model_dump(mode="json", exclude={"batch_size", "eval_batch_size"}), sort_keys=True)
    return _load_data(data_json, cfg.training.seed)


@functools.lru_cache(maxsize=1)
def _load_data(data_json: str, seed: int) -> DataBundle:
    data = json.loads(data_json)
    if data["callable"]:
        bundle = _user_data(import_callable(data["callable"])(**data["kwargs"]))
    else:
        bundle = load_dataset(
            data["name"], root=data["root"], train_size=data["train_size"], test_size=data["test_size"],
            test_from_train=data["test_from_train"], download=data["download"], seed=seed, **data["kwargs"],
        )
    return hold_out(bundle, data["validation"], seed)


def _user_data(result: Any) -> DataBundle:
    """Accept a ``DataBundle``, ``(train_x, train_y, test_x, test_y)`` or ``(train_x, train_y, val_x, val_y,
    test_x, test_y)`` from a user's data callable."""
    if isinstance(result, DataBundle):
        return result
    if not (isinstance(result, (tuple, list)) and len(result) in (4, 6)
            and all(isinstance(t, torch.Tensor) for t in result)):
        raise TypeError("a data callable must return a DataBundle, a tuple (train_x, train_y, test_x, test_y) or "
                        f"(train_x, train_y, val_x, val_y, test_x, test_y) of tensors, got {type(result).__name__}")
    tensors = [t.detach().cpu() for t in result]
    train_x, train_y, test_x, test_y = tensors[:2] + tensors[-2:]
    val_x, val_y = (tensors[2].float(), tensors[3]) if len(tensors) == 6 else (None, None)
    classes = int(train_y.max()) + 1 if not train_y.is_floating_point() else 0
    return DataBundle(train_x.float(), train_y, test_x.float(), test_y, tuple(train_x.shape[1:]), classes,
                      "callable", "user callable", val_x, val_y)


def make_model(cfg: Config, data: DataBundle) -> nn.Module:
    if cfg.model.callable:
        model = import_callable(cfg.model.callable)(
            input_shape=data.input_shape, num_classes=data.num_classes, **cfg.model.kwargs
        )
        if not isinstance(model, nn.Module):
            raise TypeError(f"model.callable returned a {type(model).__name__}, not a torch.nn.Module")
        return model
    return build_model(cfg.model.name, input_shape=data.input_shape, num_classes=data.num_classes, **cfg.model.kwargs)


def task_and_loss(cfg: Config) -> tuple[str, str]:
    """The task (built-ins know theirs; callables say it or are classifiers) and the loss (override or default)."""
    if cfg.model.callable:
        task = cfg.model.task or "classification"
        default_loss = TASK_LOSSES[task][0]
    else:
        spec = ARCHITECTURES[cfg.model.name]
        task, default_loss = spec.task, spec.default_loss
    return task, cfg.training.loss or default_loss


def total_steps(cfg: Config, train_examples: int) -> int:
    """The step budget, or under ``training.budget.seconds`` the step cap (none given: effectively unlimited)."""
    if cfg.training.epochs is None:
        return cfg.training.steps or (MAX_STEPS if cfg.training.budget is not None else 300)
    per_epoch = max(train_examples // cfg.data.batch_size, 1)
    return max(math.ceil(cfg.training.epochs * per_epoch), 1)


def preflight(cfg: Config, hparams: Mapping[str, Any]) -> Problem:
    """Build data, model and optimizer once, before any trial, so a bad argument is a config error (exit 2)
    rather than a study full of failed trials. Returns what the study and recipes record about the problem."""
    try:
        data = load_data(cfg)
    except (DatasetNotFoundError, ValueError, TypeError) as error:
        field = "data.callable" if cfg.data.callable else "data.kwargs" if "argument" in str(error) else "data.name"
        raise cfg.problem(field, "expected a loadable dataset", Phrase(f"{type(error).__name__}: {error}")) from None
    task, loss = task_and_loss(cfg)
    if loss not in TASK_LOSSES[task]:
        raise cfg.problem("training.loss", f"expected a loss for {task} ({', '.join(TASK_LOSSES[task])})", loss)
    batch = min(cfg.data.batch_size, len(data.train_x))
    if batch % cfg.training.processes:
        raise cfg.problem("training.processes", f"expected a divisor of the batch size {batch} (every process "
                          "trains on an equal slice of each batch)", cfg.training.processes)
    try:
        torch.manual_seed(cfg.training.seed)
        model = make_model(cfg, data)
    except Exception as error:  # a user callable may raise anything
        where = "model.callable" if cfg.model.callable else "model.kwargs"
        raise cfg.problem(where, "expected a buildable model", Phrase(f"{type(error).__name__}: {error}")) from None
    try:
        opt = build_optimizer(cfg.optimizer.name, model, {**cfg.optimizer.options, **hparams}, loss=loss)
    except (TypeError, ValueError) as error:
        raise cfg.problem("optimizer.options", f"expected options accepted by {cfg.optimizer.name}",
                          Phrase(f"{type(error).__name__}: {error}")) from None
    return Problem(
        architecture=cfg.model.architecture, signature=architecture_signature(model), task=task, loss=loss,
        input_shape=tuple(data.input_shape), num_classes=data.num_classes, train_examples=len(data.train_x),
        steps=total_steps(cfg, len(data.train_x)), device=str(resolve_device(cfg.training.device)),
        parameter_groups=getattr(opt, "parameter_groups", None),
        split="validation" if data.val_x is not None else "test",
    )


# ------------------------------------------------------------------------------------------------ training


def train(
    cfg: Config, hparams: Mapping[str, Any], optimizer: str | None = None, on_eval: EvalCallback | None = None,
    *, test: bool = False, on_model: ModelCallback | None = None,
) -> TrainResult:
    """Train once for the config's budget with ``hparams``; ``optimizer`` defaults to ``cfg.optimizer.name``.

    ``on_eval(step, metrics)`` is called at every evaluation (``train_loss``, ``eval_loss``, ``eval_accuracy`` for
    classifiers, on the validation split, ``step_time``) and may raise to stop the run (the search prunes that
    way); with ``training.processes > 1`` it is called here too, in the calling process, while the ranks wait for
    it. ``test`` also evaluates the test split (``test_loss``, ``test_accuracy``): the search's objective never
    asks for it, ``train``/``compare`` and the end of a search do. ``on_model(model, optimizer)`` receives the
    trained network and its optimizer before the optimizer is closed (``kfac-tune train --save``; one process).
    """
    started = time.perf_counter()
    if on_model is not None and cfg.training.processes > 1:
        raise cfg.problem("training.processes", "expected 1 to keep the trained model (--save, tracking the "
                          "model)", cfg.training.processes)
    if cfg.training.processes > 1:
        curves, longest, device = _train_data_parallel(cfg, hparams, optimizer, on_eval, test)
    else:
        curves, longest, device = _train_replica(cfg, hparams, optimizer, on_eval, _Replica(), test, on_model)
    metric = cfg.training.metric
    values = [point[metric] for point in curves]
    best = (min if cfg.training.goal == "minimize" else max)(values)
    final = {k: v for k, v in curves[-1].items() if k not in ("step", "train_seconds")}
    return TrainResult(metric, values[-1], best, curves, int(curves[-1]["step"]), time.perf_counter() - started,
                       curves[-1]["train_seconds"], device, final, longest)


ModelCallback = Callable[[nn.Module, torch.optim.Optimizer], None]
Curves = tuple[list[dict[str, float]], "float | None", str]  # (one point per evaluation, longest step, device)


@dataclass(frozen=True)
class _Replica:
    """This process's place in a data-parallel run: rank ``rank`` of ``world`` takes an equal slice of each batch.
    With ``world == 1`` every method is the identity, so one training loop serves both cases."""

    rank: int = 0
    world: int = 1

    def part(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of ``rows`` (equal slices when the length divides)."""
        return rows.tensor_split(self.world)[self.rank] if self.world > 1 else rows

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of ``value`` over all ranks (in place)."""
        if self.world > 1:
            dist.all_reduce(value)
        return value

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        return self.total(value) / self.world

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag``, on every rank."""
        if self.world == 1:
            return flag
        nccl = dist.get_backend() == "nccl"  # NCCL moves only GPU tensors
        value = torch.tensor(int(flag), device=torch.device("cuda", torch.cuda.current_device()) if nccl else None)
        dist.broadcast(value, src=0)
        return bool(value)


def _train_replica(
    cfg: Config, hparams: Mapping[str, Any], optimizer: str | None, on_eval: EvalCallback | None, replica: _Replica,
    test: bool = False, on_model: ModelCallback | None = None,
) -> Curves:
    if cfg.training.threads:
        torch.set_num_threads(cfg.training.threads)
    device = resolve_device(cfg.training.device)
    if device.type == "cuda" and replica.world > 1:
        device = torch.device("cuda", torch.cuda.current_device())  # the launcher gave this rank its GPU
    data = load_data(cfg)
    task, loss_name = task_and_loss(cfg)
    loss_fn = loss_function(loss_name)
    loss_fn = loss_fn if task != "sequence" else functools.partial(_per_position, loss_fn)
    torch.manual_seed(cfg.training.seed)
    model = make_model(cfg, data).to(device)
    if replica.world > 1:  # averages the gradients; K-FAC takes the wrapper and averages its statistics itself
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = build_optimizer(optimizer or cfg.optimizer.name, model, {**cfg.optimizer.options, **hparams}, loss=loss_name)

    def split(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(device)
        return x, (y.to(device) if task in ("classification", "sequence") else x.flatten(1))

    # eval_* metrics: the validation split when there is one, else (data.validation: 0) the test split
    splits = {"train": split(data.train_x, data.train_y), "eval": split(
        *((data.val_x, data.val_y) if data.val_x is not None else (data.test_x, data.test_y)))}
    if test:
        splits["test"] = split(data.test_x, data.test_y)
    batches = _Batches(len(data.train_x), cfg.data.batch_size, cfg.training.seed, device)
    steps = total_steps(cfg, len(data.train_x))

    try:
        curves, longest = _loop(cfg, model, opt, loss_fn, task, batches, steps, on_eval, splits, replica)
        if on_model is not None:
            on_model(model, opt)
    finally:
        getattr(opt, "close", lambda: None)()  # K-FAC's hooks tie model and optimizer in a reference cycle
    return curves, longest, str(device)


# ------------------------------------------------------------------------------------------------ data parallel


class _Stopped(Exception):
    """The parent's ``on_eval`` raised: every rank leaves its loop at the same evaluation."""


def _train_data_parallel(
    cfg: Config, hparams: Mapping[str, Any], optimizer: str | None, on_eval: EvalCallback | None, test: bool
) -> Curves:
    """Train on ``training.processes`` local ranks; ``on_eval`` runs here and may stop them all."""
    from kfac_tune.launch import run_local

    raised: list[Exception] = []

    def answer(question: tuple[int, dict[str, float]]) -> bool:
        """Whether the ranks must stop after this evaluation."""
        try:
            if on_eval is not None:
                on_eval(*question)
        except Exception as error:  # the pruner's TrialPruned, a tracking error: re-raised once the ranks stop
            raised.append(error)
        return bool(raised)

    outcome = run_local(_rank_train, cfg.training.processes, cfg, dict(hparams), optimizer, test, serve=answer)[0]
    if raised:
        raise raised[0]
    if isinstance(outcome, Diverged):
        raise outcome
    return outcome


def _rank_train(channel: Any, cfg: Config, hparams: dict[str, Any], optimizer: str | None,
                test: bool) -> Curves | Diverged | None:
    """One rank of a data-parallel run (spawned by ``run_local``); rank 0 returns the curves, or the divergence."""
    replica = _Replica(dist.get_rank(), dist.get_world_size())
    if not cfg.training.threads:  # share the cores instead of every rank taking all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // replica.world))

    def report(step: int, metrics: dict[str, float]) -> None:
        if replica.agree(channel.ask((step, metrics)) if replica.rank == 0 else False):
            raise _Stopped

    try:
        curves = _train_replica(cfg, hparams, optimizer, report, replica, test)
    except _Stopped:
        return None
    except Diverged as diverged:  # every rank sees the same (all-reduced) metrics, so all of them stop here
        return diverged
    return curves if replica.rank == 0 else None


def _loop(
    cfg: Config, model: nn.Module, opt: torch.optim.Optimizer, loss_fn: Callable[..., torch.Tensor], task: str,
    batches: _Batches, steps: int, on_eval: EvalCallback | None,
    splits: Mapping[str, tuple[torch.Tensor, torch.Tensor]], replica: _Replica,
) -> tuple[list[dict[str, float]], float | None]:
    """The steps and evaluations; returns the curve (one point per evaluation, with the cumulative step clock) and,
    under a time budget, the longest step. Losses are averaged over the ranks before anything is judged on them,
    so every rank decides alike.

    Under ``training.budget.seconds`` the clock is read after every step (on CUDA that synchronises each step) and
    the run ends with the step that brings the training clock to the budget, so it trains at least the budget and
    at most one step more; that last step is evaluated like the last step of a step budget. Evaluations stay every
    ``eval_every`` steps, so the pruner compares trials at equal step counts."""
    train_x, train_t = splits["train"]
    network = model.module if isinstance(model, DistributedDataParallel) else model
    device = train_x.device
    budget = cfg.training.budget.seconds if cfg.training.budget is not None else None
    curves: list[dict[str, float]] = []
    loss_sum, since_eval, train_seconds = torch.zeros((), device=device), 0, 0.0
    longest: float | None = None if budget is None else 0.0
    clock = last = _sync_time(device)
    for step in range(1, steps + 1):
        index = replica.part(batches.next())
        xb, tb = train_x[index], train_t[index]

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), tb)
            loss.backward()
            return loss

        try:
            loss = opt.step(closure).detach()
        except RuntimeError as error:  # e.g. Fisher sampling from NaN logits: name the divergence, not its symptom
            if _finite_model(network, xb):
                raise
            raise Diverged(step, "train_loss", math.nan, cause=error) from error
        loss_sum += loss
        if step == 1:
            limit = _divergence_limit(cfg, replica.mean(loss.clone()).item())
        since_eval += 1
        last_step = step == steps
        if budget is not None:  # the clock reads tile the training time exactly: S <= train_seconds < S + 1 step
            now = _sync_time(device)
            longest, last = max(longest or 0.0, now - last), now
            last_step = replica.agree(last_step or train_seconds + (now - clock) >= budget)
        if step % cfg.training.eval_every and not last_step:
            continue
        train_seconds += (now if budget is not None else _sync_time(device)) - clock
        metrics = {"train_loss": replica.mean(loss_sum).item() / since_eval}
        for prefix, (x, target) in splits.items():
            if prefix != "train":
                metrics.update(_evaluate(network, loss_fn, x, target, task, cfg.data.eval_batch_size, replica, prefix))
        metrics["step_time"] = train_seconds / step
        for name in ("train_loss", "eval_loss"):
            if not metrics[name] <= limit:  # also catches NaN
                raise Diverged(step, name, metrics[name], limit=limit)
        curves.append({"step": step, **metrics, "train_seconds": train_seconds})
        if on_eval is not None:
            on_eval(step, metrics)
        loss_sum.zero_()
        since_eval = 0
        clock = last = _sync_time(device)
        if last_step:
            break
    return curves, longest


def _per_position(loss_fn: Callable[..., torch.Tensor], out: torch.Tensor, target: torch.Tensor,
                  **kwargs: Any) -> torch.Tensor:
    """A sequence model's loss: logits ``(batch, time, classes)`` against ``(batch, time)`` targets, one term per
    position (the mean over all positions, the convention K-FAC's Fisher assumes)."""
    return loss_fn(out.flatten(0, -2), target.flatten(), **kwargs)


class _Batches:
    """Index batches of a seeded permutation, reshuffled each epoch; the last incomplete batch is dropped so
    every K-FAC statistic comes from the same batch size."""

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


@torch.no_grad()
def _evaluate(
    model: nn.Module, loss_fn: Callable[..., torch.Tensor], x: torch.Tensor, target: torch.Tensor, task: str,
    batch_size: int, replica: _Replica, prefix: str = "eval",
) -> dict[str, float]:
    """``<prefix>_loss`` (and ``_accuracy``) over all of ``x``; each rank evaluates its slice and the sums are
    combined."""
    was_training = model.training
    model.eval()
    mine, my_target = replica.part(x), replica.part(target)
    sums = torch.zeros(2, device=x.device)  # loss, correct
    for start in range(0, len(mine), batch_size):
        out = model(mine[start : start + batch_size])
        tb = my_target[start : start + batch_size]
        sums[0] += loss_fn(out, tb, reduction="sum") / (1 if task == "classification" else tb[0].numel())
        if task == "classification":
            sums[1] += (out.argmax(-1) == tb).sum()
    model.train(was_training)
    total, correct = replica.total(sums).tolist()
    metrics = {f"{prefix}_loss": total / len(x)}
    if task == "classification":
        metrics[f"{prefix}_accuracy"] = correct / len(x)
    return metrics


def _divergence_limit(cfg: Config, first_loss: float) -> float:
    """Losses above ``divergence_factor`` x the first step's loss (or non-finite) mean the run diverged."""
    factor = cfg.training.divergence_factor
    if factor is None or not math.isfinite(first_loss):
        return math.inf
    return factor * max(abs(first_loss), 1e-3)


@torch.no_grad()
def _finite_model(model: nn.Module, batch: torch.Tensor) -> bool:
    """Parameters and the output on ``batch`` are all finite (called only after a step raised)."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        return False
    return bool(torch.isfinite(model(batch)).all())


def _sync_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
