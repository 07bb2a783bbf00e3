"""The processes that run trials: one worker per ``--jobs``, each loading the study and optimising until the
global budget, the deadline or repeated failures stop it.

* The trial budget is global: ``MaxTrialsCallback`` counts COMPLETE and PRUNED trials of every worker and of every
  earlier run, so ``--trials 20`` means 20 finished trials in the study, however many times it was resumed.
* Sampler state is not persisted, so each worker seeds its sampler from the configured seed, its index and the
  study's trial count at start: reproducible for a fresh single-worker study, never a replay on resume.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from kfac_tune import processes
from kfac_tune.config import Config
from kfac_tune.optim import KFACWarning
from kfac_tune.search.objective import Objective, release_after_failure
from kfac_tune.search.space import build_space
from kfac_tune.search.storage import make_pruner, make_sampler, make_storage
from kfac_tune.tracking.tracker import open_tracker

MAX_CONSECUTIVE_FAILURES = 5
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what counts towards the trial budget


def worker_seed(cfg: Config, worker: int, trials_at_start: int) -> int:
    return (cfg.search.sampler.seed * 1_000_003 + worker * 10_007 + trials_at_start) % (2**31 - 1)


@dataclass
class WorkerSpec:
    """Everything a worker process needs; picklable for ``multiprocessing`` spawn."""

    cfg: Config
    study_name: str
    storage_url: str
    budget: int
    deadline: float | None  # time.time() after which no new trial starts
    worker: int
    trials_at_start: int
    tracking: bool
    threads: int | None
    race_runs: int = 0  # runs the race after the search may take: room kept before the deadline


def run_worker(spec: WorkerSpec, callbacks: tuple[Callable[..., None], ...] = ()) -> list[str]:
    """Run trials until the global budget, the deadline or repeated failures stop this worker; return the
    tracking calls its tracker gave up on."""
    import torch

    quiet()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    cfg = spec.cfg
    study = optuna.load_study(study_name=spec.study_name, storage=make_storage(spec.storage_url, cfg),
                              sampler=make_sampler(cfg, worker_seed(cfg, spec.worker, spec.trials_at_start)),
                              pruner=make_pruner(cfg, _study_steps(spec)))
    if len(study.get_trials(deepcopy=False, states=FINISHED)) >= spec.budget:
        return []
    timeout = None if spec.deadline is None else max(spec.deadline - time.time(), 0.001)
    tracker = open_tracker(cfg, spec.study_name, spec.tracking)
    room = [_RoomForRace(spec.deadline, spec.race_runs)] if spec.deadline is not None and spec.race_runs else []
    study.optimize(Objective(cfg, build_space(cfg), tracker), n_trials=None, timeout=timeout, catch=(Exception,),
                   callbacks=[release_after_failure, optuna.study.MaxTrialsCallback(spec.budget, states=FINISHED),
                              _StopAfterFailures(), *room, *callbacks])
    return tracker.given_up


def _study_steps(spec: WorkerSpec) -> int:
    from kfac_tune.problem import load_data, total_steps

    return total_steps(spec.cfg, load_data(spec.cfg).train_examples)


def _worker_main(spec: WorkerSpec, parent: int) -> None:
    """Entry point of a spawned worker. It leads its own process group (its trial's ranks join it) and dies
    with ``parent``; SIGINT, SIGTERM and SIGHUP end it quietly once Optuna failed the running trial."""
    processes.adopt(parent)
    try:
        run_worker(spec)
    except KeyboardInterrupt:
        raise SystemExit(130) from None


class _StopAfterFailures:
    """Stop a worker after several failed trials in a row: a broken setup must not loop forever on the budget
    (failed trials do not count towards it)."""

    def __init__(self, limit: int = MAX_CONSECUTIVE_FAILURES) -> None:
        self.limit, self.failures = limit, 0

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.failures = self.failures + 1 if trial.state == TrialState.FAIL else 0
        if self.failures >= self.limit:
            logging.getLogger("kfac_tune").error("%d trials failed in a row; stopping this worker", self.failures)
            study.stop()


class _RoomForRace:
    """Stop a worker once the time left before the deadline would no longer hold the race that follows the search
    (``race_runs`` runs, each taking as long as the study's completed trials did on average): the race is part of
    the search's budget, in seconds as in trials."""

    def __init__(self, deadline: float, race_runs: int) -> None:
        self.deadline, self.race_runs = deadline, race_runs

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        durations = [t.duration.total_seconds() for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                     if t.duration is not None]
        if durations and time.time() + self.race_runs * sum(durations) / len(durations) >= self.deadline:
            study.stop()


def quiet() -> None:
    """Optuna's per-trial INFO lines would fight the progress display; warnings still show, but a failed trial's
    traceback does not (its reason is on the trial as ``fail_reason``, shown by ``kfac-tune show``). Nor does
    K-FAC's safety acting (``KFACWarning``: an update skipped or rejected, the damping raised): trials explore
    settings that trigger it on purpose, its lines would not say which trial they came from, and the trial's curve
    and outcome show what it did to the run."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    warnings.simplefilter("ignore", KFACWarning)
    trial_logger = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, _NoTraceback) for f in trial_logger.filters):
        trial_logger.addFilter(_NoTraceback())


class _NoTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


def run_processes(spec: WorkerSpec, jobs: int, study: optuna.Study, watch: Callable[[optuna.Study], None]) -> None:
    """``jobs`` spawned workers on the same storage; the parent only watches. On Ctrl-C (SIGTERM, SIGHUP: see
    :mod:`kfac_tune.processes`) it interrupts every worker's group, so each fails its running trial, and kills
    whatever is left after a grace period; workers die with the parent if it is killed outright."""
    import dataclasses
    import signal

    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_worker_main, args=(dataclasses.replace(spec, worker=i), os.getpid()),
                               name=f"kfac-tune-worker-{i}") for i in range(jobs)]
    try:
        for worker in workers:
            worker.start()
        while any(w.is_alive() for w in workers):
            time.sleep(1.0)
            watch(study)
    except KeyboardInterrupt:
        processes.stop(workers, signal.SIGINT, grace_s=60)
        raise
    finally:
        processes.stop(workers)
    failed = [f"worker {i} (exit code {w.exitcode})" for i, w in enumerate(workers) if w.exitcode not in (0, 130)]
    if failed:
        logging.getLogger("kfac_tune").warning("some workers crashed: %s", ", ".join(failed))
