"""One trial: sample a point, train, report each evaluation to the pruner, record how it ended.

Outcomes, and why each is what it is (docs/tuning-tools.md §1.5–1.6):

* NaN/inf loss -> ``optuna.TrialPruned`` with ``prune_reason``: a returned NaN would be a FAIL and a returned inf a
  COMPLETE (and a "best" of -inf when maximising); pruned is the honest state for a diverged point.
* Any exception, CUDA out-of-memory included -> FAIL with ``fail_reason``; the study goes on (``catch=(Exception,)``).
* Ctrl-C -> the trial is failed (Optuna does that), ``fail_reason`` says it was interrupted, and the interrupt
  propagates so the CLI can exit 130.

The objective reads only the training and validation splits (``train`` is never asked for test metrics here): the
test split is measured once, for the chosen trial, after the search (``evaluate_test``). With several objectives
(``search.objectives``) the trial returns one value per objective; Optuna cannot prune such studies, so
evaluations are logged but not reported, and only divergence prunes.

Memory is released after every trial, whatever its outcome: a study of OOM-prone trials must not leak. After a
failed or pruned trial that happens in a study callback (``release_after_failure``), once Optuna has let go of the
exception that holds the trial's model.
"""
from __future__ import annotations

import gc
from collections.abc import Callable, Mapping
from typing import Any

import optuna

from kfac_tune import catalog, record
from kfac_tune.config import TIME_OBJECTIVE, Config, ParamSpec
from kfac_tune.problem import task_and_loss
from kfac_tune.processes import interrupt_pending
from kfac_tune.search.quantity import best_point, curve_quantity, metric_objective
from kfac_tune.search.space import optimizer_arguments, suggest, with_training
from kfac_tune.tracking.tracker import RunRecorder, Tracker
from kfac_tune.training import Diverged, TrainResult, train, warm_up

INTERRUPTED = "interrupted (Ctrl-C); resume by running the same command"
REASON_LIMIT = 2000  # characters kept of an exception message


class Objective:
    """The callable passed to ``study.optimize``."""

    def __init__(self, cfg: Config, space: Mapping[str, ParamSpec], tracker: Tracker) -> None:
        self.cfg, self.space, self.tracker = cfg, dict(space), tracker
        self.loss = task_and_loss(cfg)[1]
        self.spec = catalog.optimizer(cfg.optimizer.name)
        self.warmed: set[str] = set()  # K-FAC modes (or "" for other optimizers) this process has warmed up

    def constructor_arguments(self, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """What the optimizer constructor receives: fixed options and the sampled point, completed as the catalog
        entry says (K-FAC: the loss and every convention). Stored on the trial so a recipe is exactly what was run."""
        return self.spec.trial_arguments({**self.cfg.optimizer.options, **hparams}, self.loss)

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        try:
            return self._run(trial)
        except KeyboardInterrupt:  # wherever Ctrl-C lands, also before training starts or after it ends
            record.set_fail_reason(trial, INTERRUPTED)
            raise

    def _run(self, trial: optuna.Trial) -> float | list[float]:
        point = suggest(trial, self.space)
        hparams, cfg = optimizer_arguments(point, self.spec.name), with_training(self.cfg, point)
        arguments = self.constructor_arguments(hparams)
        record.set_hyperparameters(trial, arguments)
        with self.tracker.trial_run(trial, point) as run:
            try:
                self._warm_up(cfg, hparams, arguments)
                trained: list[Any] = []  # the network, kept only when tracking.log_model may log it
                keep = (lambda model, _: trained.append(model)) if self.cfg.tracking.log_model == "best" else None
                position = pruning_positions(self.cfg)
                seen: list[dict[str, float]] = []  # the curve so far, whose quantity the pruner judges
                result = train(cfg, hparams, on_model=keep,
                               on_eval=lambda step, metrics: self._report(trial, run, step, metrics,
                                                                          position(step, metrics), seen))
            except (Diverged, optuna.TrialPruned) as stopped:
                self._prune(trial, run, str(stopped))
            except Exception as error:
                reason = f"{type(error).__name__}: {error}"[:REASON_LIMIT]
                record.set_fail_reason(trial, reason)
                run.set_outcome("FAIL", reason=reason)
                raise
            except KeyboardInterrupt:
                record.set_fail_reason(trial, INTERRUPTED)
                run.set_outcome("FAIL", reason=INTERRUPTED)
                raise
            finally:
                release_memory(after_failure=False)  # a failure's memory: release_after_failure, once it is garbage
            best = best_point(self.cfg, result.curves)
            record.set_result(trial, {
                "step_time": result.step_time, "train_seconds": result.train_seconds, "seconds": result.seconds,
                "steps": result.steps, "device": result.device, "final": result.final, "best": result.best,
                "best_step": int(best["step"]), "best_seconds": best["train_seconds"],
                "max_step_seconds": result.max_step_seconds, "batch_size": cfg.data.batch_size})
            values = objective_values(self.cfg, result)
            run.set_outcome("COMPLETE", value=metric_objective(self.cfg, result))
            if trained and leads(trial.study, values):
                run.log_model(trained.pop())
            return values[0] if len(values) == 1 else values

    def _warm_up(self, cfg: Config, hparams: Mapping[str, Any], arguments: Mapping[str, Any]) -> None:
        """The first trial of each K-FAC mode in this process first trains two untimed steps
        (``training.warm_up``): otherwise the first automatic-mode trial pays torch's one-time forward-mode set-up
        inside its seconds budget (3 s of a 4 s digits trial) and the search under-rates the mode. Only when the
        score depends on the clock (a seconds budget, or ``train_seconds`` among the objectives): otherwise the two
        steps would buy nothing."""
        timed = self.cfg.training.budget is not None or TIME_OBJECTIVE in self.cfg.objectives
        mode = self.spec.mode_of(arguments)
        if timed and mode not in self.warmed:
            self.warmed.add(mode)
            warm_up(cfg, dict(hparams))

    def _report(self, trial: optuna.Trial, run: RunRecorder, step: int, metrics: dict[str, float],
                position: int, seen: list[dict[str, float]]) -> None:
        """Log the curve point, feed the pruner once per evaluation (at ``position``: ``pruning_positions``) the
        quantity the trial will report (``search.objective`` of the curve so far), and prune if it says so (single
        objective only: Optuna has no pruning for several objectives)."""
        if interrupt_pending():  # a Ctrl-C that landed in a gc callback and was dropped (kfac_tune.processes)
            raise KeyboardInterrupt
        run.log_eval(step, metrics)
        seen.append({"step": step, **metrics})
        if len(self.cfg.objectives) > 1:
            return
        value = curve_quantity(self.cfg, seen)
        trial.report(value, position)
        if trial.should_prune():
            quantity = "" if self.cfg.search.objective == "final" else f"{self.cfg.search.objective} "
            raise optuna.TrialPruned(f"pruned by the {self.cfg.search.pruner.name} pruner at step {step} "
                                     f"({metrics['train_seconds']:.3g} s): {quantity}{self.cfg.training.metric} = "
                                     f"{value:.6g}")

    @staticmethod
    def _prune(trial: optuna.Trial, run: RunRecorder, reason: str) -> None:
        record.set_prune_reason(trial, reason)
        run.set_outcome("PRUNED", reason=reason)
        raise optuna.TrialPruned(reason) from None


def leads(study: optuna.Study, values: list[float]) -> bool:
    """Whether a trial with ``values`` leads the study's completed trials: no completed trial is better (one
    objective) or dominates it (several). The trial ``export`` picks led when it completed, so logging the model
    of every leading trial gives the exported trial its model."""
    signs = [1.0 if d == optuna.study.StudyDirection.MINIMIZE else -1.0 for d in study.directions]
    mine = [s * v for s, v in zip(signs, values)]
    for other in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        theirs = [s * v for s, v in zip(signs, other.values)]
        if all(t <= m for t, m in zip(theirs, mine)) and any(t < m for t, m in zip(theirs, mine)):
            return False  # dominated (with one objective: strictly better)
    return True


def objective_values(cfg: Config, result: TrainResult) -> list[float]:
    """The trial's value of each objective: the metric's ``search.objective`` quantity (``search.quantity``), or
    the training seconds used."""
    return [result.train_seconds if name == TIME_OBJECTIVE else metric_objective(cfg, result)
            for name in cfg.objectives]


def release_memory(after_failure: bool) -> None:
    """Free what the finished trial left: Python cycles first, then the CUDA caching allocator's blocks.

    ``train`` detaches K-FAC's hooks when it ends, so a finished trial's model and optimizer are freed by reference
    counting. A full ``gc.collect()`` costs 0.1-0.4 s once torch and SQLAlchemy are loaded: it runs after every
    trial on CUDA (GPU memory is what trials run out of) and, on CPU, after a failed trial, whose traceback may
    keep a model alive in reference cycles.
    """
    import torch

    on_cuda = torch.cuda.is_available()
    if on_cuda or after_failure:
        gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()


def release_after_failure(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Study callback: after a failed or pruned trial, free what its exception kept alive.

    Inside the objective this is too early: the exception still holds the trial's frames (model, optimizer,
    batches), and once Optuna has recorded it, a cycle between its frame and the exception's traceback keeps
    them until the next garbage collection. Callbacks run after that frame has returned, so one collection here
    frees the failed trial's memory before the next trial allocates its own.
    """
    if trial.state in (optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED):
        release_memory(after_failure=True)


def pruning_positions(cfg: Config) -> Callable[[int, Mapping[str, float]], int]:
    """Where the pruner compares each evaluation of one trial: at its step, or under ``training.eval_seconds`` at
    the number of those intervals of training time it has passed, so that trials with cheap and dear steps (K-FAC
    with inverses every step or every 50, Adam) are compared at equal training seconds, not at equal steps. A last
    evaluation off that grid (the end of a seconds budget) takes the next position rather than reporting twice at
    one."""
    every = cfg.training.eval_seconds
    if every is None:
        return lambda step, metrics: step
    last = 0

    def position(step: int, metrics: Mapping[str, float]) -> int:
        nonlocal last
        last = max(int(metrics["train_seconds"] / every + 1e-9), last + 1)
        return last

    return position
