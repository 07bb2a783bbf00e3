"""The Optuna study behind ``kfac-tune search``: storage, sampler, pruner, resume, budget and workers.

Rules this module keeps (docs/tuning-tools.md §0, §1.2, §1.6):

* The study is created once, in the parent, with ``load_if_exists=True``; workers only load it (two processes
  creating a fresh SQLite database at once crash). Re-running the same command resumes.
* Storage is ``RDBStorage`` with a heartbeat, so a killed worker's RUNNING trial is failed after the grace period
  and re-enqueued by ``RetryHeartbeatStaleTrialCallback`` (same parameters, new trial number), by the next worker
  to start a trial or, whatever the budget, by the next ``search`` to start or end.
* The trial budget is global: ``MaxTrialsCallback`` counts COMPLETE and PRUNED trials of every worker and of every
  earlier run, so ``--trials 20`` means 20 finished trials in the study, however many times it was resumed.
* Sampler state is not persisted, so each worker seeds its sampler from the configured seed, its index and the
  study's trial count at start: reproducible for a fresh single-worker study, never a replay on resume.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from kfac_tune import processes, record
from kfac_tune.config import MAX_STEPS, Config, ConfigError
from kfac_tune.filelock import sqlite_setup_lock
from kfac_tune.recipes import Match, Recipe, export_best, versions
from kfac_tune.search.objective import Objective, release_after_failure
from kfac_tune.search.space import build_space, describe, optimizer_arguments, suggest, warm_starts, with_training
from kfac_tune.search.warm import recipe_point, warm_start_match
from kfac_tune.secrets import display_url, mask, mask_data
from kfac_tune.tracking.tracker import Tracker, open_tracker
from kfac_tune.training import Problem, preflight

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
MAX_CONSECUTIVE_FAILURES = 5
PLOT_REFRESH_S = 300.0
ProgressCallback = Callable[[optuna.Study], None]


@dataclass
class SearchOutcome:
    study: optuna.Study
    recipe: Recipe | None
    recipe_path: Path | None
    interrupted: bool = False
    tracking_given_up: list[str] = field(default_factory=list)  # MLflow calls given up on (the server died)


# ------------------------------------------------------------------------------------------------ pieces


def make_storage(url: str, cfg: Config) -> optuna.storages.RDBStorage:
    """RDB storage with heartbeat and retry of stale trials; SQLite waits up to 30 s for a lock."""
    sqlite = url.startswith("sqlite")
    if sqlite and url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
    heartbeat = cfg.search.heartbeat_interval
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat is "experimental"
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs={"connect_args": {"timeout": 30}} if sqlite else {"pool_pre_ping": True},
            heartbeat_interval=heartbeat,
            grace_period=cfg.search.grace_period or 2 * heartbeat,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=cfg.search.max_retry
            ),
        )


def make_sampler(cfg: Config, seed: int) -> optuna.samplers.BaseSampler:
    name, args = cfg.search.sampler.name, dict(cfg.search.sampler.args)
    classes = {
        "tpe": optuna.samplers.TPESampler,
        "random": optuna.samplers.RandomSampler,
        "gp": optuna.samplers.GPSampler,
        "qmc": optuna.samplers.QMCSampler,
        "cmaes": optuna.samplers.CmaEsSampler,
    }
    if name == "qmc":
        args.setdefault("scramble", True)  # else every worker draws the same sequence
    if name == "tpe":  # one joint model per set of parameters that occur together: the conditional space's modes
        args.setdefault("multivariate", True)
        args.setdefault("group", True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return classes[name](seed=seed, **args)
    except ImportError as error:
        raise cfg.problem("search.sampler.name", f"expected a sampler whose dependencies are installed "
                          f"({error.name or error}: pip install {error.name or 'it'})", name) from None
    except (TypeError, ValueError) as error:
        raise cfg.problem("search.sampler.args", f"expected arguments accepted by optuna's {classes[name].__name__}",
                          args if not str(error) else _phrase(error)) from None


def make_pruner(cfg: Config, steps: int) -> optuna.pruners.BasePruner:
    """Median by default; Hyperband's resource is the training step, from one evaluation to the whole budget
    (under a time budget without a step cap: Optuna's ``auto``). Optuna prunes single-objective studies only, so
    with several ``search.objectives`` there is no pruner (diverged trials are still pruned by the objective)."""
    name, args = cfg.search.pruner.name, cfg.search.pruner.args
    if len(cfg.objectives) > 1:
        return optuna.pruners.NopPruner()
    try:
        if name == "median":
            return optuna.pruners.MedianPruner(**{"n_startup_trials": 5, **args})
        if name == "hyperband":
            defaults = {"min_resource": min(cfg.training.eval_every, steps),
                        "max_resource": "auto" if steps >= MAX_STEPS else steps}
            return optuna.pruners.HyperbandPruner(**{**defaults, **args})
        if args:
            raise TypeError("pruner 'none' takes no arguments")
        return optuna.pruners.NopPruner()
    except (TypeError, ValueError) as error:
        raise cfg.problem("search.pruner.args", f"expected arguments accepted by the {name} pruner",
                          _phrase(error)) from None


def _phrase(error: Exception) -> Any:
    from kfac_tune.config import Phrase

    return Phrase(f"{type(error).__name__}: {error}")


def worker_seed(cfg: Config, worker: int, trials_at_start: int) -> int:
    return (cfg.search.sampler.seed * 1_000_003 + worker * 10_007 + trials_at_start) % (2**31 - 1)


def count(study: optuna.Study, states: tuple[TrialState, ...] = FINISHED) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


# ------------------------------------------------------------------------------------------------ the study


def open_study(cfg: Config, study_name: str, storage_url: str, problem: Problem, space: dict[str, Any]) -> optuna.Study:
    """Create or resume the study, refusing to resume one created from a different objective."""
    study = optuna.create_study(
        study_name=study_name, storage=make_storage(storage_url, cfg), directions=cfg.directions,
        load_if_exists=True, sampler=make_sampler(cfg, cfg.search.sampler.seed),
        pruner=make_pruner(cfg, problem.steps),
    )
    recorded = record.study_attr(study, record.CONFIG_HASH)
    if recorded is not None and recorded != cfg.fingerprint():
        raise ConfigError(
            f"{cfg.source or '<config>'}: study {study_name!r} in {display_url(storage_url)} was created from a "
            f"different model/data/training/optimizer/space (config hash {recorded}, this file {cfg.fingerprint()}); "
            f"resuming would mix incomparable trials. Pass --study NEW_NAME for a new study, or resume with the "
            f"original file."
        )
    if recorded is None:
        record.write_study(study, {
            record.CONFIG: mask_data(cfg.model_dump(mode="json", by_alias=True), storage_url, cfg.storage,
                                     cfg.tracking.uri),
            record.CONFIG_HASH: cfg.fingerprint(),
            record.OPTIMIZER: cfg.optimizer.name,
            record.ARCHITECTURE: problem.architecture,
            record.SIGNATURE: problem.signature,
            record.PARAMETER_GROUPS: problem.parameter_groups,
            record.LOSS: problem.loss,
            record.TASK: problem.task,
            record.STEPS: problem.steps,
            record.METRIC: cfg.training.metric,
            record.SPLIT: problem.split,
            record.SPACE: describe(space),
        })
        study.set_metric_names(cfg.objectives)
    record.write_study(study, {record.VERSIONS: versions()})
    return study


@contextlib.contextmanager
def setup_lock(storage_url: str, study_name: str) -> Iterator[None]:
    """Serialise setting a study up (create the schema and the study, record its config, create its MLflow
    parent run) across ``kfac-tune search`` processes that start at the same moment, as a cluster's workers or
    two shells do.

    Each step is check-then-create, so two processes on a fresh study would otherwise both create the schema
    (one fails: "table ... already exists") or each create an MLflow parent run and split the trials between
    them. On PostgreSQL a session-level advisory lock keyed on the study name does it (released on
    disconnect, so a worker that dies holding it blocks no one); on SQLite an exclusive lock on a file beside
    the database (:mod:`kfac_tune.filelock`, released by the kernel if the holder dies).
    """
    import zlib

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    try:
        postgres = make_url(storage_url).get_backend_name() == "postgresql"
    except Exception:  # not an SQLAlchemy URL: RDBStorage will say so
        postgres = False
    if not postgres:
        with sqlite_setup_lock(storage_url):
            yield
        return
    key = zlib.crc32(f"kfac-tune setup {study_name}".encode())
    engine = create_engine(storage_url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
    finally:
        engine.dispose()


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail the RUNNING trials whose heartbeat is older than the grace period (their worker died) and re-enqueue
    them per ``search.max_retry``. Optuna does it only when a worker is about to start a trial, which never
    happens once the budget is met, so a killed trial would stay RUNNING forever: every ``search`` does it when
    it starts and when it ends, whatever the budget."""
    optuna.storages.fail_stale_trials(study)


def enqueue(study: optuna.Study, points: list[dict[str, Any]], recipe_path: str | None = None) -> None:
    """Enqueue warm-start points once (``skip_if_exists`` makes a resume a no-op), marked as warm starts (from
    ``recipe_path`` when given)."""
    for point in points:
        study.enqueue_trial(point, user_attrs=record.warm_start_attrs(recipe_path), skip_if_exists=True)


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


def run_worker(spec: WorkerSpec, callbacks: tuple[Callable[..., None], ...] = (), tracker: Tracker | None = None) -> None:
    """Run trials until the global budget, the deadline or repeated failures stop this worker (``tracker``: the
    caller's, in the search's own process; else one of its own)."""
    import torch

    quiet()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    cfg = spec.cfg
    study = optuna.load_study(
        study_name=spec.study_name,
        storage=make_storage(spec.storage_url, cfg),
        sampler=make_sampler(cfg, worker_seed(cfg, spec.worker, spec.trials_at_start)),
        pruner=make_pruner(cfg, study_steps(spec)),
    )
    if count(study) >= spec.budget:
        return
    timeout = None if spec.deadline is None else max(spec.deadline - time.time(), 0.001)
    tracker = tracker or open_tracker(cfg, spec.study_name, spec.tracking)
    study.optimize(
        Objective(cfg, build_space(cfg), tracker),
        n_trials=None,
        timeout=timeout,
        catch=(Exception,),
        callbacks=[release_after_failure, optuna.study.MaxTrialsCallback(spec.budget, states=FINISHED),
                   _StopAfterFailures(), *callbacks],
    )


def study_steps(spec: WorkerSpec) -> int:
    from kfac_tune.training import load_data, total_steps

    return total_steps(spec.cfg, len(load_data(spec.cfg).train_x))


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


def quiet() -> None:
    """Optuna's per-trial INFO lines would fight the progress display; warnings still show, but a failed trial's
    traceback does not (its reason is on the trial as ``fail_reason``, shown by ``kfac-tune show``)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    trial_logger = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, _NoTraceback) for f in trial_logger.filters):
        trial_logger.addFilter(_NoTraceback())


class _NoTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


# ------------------------------------------------------------------------------------------------ run_search


@dataclass
class PreparedSearch:
    """A validated, opened study ready to run: everything that can be wrong with the input has been checked."""

    cfg: Config
    study: optuna.Study
    tracker: Tracker
    spec: WorkerSpec
    jobs: int
    recipe_path: str | Path | None
    warm_start: Match | None = None

    def run(self, on_progress: ProgressCallback | None = None) -> SearchOutcome:
        """Run the workers to the budget, then export the best trial and close the MLflow parent run.

        A Ctrl-C returns an interrupted outcome once the running trials were failed, so the caller can say how
        to resume.
        """
        watch = _Watcher(self.tracker, on_progress)
        try:
            if self.jobs == 1:
                run_worker(self.spec, callbacks=(lambda study, trial: watch(study),), tracker=self.tracker)
            else:
                _run_processes(self.spec, self.jobs, self.study, watch)
        except KeyboardInterrupt:
            return SearchOutcome(self.study, None, None, interrupted=True, tracking_given_up=self.tracker.given_up)
        fail_stale_trials(self.study)
        recipe, path = _export(self.study, self.cfg, self.recipe_path)
        self.tracker.finish_study(self.study, str(path) if path else None)
        return SearchOutcome(self.study, recipe, path, tracking_given_up=self.tracker.given_up)


def prepare_search(
    cfg: Config,
    *,
    trials: int | None = None,
    timeout: float | None = None,
    study_name: str | None = None,
    storage: str | None = None,
    jobs: int = 1,
    tracking: bool | None = None,
    recipe_path: str | Path | None = None,
    recipe_dirs: Sequence[str | Path] = (),
) -> PreparedSearch:
    """Check everything that does not need a trial (space, warm starts, data, model, optimizer options, sampler
    and pruner arguments, tracking store) before the storage is touched, then create or resume the study.

    ``trials``/``timeout``/``storage``/``tracking`` default to the config. With ``search.warm_start``, the closest
    recipe (searched in ``recipe_dirs`` first) is enqueued before everything else. Raises ``ConfigError`` for bad
    input.
    """
    quiet()
    space = build_space(cfg)
    starts = warm_starts(cfg, space)
    problem = preflight_space(cfg, space)
    make_sampler(cfg, cfg.search.sampler.seed), make_pruner(cfg, problem.steps)  # argument errors, before storage
    name, storage_url = study_name or cfg.stem, storage or cfg.storage
    tracking = cfg.tracking.enabled if tracking is None else tracking
    tracker = open_tracker(cfg, name, tracking, prepare=True)
    match = warm_start_match(cfg, problem, recipe_dirs)
    with setup_lock(storage_url, name):
        study = open_study(cfg, name, storage_url, problem, space)
        fail_stale_trials(study)
        if match is not None:
            point = recipe_point({**match.recipe.hyperparameters, **match.recipe.searched}, space)
            enqueue(study, [point], recipe_path=str(match.path))
        enqueue(study, starts)
        timeout = timeout if timeout is not None else cfg.search.timeout
        budget = {"trials": trials or cfg.search.trials, "timeout_s": timeout, "jobs": jobs}
        tracker.ensure_parent_run(study, _tags(cfg, storage_url, problem, jobs), _artifacts(cfg, space, storage_url),
                                  params={"space": describe(space), "budget": budget})
    spec = WorkerSpec(
        cfg=cfg, study_name=name, storage_url=storage_url, budget=trials or cfg.search.trials,
        deadline=None if timeout is None else time.time() + timeout, worker=0,
        trials_at_start=len(study.get_trials(deepcopy=False)), tracking=tracking,
        threads=cfg.training.threads or (max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None),
    )
    return PreparedSearch(cfg, study, tracker, spec, jobs, recipe_path, match)


def run_search(cfg: Config, *, on_progress: ProgressCallback | None = None, **options: Any) -> SearchOutcome:
    """``prepare_search(cfg, **options).run(on_progress)``: create or resume the study and run it to its budget
    with ``jobs`` worker processes; the best trial is exported as a recipe (``recipes/<architecture>.yaml``
    unless ``recipe_path``)."""
    return prepare_search(cfg, **options).run(on_progress)


def preflight_space(cfg: Config, space: dict[str, Any] | None = None) -> Problem:
    """``preflight`` at the space's low corner: pinned values and fixed options are checked too, before any trial."""
    point = suggest(_LowTrial(), build_space(cfg) if space is None else space)
    return preflight(with_training(cfg, point), optimizer_arguments(point))


class _LowTrial:
    """A stand-in trial answering every suggestion with the range's low end (or the first choice): a point that
    lets the preflight build the optimizer before any real trial exists."""

    def suggest_float(self, name: str, low: float, high: float, log: bool = False) -> float:
        return low

    def suggest_int(self, name: str, low: int, high: int, log: bool = False) -> int:
        return low

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        return choices[0]


class _Watcher:
    """Called after each trial (or each second with several workers): the caller's progress display, and the
    MLflow study plots refreshed now and then (rendering them costs seconds, so not after every trial)."""

    def __init__(self, tracker: Tracker, on_progress: ProgressCallback | None) -> None:
        self.tracker, self.on_progress = tracker, on_progress
        self.plots_at = time.monotonic()

    def __call__(self, study: optuna.Study) -> None:
        if self.on_progress is not None:
            self.on_progress(study)
        if time.monotonic() - self.plots_at > PLOT_REFRESH_S:
            self.tracker.refresh_plots(study)
            self.plots_at = time.monotonic()


def _run_processes(spec: WorkerSpec, jobs: int, study: optuna.Study, watch: ProgressCallback) -> None:
    """``jobs`` spawned workers on the same storage; the parent only watches. On Ctrl-C (SIGTERM, SIGHUP: see
    :mod:`kfac_tune.processes`) it interrupts every worker's group, so each fails its running trial, and kills
    whatever is left after a grace period; workers die with the parent if it is killed outright."""
    import dataclasses
    import signal

    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_worker_main, args=(dataclasses.replace(spec, worker=i), os.getpid()),
                        name=f"kfac-tune-worker-{i}")
        for i in range(jobs)
    ]
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


def _export(study: optuna.Study, cfg: Config, path: str | Path | None) -> tuple[Recipe | None, Path | None]:
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None, None
    return export_best(study, cfg, path)


def _tags(cfg: Config, storage_url: str, problem: Problem, jobs: int) -> dict[str, str]:
    return {
        record.CONFIG_HASH: cfg.fingerprint(),
        record.OPTIMIZER: cfg.optimizer.name,
        record.ARCHITECTURE: problem.architecture,
        "architecture_hash": str(problem.signature.get("hash")),
        "dataset": cfg.data.callable or cfg.data.name,
        "storage": display_url(storage_url),
        "sampler": cfg.search.sampler.name,
        "pruner": cfg.search.pruner.name,
        record.METRIC: cfg.training.metric,
        "jobs": str(jobs),
        "device": problem.device,
    }


def _artifacts(cfg: Config, space: dict[str, Any], storage_url: str) -> dict[str, str]:
    """The model YAML as written (passwords of the URLs it names masked) and the resolved search space."""
    import yaml

    config_text = Path(cfg.source).read_text(encoding="utf-8") if cfg.source else ""
    config_text = config_text or yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False)
    return {
        "model.yaml": mask(config_text, storage_url, cfg.storage, cfg.tracking.uri),
        "space.yaml": yaml.safe_dump(describe(space), sort_keys=False),
    }
