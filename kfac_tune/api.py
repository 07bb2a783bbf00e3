"""The Python API: what ``kfac-tune search`` and ``kfac-tune train`` do, callable from a script or a notebook.

``config`` is a YAML path, a mapping shaped like the YAML, or a ``kfac_tune.config.Config``; ``overrides`` maps
dotted keys to values (``{"training.steps": 50}``), applied before validation like ``--set``. Stores and study
name resolve exactly as on the command line (``kfac_tune.settings``: argument, then environment, then the
config, then the defaults). Bad input raises ``kfac_tune.config.ConfigError`` or ``kfac_tune.recipes.RecipeError``
with the message the CLI would print.

    import kfac_tune
    study = kfac_tune.search("model.yaml", trials=20, overrides={"training.steps": 200})
    outcome = kfac_tune.train("model.yaml", "recipes/model.yaml", save="runs/model")
    outcome.model, outcome.result.test
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

    from kfac_tune.config import Config
    from kfac_tune.search.prepare import PreparedSearch
    from kfac_tune.settings import Settings
    from kfac_tune.train_run import TrainOutcome


def prepare_search(config: str | Path | Mapping[str, Any] | Config, *, sets: Sequence[str] = (),
                   overrides: Mapping[str, Any] | None = None, study: str | None = None, storage: str | None = None,
                   tracking_uri: str | None = None, tracking: bool = True, output: str | Path | None = None,
                   force: bool = False, **options: Any) -> tuple[PreparedSearch, Settings]:
    """Everything ``search`` checks before the first trial (the CLI's route too): the config with its overrides,
    the resolved stores, the recipe path (``recipes/<study>.yaml`` unless ``output``; another study's recipe there
    needs ``force``), then the opened study. ``options`` go to ``kfac_tune.search.prepare_search``."""
    from kfac_tune import settings
    from kfac_tune.recipes import check_overwrite, default_path
    from kfac_tune.stores import check_distinct_stores, check_storage_url

    cfg = settings.load(config, sets, overrides)
    resolved = settings.resolve(cfg, storage=storage, tracking_uri=tracking_uri, no_tracking=not tracking,
                                study=study)
    cfg = resolved.apply(cfg)
    name = resolved.study or cfg.stem
    check_storage_url(resolved.storage)
    check_distinct_stores(resolved.storage, resolved.tracking_uri if resolved.tracking else None)
    named = default_path(name)  # a study name must be a plain file name, whether or not a path is given
    # before the search: another study's recipe, the config itself, a symlink need force
    target = check_overwrite(Path(output) if output is not None else named, name, force, cfg.source)
    from kfac_tune.search.prepare import prepare_search as open_search  # after validation: bad input before torch loads

    prepared = open_search(cfg, study_name=name, storage=resolved.storage, tracking=resolved.tracking,
                           recipe_path=target, **options)
    return prepared, resolved


def search(config: str | Path | Mapping[str, Any] | Config, *, study: str | None = None, storage: str | None = None,
           tracking_uri: str | None = None, tracking: bool = True, trials: int | None = None,
           timeout: float | None = None, jobs: int = 1, output: str | Path | None = None, force: bool = False,
           overrides: Mapping[str, Any] | None = None) -> optuna.Study:
    """Run (or resume) the study for ``config`` to its budget, export the best trial as a recipe (``output``,
    default ``recipes/<study>.yaml``; another study's recipe there needs ``force``), and return the Optuna study.
    ``tracking=False`` is ``--no-tracking``."""
    prepared, _ = prepare_search(config, overrides=overrides, study=study, storage=storage,
                                 tracking_uri=tracking_uri, tracking=tracking, output=output, force=force,
                                 trials=trials, timeout=timeout, jobs=jobs)
    outcome = prepared.run()
    if outcome.interrupted:
        raise KeyboardInterrupt
    return outcome.study


def train(config: str | Path | Mapping[str, Any] | Config, recipe: str | Path, *, save: str | Path | None = None,
          tracking_uri: str | None = None, tracking: bool = True, ignore_architecture: bool = False,
          overrides: Mapping[str, Any] | None = None) -> TrainOutcome:
    """Train ``config``'s model once with the recipe at ``recipe`` (``kfac-tune train``); returns the outcome:
    ``.result`` (metrics, curves, ``.test``), ``.model`` and ``.optimizer`` (trained), ``.saved``, ``.run_id``."""
    from kfac_tune import settings, train_run

    loaded = settings.load(config, overrides=overrides)
    cfg, hparams, problem, bound, resolved = train_run.bind(
        loaded, recipe, ignore_architecture=ignore_architecture, tracking_uri=tracking_uri, no_tracking=not tracking)
    return train_run.run(cfg, hparams, problem, bound, recipe, resolved, save)
