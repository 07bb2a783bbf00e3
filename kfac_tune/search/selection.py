"""Choosing a trial from a finished study, and measuring it once on the test split.

``kfac-tune export --pick`` and the end of a search choose the same way:

* ``best``: the best value of the study's metric (ties: fewer training seconds, then the earlier trial);
* ``fastest-within=P%``: the trial with the fewest training seconds among those whose metric is within ``P`` % of
  the best (relative to ``|best|``); on a study with the objectives (metric, train_seconds) it is a point of the
  Pareto front, the cheapest one that gives up at most ``P`` % of the metric.

Training seconds are the ``train_seconds`` objective where the study has one, else the seconds the trial recorded
(``result.train_seconds``), so a single-objective study can be picked from by time too.

The test split is read only here, after the search chose: the chosen trial is trained again (same seed, same
steps) with test evaluation, and the result is stored on the study (``test.<trial number>``) so it is measured
once per trial however often it is exported.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from kfac_tune import record
from kfac_tune.config import TIME_OBJECTIVE, Config, stored_config
from kfac_tune.search.space import optimizer_arguments, with_training

PICK_PATTERN = re.compile(r"^(best|fastest-within=(\d+(?:\.\d*)?)%)$")


@dataclass(frozen=True)
class Pick:
    """How to choose: ``within`` is None for ``best``, else the relative tolerance (0.02 for 2 %)."""

    within: float | None = None

    def __str__(self) -> str:
        return "best" if self.within is None else f"fastest-within={self.within * 100:g}%"


def parse_pick(text: str) -> Pick:
    """``best`` or ``fastest-within=P%``; a ValueError saying the expected form otherwise."""
    match = PICK_PATTERN.match(text.strip())
    if match is None:
        raise ValueError(f"expected 'best' or 'fastest-within=P%' (e.g. fastest-within=2%), got {text!r}")
    return Pick(None if match.group(2) is None else float(match.group(2)) / 100)


def metric_names(study: optuna.Study) -> list[str]:
    """The objectives' names, as the search set them (a study without names: its ``metric`` attribute)."""
    names = study.metric_names
    return list(names) if names else [record.study_metric(study)]


def metric_index(study: optuna.Study) -> int:
    """Which objective is the quality metric (the one that is not ``train_seconds``)."""
    names = metric_names(study)
    return next((i for i, name in enumerate(names) if name != TIME_OBJECTIVE), 0)


def metric_value(study: optuna.Study, trial: FrozenTrial) -> float:
    return trial.values[metric_index(study)]


def train_seconds(study: optuna.Study, trial: FrozenTrial) -> float:
    """The trial's training seconds: its ``train_seconds`` objective, else what it recorded."""
    names = metric_names(study)
    if TIME_OBJECTIVE in names:
        return trial.values[names.index(TIME_OBJECTIVE)]
    return float(record.result(trial).get("train_seconds", math.inf))


def candidates(study: optuna.Study) -> list[FrozenTrial]:
    """Complete trials with a finite metric."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.values is not None and math.isfinite(metric_value(study, t))]


def pareto_front(study: optuna.Study) -> list[FrozenTrial]:
    """The non-dominated complete trials, best metric first (a single-objective study: its best trial)."""
    index = metric_index(study)
    maximize = study.directions[index] == optuna.study.StudyDirection.MAXIMIZE
    if len(study.directions) == 1:
        front = [choose(study, Pick())] if candidates(study) else []
    else:
        front = list(study.best_trials)
    return sorted(front, key=lambda t: ((-1 if maximize else 1) * t.values[index], t.number))


def check_pick(study: optuna.Study, pick: Pick) -> None:
    """A ValueError for a pick that means nothing on this study: ``fastest-within`` ranks trials by training
    seconds, and under ``training.budget.seconds`` every trial trains for the same seconds (the seconds it
    recorded differ by at most a step), so the pick would choose by noise."""
    budget = (study.user_attrs.get(record.CONFIG) or {}).get("training", {}).get("budget")
    if pick.within is not None and budget:
        raise ValueError(f"--pick {pick} chooses by training seconds, but every trial of this study trained for "
                         f"the same {budget.get('seconds'):g} s (training.budget.seconds), so those seconds do not "
                         "tell its trials apart; use --pick best (the best value within that budget)")


def choose(study: optuna.Study, pick: Pick) -> FrozenTrial:
    """The trial ``pick`` selects; ValueError when no trial completed."""
    check_pick(study, pick)
    trials = candidates(study)
    if not trials:
        raise ValueError(f"study {study.study_name!r} has no completed trial with a finite metric")
    sign = -1.0 if study.directions[metric_index(study)] == optuna.study.StudyDirection.MAXIMIZE else 1.0

    def quality(trial: FrozenTrial) -> float:  # smaller is better
        return sign * metric_value(study, trial)

    best = min(quality(t) for t in trials)
    within = [t for t in trials if quality(t) <= best + (pick.within or 0.0) * abs(best)]
    return min(within, key=lambda t: (train_seconds(study, t), quality(t), t.number))


# ------------------------------------------------------------------------------------------------ test split
def study_config(study: optuna.Study) -> Config:
    """The config a study was searched with, as recorded. A study from before validation splits (no ``split``
    attribute) selected on the test split: its config is read with ``data.validation: 0``, as it ran. Read as
    data: its callables are never imported (``config.stored_config``)."""
    raw = study.user_attrs[record.CONFIG]
    if record.SPLIT not in study.user_attrs:
        raw = {**raw, "data": {**raw.get("data", {}), "validation": raw.get("data", {}).get("validation", 0)}}
    return stored_config(raw, f"the config stored with study {study.study_name!r}")


def test_metrics(study: optuna.Study, trial: FrozenTrial, cfg: Config | None = None) -> dict[str, float]:
    """The trial's metrics on the test split, measured once (by training it again) and kept on the study.

    The rerun repeats the trial: its sampled training parameters, its constructor arguments, the same seed and
    the steps it reached (a time-budget trial is rerun for its step count, so the model is the one it selected;
    under ``search.objective: best``, for the step where its best value was reached: the recipe stops there).
    """
    stored = record.test_metrics(study, trial.number)
    if stored is not None:
        return stored
    from kfac_tune.training import Diverged, train

    cfg = cfg or study_config(study)
    check_rerunnable(study, cfg, f"measuring trial {trial.number} on the test split")
    rerun = with_training(cfg, trial.params)
    recorded = record.result(trial)
    early = cfg.search.objective == "best" and "best_step" in recorded  # the recipe stops where the best was
    steps = recorded.get("best_step" if early else "steps")
    if (cfg.training.budget is not None or early) and steps:
        rerun = rerun.model_copy(update={"training": rerun.training.model_copy(
            update={"budget": None, "steps": int(steps), "epochs": None})})
    hparams = trial_arguments(trial, cfg.optimizer.name)
    try:
        result = train(rerun, hparams, optimizer=record.study_attr(study, record.OPTIMIZER), test=True)
        metrics = {k: v for k, v in result.test.items() if math.isfinite(v)}
    except Diverged:
        metrics = {}
    record.set_test_metrics(study, trial.number, metrics)
    return metrics


def check_rerunnable(study: optuna.Study, cfg: Config, purpose: str) -> None:
    """A ConfigError unless ``cfg`` can train the study's trials again: a config read back from the storage names
    callables that kfac-tune never imports (``config.stored_code``)."""
    if not cfg.stored_code():
        return
    from kfac_tune.config import ConfigError

    modules = " and ".join(repr(ref.split("'")[1].split(":")[0]) for ref in cfg.stored_code())
    raise ConfigError(
        f"study {study.study_name!r}: {purpose} trains it again with {' and '.join(cfg.stored_code())}, and "
        "kfac-tune imports code only from your own config, never from a storage: pass the study's CONFIG (e.g. "
        f"kfac-tune export model.yaml), with module {modules} importable (run from the directory that holds it, "
        "or add that directory to PYTHONPATH)")


def trial_arguments(trial: FrozenTrial, optimizer: str) -> dict[str, Any]:
    """The optimizer arguments a trial ran with, as ``train`` takes them (the loss comes from the config)."""
    arguments = record.hyperparameters(trial) or optimizer_arguments(trial.params, optimizer)
    return {k: v for k, v in arguments.items() if k != "loss"}


def test_value(metric: str, metrics: dict[str, Any]) -> float | None:
    """The test split's counterpart of ``metric`` (``eval_loss`` -> ``test_loss``); None if it has none."""
    return metrics.get(metric.replace("eval_", "test_", 1)) if metric.startswith("eval_") else None
