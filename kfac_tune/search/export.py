"""Export: a study's chosen trial as a recipe.

Why here and not in ``recipes``: building a recipe from a trial reads the study (Optuna), picks a trial and
measures it once on the test split (``search.selection``, which trains), so it belongs to the search; the recipe
format, its files and finding them (``kfac_tune.recipes``) stay below the search and the optimizer.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import optuna
from optuna.trial import TrialState
from pydantic import ValidationError

from kfac_tune import record
from kfac_tune.config import Config
from kfac_tune.recipes import Provenance, Recipe, RecipeError, Result, TrainingSettings, default_path, save_recipe
from kfac_tune.search import selection
from kfac_tune.search.race import RaceOutcome


def recipe_from_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial, cfg: Config | None = None, *,
                      pick: str | None = None, test: bool = True, race: RaceOutcome | None = None) -> Recipe:
    """Build the recipe of ``trial``, using what the search stored on the study and the trial; ``test`` measures
    it on the test split (once per trial, see ``search.selection.test_metrics``). With ``race`` (whose chosen
    candidate is ``trial``) the value is its mean over the raced seeds, with their spread."""
    attrs = study.user_attrs
    cfg = cfg or selection.study_config(study)
    finished = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    recorded = record.result(trial)
    early = cfg.search.objective == "best" and "best_step" in recorded
    steps = recorded.get("best_step" if early else "steps") if cfg.training.budget is not None or early else None
    seconds = None if cfg.training.budget is None else (
        recorded.get("best_seconds") if early else cfg.training.budget.seconds)
    metric = cfg.training.metric
    tested = selection.test_value(metric, selection.test_metrics(study, trial, cfg)) if test else None
    value, spread, seeds = selection.metric_value(study, trial), None, None
    if race is not None:
        value, spread, seeds = race.chosen.mean, race.chosen.spread, race.seeds
    return Recipe(
        architecture=attrs[record.ARCHITECTURE],
        optimizer=attrs[record.OPTIMIZER],
        hyperparameters=record.hyperparameters(trial, trial.params),
        parameter_groups=attrs.get(record.PARAMETER_GROUPS),
        searched=dict(trial.params),
        training=TrainingSettings(
            dataset=cfg.data.callable or cfg.data.name, batch_size=recorded.get("batch_size", cfg.data.batch_size),
            steps=steps or attrs[record.STEPS], seconds=seconds, loss=attrs[record.LOSS], metric=metric,
            seed=cfg.training.seed),
        result=Result(metric=metric, value=value, objective=cfg.search.objective, spread=spread, seeds=seeds,
                      direction=cfg.training.goal, trials=finished, split=attrs.get(record.SPLIT, "test"),
                      test_value=tested, train_seconds=recorded.get("train_seconds"), pick=pick),
        provenance=Provenance(
            study=study.study_name, trial=trial.number, mlflow_run_id=record.trial_run_id(trial),
            config_hash=attrs[record.CONFIG_HASH], architecture=attrs[record.ARCHITECTURE],
            signature=attrs[record.SIGNATURE], device=recorded.get("device", "unknown"),
            date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), versions=record.versions()),
    )


def export_best(study: optuna.Study, cfg: Config | None = None, path: str | Path | None = None,
                pick: str = "best", *, test: bool = True, race: RaceOutcome | None = None) -> tuple[Recipe, Path]:
    """Write the completed trial ``pick`` chooses (``best`` or ``fastest-within=P%``, see
    ``search.selection``), or the winner of ``race`` (``search.race``), as a recipe (default
    ``recipes/<study>.yaml``), measured on the test split."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise RecipeError(f"study {study.study_name!r} has no completed trial yet: nothing to export")
    if not record.created_by_search(study):
        raise RecipeError(f"study {study.study_name!r} was not created by kfac-tune search: no recipe metadata")
    try:
        chosen = race.chosen.trial if race is not None else selection.choose(study, selection.parse_pick(pick))
    except ValueError as error:
        raise RecipeError(f"cannot pick a trial of study {study.study_name!r}: {error}") from None
    try:
        recipe = recipe_from_trial(study, chosen, cfg, pick=pick, test=test, race=race)
    except ValidationError as error:  # check_study vouched for the attributes' shapes; these are their values
        raise _unreadable_trial(study, chosen, error) from None
    target = Path(path) if path is not None else default_path(study.study_name)
    return recipe, save_recipe(recipe, target)


def _unreadable_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial,
                      error: ValidationError) -> record.StoredDataError:
    """What the study stored for ``trial`` does not make a valid recipe: the attribute and the problem."""
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"])
    source = (f"trial {trial.number}'s stored attribute {record.HYPERPARAMETERS!r}"
              if first["loc"][:1] in (("hyperparameters",), ("searched",)) else "a stored attribute")
    problem = first["msg"].removeprefix("Value error, ")
    return record.unreadable(study.study_name, f"{source} does not make a recipe ({field}: {problem})")
