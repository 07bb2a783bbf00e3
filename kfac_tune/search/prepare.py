"""``kfac-tune search`` from a config to a recipe: check everything that can be wrong before the storage is
touched, open or resume the study under its setup lock, enqueue warm starts, run the workers, export the best trial.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from kfac_tune import record
from kfac_tune.config import Config
from kfac_tune.recipes import Match, Recipe
from kfac_tune.search.export import export_best
from kfac_tune.search.race import RaceOutcome, RunCallback, applies, fits, run_race, search_budget
from kfac_tune.search.space import (build_space, describe, optimizer_arguments, point_in_space, suggest, warm_starts,
                                    with_training)
from kfac_tune.search.storage import make_pruner, make_sampler
from kfac_tune.search.study import enqueue, fail_stale_trials, open_study, setup_lock
from kfac_tune.search.warm import warm_start_match
from kfac_tune.search.workers import WorkerSpec, quiet, run_processes, run_worker
from kfac_tune.secrets import display_url, mask
from kfac_tune.tracking.tracker import Tracker, open_tracker
from kfac_tune.problem import Problem, preflight

PLOT_REFRESH_S = 300.0
ProgressCallback = Callable[[optuna.Study], None]


@dataclass
class SearchOutcome:
    study: optuna.Study
    recipe: Recipe | None
    recipe_path: Path | None
    interrupted: bool = False
    tracking_given_up: list[str] = field(default_factory=list)  # MLflow calls given up on (the server died)
    race: RaceOutcome | None = None  # the seeds race that chose the recipe, when the search ran one


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

    def run(self, on_progress: ProgressCallback | None = None, on_race: RunCallback | None = None) -> SearchOutcome:
        """Run the workers to the budget, race the best trials on more seeds (``search.race``, when the budget
        holds it), then export the chosen trial and close the MLflow parent run. ``on_race(trial, seed)`` is
        called before each race run.

        A Ctrl-C returns an interrupted outcome once the running trials were failed (race runs already made are
        kept on the study), so the caller can say how to resume.
        """
        watch = _Watcher(self.tracker, on_progress)
        given_up: list[str] = []
        outcome = None
        try:
            if self.jobs == 1:
                given_up = run_worker(self.spec, callbacks=(lambda study, trial: watch(study),))
            else:
                run_processes(self.spec, self.jobs, self.study, watch)
            fail_stale_trials(self.study)
            completed = bool(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            plan = record.race_plan(self.study) if completed else None
            if plan is not None and plan["seeds"] > 1:
                outcome = run_race(self.study, self.cfg, plan["top"], plan["seeds"], deadline=self.spec.deadline,
                                   on_run=on_race)
        except KeyboardInterrupt:
            return SearchOutcome(self.study, None, None, interrupted=True)
        recipe, path = None, None
        if completed:
            recipe, path = export_best(self.study, self.cfg, self.recipe_path, race=outcome)
        self.tracker.finish_study(self.study, str(path) if path else None)
        return SearchOutcome(self.study, recipe, path, tracking_given_up=given_up + self.tracker.given_up,
                             race=outcome)


def prepare_search(cfg: Config, *, trials: int | None = None, timeout: float | None = None,
                   study_name: str | None = None, storage: str | None = None, jobs: int = 1,
                   tracking: bool | None = None, recipe_path: str | Path | None = None,
                   recipe_dirs: Sequence[str | Path] = ()) -> PreparedSearch:
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
            # the recipe's sampled values (active in its K-FAC mode), each moved into this study's space
            point = point_in_space({**match.recipe.hyperparameters, **match.recipe.searched}, space,
                                   cfg.optimizer.name)
            enqueue(study, [point], recipe_path=str(match.path))
        enqueue(study, starts)
        timeout = timeout if timeout is not None else cfg.search.timeout
        trials = trials or cfg.search.trials
        racing = applies(study) and fits(cfg.search.race, trials)
        record.set_race_plan(study, cfg.search.race.top, cfg.search.race.seeds if racing else 1)
        budget = {"trials": trials, "timeout_s": timeout, "jobs": jobs}
        tracker.ensure_parent_run(study, _tags(cfg, storage_url, problem, jobs), _artifacts(cfg, space, storage_url),
                                  params={"space": describe(space), "budget": budget})
    spec = WorkerSpec(cfg=cfg, study_name=name, storage_url=storage_url,
                      budget=search_budget(cfg.search.race, trials) if racing else trials,
                      race_runs=cfg.search.race.runs if racing else 0,
                      deadline=None if timeout is None else time.time() + timeout, worker=0,
                      trials_at_start=len(study.get_trials(deepcopy=False)), tracking=tracking,
                      threads=cfg.training.threads or (max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None))
    return PreparedSearch(cfg, study, tracker, spec, jobs, recipe_path, match)


def preflight_space(cfg: Config, space: dict[str, Any] | None = None) -> Problem:
    """``preflight`` at the space's low corner: pinned values and fixed options are checked too, before any trial."""
    point = suggest(_LowTrial(), build_space(cfg) if space is None else space)
    return preflight(with_training(cfg, point), optimizer_arguments(point, cfg.optimizer.name))


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


def _tags(cfg: Config, storage_url: str, problem: Problem, jobs: int) -> dict[str, str]:
    return {
        record.CONFIG_HASH: cfg.fingerprint(), record.OPTIMIZER: cfg.optimizer.name,
        record.ARCHITECTURE: problem.architecture, record.TAG_ARCHITECTURE_HASH: str(problem.signature.get("hash")),
        record.TAG_DATASET: cfg.data.callable or cfg.data.name, record.TAG_STORAGE: display_url(storage_url),
        record.TAG_SAMPLER: cfg.search.sampler.name, record.TAG_PRUNER: cfg.search.pruner.name,
        record.METRIC: cfg.training.metric, record.TAG_JOBS: str(jobs), record.TAG_DEVICE: problem.device}


def _artifacts(cfg: Config, space: dict[str, Any], storage_url: str) -> dict[str, str]:
    """The model YAML as written (passwords of the URLs it names masked) and the resolved search space."""
    import yaml

    config_text = Path(cfg.source).read_text(encoding="utf-8") if cfg.source else ""
    config_text = config_text or yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False)
    return {"model.yaml": mask(config_text, storage_url, cfg.storage, cfg.tracking.uri),
            "space.yaml": yaml.safe_dump(describe(space), sort_keys=False)}
