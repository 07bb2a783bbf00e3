"""One training run from a validated config and a point of hyperparameters.

This is the inner loop of every trial, so it is written for overhead as much as for clarity: in-memory data go to
the device once, batches are index slices of a seeded permutation (Datasets are read by a ``DataLoader`` on the
same batches, see :mod:`kfac_tune.batches`), losses stay on the device between evaluations
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

from kfac_tune.batches import Split, split
from kfac_tune.catalog import build_optimizer
from kfac_tune.config import Config
from kfac_tune.problem import (batch_target, load_data, make_model, objective_loss, resolve_device,
                               task_and_loss, total_steps)
from kfac_tune.zoo import DataBundle

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


# ------------------------------------------------------------------------------------------------ training
class UserExit(RuntimeError):
    """User code (a model's build or forward) raised ``SystemExit`` in a run: the run failed, not the process."""


def train(cfg: Config, hparams: Mapping[str, Any], optimizer: str | None = None, on_eval: EvalCallback | None = None,
          *, test: bool = False, on_model: ModelCallback | None = None) -> TrainResult:
    """Train once for the config's budget with ``hparams``; ``optimizer`` defaults to ``cfg.optimizer.name``.

    ``on_eval(step, metrics)`` is called at every evaluation (``train_loss``, ``eval_loss``, ``eval_accuracy`` for
    classifiers, on the validation split, ``step_time``, ``train_seconds``) and may raise to stop the run (the
    search prunes that way); with ``training.processes > 1`` it is called here too, in the calling process, while
    the ranks wait for it. ``test`` also evaluates the test split (``test_loss``, ``test_accuracy``): the search's
    objective never asks for it, ``train``/``compare`` and the end of a search do. ``on_model(model, optimizer)``
    receives the trained network and its optimizer before the optimizer is closed (``kfac-tune train --save``; one
    process).
    """
    started = time.perf_counter()
    if on_model is not None and cfg.training.processes > 1:
        raise cfg.problem("training.processes", "expected 1 to keep the trained model (--save, tracking the "
                          "model)", cfg.training.processes)
    try:
        if cfg.training.processes > 1:
            curves, longest, device = _train_data_parallel(cfg, hparams, optimizer, on_eval, test)
        else:
            curves, longest, device = _train_replica(cfg, hparams, optimizer, on_eval, _Replica(), test, on_model)
    except SystemExit as error:  # Optuna lets it through: the search ended, exit 0, its trial left RUNNING
        raise UserExit(f"the model's code called sys.exit({error.code!r}) during training (its build or forward); "
                       f"a run cannot end the process") from None
    metric = cfg.training.metric
    values = [point[metric] for point in curves]
    best = (min if cfg.training.goal == "minimize" else max)(values)
    final = {k: v for k, v in curves[-1].items() if k not in ("step", "train_seconds")}
    return TrainResult(metric, values[-1], best, curves, int(curves[-1]["step"]), time.perf_counter() - started,
                       curves[-1]["train_seconds"], device, final, longest)


ModelCallback = Callable[[nn.Module, torch.optim.Optimizer], None]
Curves = tuple[list[dict[str, float]], "float | None", str]  # (one point per evaluation, longest step, device)


def warm_up(cfg: Config, hparams: dict[str, Any]) -> None:
    """Two untimed steps of ``hparams`` on ``cfg``, so that no timed run pays the process's one-time costs.

    The first use of some torch machinery in a process is slow: K-FAC's automatic mode takes forward-mode
    products (``torch.autograd.forward_ad``), whose first use loads torch's forward-mode decompositions (``torch.jit.script``, 3-5 s on a loaded 2-core
    CPU). Under a seconds budget that would land in the training clock of whichever run comes first (a seed in
    ``compare``, a trial in a search), and in the step time that ``train_seconds`` objectives score.
    """
    short = cfg.training.model_copy(update={"budget": None, "steps": 2, "epochs": None, "eval_every": 2,
                                                "eval_seconds": None})
    try:
        train(cfg.model_copy(update={"training": short}), hparams)
    except Diverged:
        pass  # the timed runs count divergence


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


def _train_replica(cfg: Config, hparams: Mapping[str, Any], optimizer: str | None, on_eval: EvalCallback | None,
                   replica: _Replica, test: bool = False, on_model: ModelCallback | None = None) -> Curves:
    if cfg.training.threads:
        torch.set_num_threads(cfg.training.threads)
    device = resolve_device(cfg.training.device)
    if device.type == "cuda" and replica.world > 1:
        device = torch.device("cuda", torch.cuda.current_device())  # the launcher gave this rank its GPU
    data = load_data(cfg)
    task, loss_name = task_and_loss(cfg)
    loss_fn = objective_loss(task, loss_name)
    torch.manual_seed(cfg.training.seed)
    model = make_model(cfg, data).to(device)
    if replica.world > 1:  # averages the gradients; K-FAC takes the wrapper and averages its statistics itself
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = build_optimizer(optimizer or cfg.optimizer.name, model, {**cfg.optimizer.options, **hparams}, loss=loss_name)

    # eval_* metrics: the validation split when there is one, else (data.validation: 0) the test split
    if isinstance(data, DataBundle):
        parts = {"train": (data.train_x, data.train_y), "test": (data.test_x, data.test_y),
                 "eval": (data.val_x, data.val_y) if data.val_x is not None else (data.test_x, data.test_y)}
    else:
        parts = {"train": data.train, "test": data.test,
                 "eval": data.validation if data.validation is not None else data.test}
    splits = {prefix: split(parts[prefix], device, cfg.data.workers)
              for prefix in ("train", "eval", *(("test",) if test else ()))}
    steps = total_steps(cfg, data.train_examples)

    try:
        curves, longest = _loop(cfg, model, opt, loss_fn, task, steps, on_eval, splits, replica, device)
        if on_model is not None:
            on_model(model, opt)
    finally:
        getattr(opt, "close", lambda: None)()  # K-FAC's hooks tie model and optimizer in a reference cycle
    return curves, longest, str(device)


# ------------------------------------------------------------------------------------------------ data parallel
class _Stopped(Exception):
    """The parent's ``on_eval`` raised: every rank leaves its loop at the same evaluation."""


def _train_data_parallel(cfg: Config, hparams: Mapping[str, Any], optimizer: str | None,
                         on_eval: EvalCallback | None, test: bool) -> Curves:
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
    steps: int, on_eval: EvalCallback | None, splits: Mapping[str, Split], replica: _Replica, device: torch.device,
) -> tuple[list[dict[str, float]], float | None]:
    """The steps and evaluations; returns the curve (one point per evaluation, with the cumulative step clock) and,
    under a time budget, the longest step. Losses are averaged over the ranks before anything is judged on them,
    so every rank decides alike.

    Under ``training.budget.seconds`` the clock is read after every step (on CUDA that synchronises each step) and
    the run ends with the step that brings the training clock to the budget, so it trains at least the budget and
    at most one step more; that last step is evaluated like the last step of a step budget. Evaluations come every
    ``eval_every`` steps, or with ``eval_seconds`` after the first step that brings the training clock past each
    multiple of it: then an optimizer with a dearer step is not evaluated (and timed to a target, and pruned)
    on a coarser grid than a cheap one."""
    target = batch_target(task)
    train = splits["train"].training(cfg.data.batch_size, cfg.training.seed, replica.part)
    network = model.module if isinstance(model, DistributedDataParallel) else model
    budget = cfg.training.budget.seconds if cfg.training.budget is not None else None
    every = cfg.training.eval_seconds
    curves: list[dict[str, float]] = []
    loss_sum, since_eval, train_seconds = torch.zeros((), device=device), 0, 0.0
    longest: float | None = None if budget is None else 0.0
    timed = budget is not None or every is not None  # then the clock is read after every step
    clock = last = _sync_time(device)
    for step in range(1, steps + 1):
        xb, yb = next(train)
        tb = target(xb, yb)

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
        if timed:  # the clock reads tile the training time exactly
            now = _sync_time(device)
            longest, last = None if budget is None else max(longest or 0.0, now - last), now
            elapsed = train_seconds + (now - clock)
            last_step = replica.agree(last_step or (budget is not None and elapsed >= budget))
        if every is not None:  # past the multiple of eval_seconds after the last evaluation (a step may pass several)
            due = replica.agree(elapsed >= (math.floor(train_seconds / every) + 1) * every)
        else:
            due = step % cfg.training.eval_every == 0
        if not (due or last_step):
            continue
        train_seconds += (now if timed else _sync_time(device)) - clock
        metrics = {"train_loss": replica.mean(loss_sum).item() / since_eval}
        for prefix, source in splits.items():
            if prefix != "train":
                metrics.update(_evaluate(network, loss_fn, source, task, cfg.data.eval_batch_size, replica, prefix))
        metrics["step_time"] = train_seconds / step
        metrics["train_seconds"] = train_seconds
        for name in ("train_loss", "eval_loss"):
            if not metrics[name] <= limit:  # also catches NaN
                raise Diverged(step, name, metrics[name], limit=limit)
        curves.append({"step": step, **metrics})
        if on_eval is not None:
            on_eval(step, metrics)
        loss_sum.zero_()
        since_eval = 0
        clock = last = _sync_time(device)
        if last_step:
            break
    return curves, longest


@torch.no_grad()
def _evaluate(model: nn.Module, loss_fn: Callable[..., torch.Tensor], source: Split, task: str, batch_size: int,
              replica: _Replica, prefix: str = "eval") -> dict[str, float]:
    """``<prefix>_loss`` (and ``_accuracy``) over all of ``source``; each rank evaluates its slice and the sums are
    combined."""
    was_training = model.training
    model.eval()
    target = batch_target(task)
    sums = torch.zeros(2, device=source.device)  # loss, correct
    for xb, yb in source.chunks(batch_size, replica.part):
        out = model(xb)
        tb = target(xb, yb)
        sums[0] += loss_fn(out, tb, reduction="sum") / (1 if task == "classification" else tb[0].numel())
        if task == "classification":
            sums[1] += (out.argmax(-1) == tb).sum()
    model.train(was_training)
    total, correct = replica.total(sums).tolist()
    metrics = {f"{prefix}_loss": total / len(source)}
    if task == "classification":
        metrics[f"{prefix}_accuracy"] = correct / len(source)
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
