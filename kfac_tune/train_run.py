"""``kfac-tune train``'s outputs beyond the printed table: the trained state saved to a directory, and one MLflow run.

Saved (``--save DIR``, every file written atomically with ``files.write_atomic``):

* ``model.pt``: the network's ``state_dict`` (load it into the same architecture with ``load_state_dict``);
* ``optimizer.pt``: the optimizer's ``state_dict``, to resume training with the same optimizer;
* ``recipe.yaml``: the recipe trained with (``kfac_tune.optimizer_from_recipe(model, DIR/recipe.yaml)``);
* ``result.json``: the run's final validation and test metrics, steps and device.

Logged (unless tracking is off): the full resolved config and the recipe's hyperparameters as params, the curves
as metrics by step, the final metrics, the data set as the run's input, and the model with
``mlflow.pytorch.log_model``. The config and data-set helpers are the ones trial runs use (``tracking.flatten``,
``tracking.dataset_input``), so a train run and a trial run compare column for column.
"""
from __future__ import annotations

import io
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kfac_tune import record
from kfac_tune.files import check_writable_directory, write_atomic
from kfac_tune.secrets import mask, mask_data

if TYPE_CHECKING:
    import torch

    from kfac_tune.config import Config
    from kfac_tune.recipes import Recipe
    from kfac_tune.settings import Settings
    from kfac_tune.training import Problem, TrainResult

MODEL_FILE, OPTIMIZER_FILE, RECIPE_FILE, RESULT_FILE = "model.pt", "optimizer.pt", "recipe.yaml", "result.json"


@dataclass
class TrainOutcome:
    """A finished ``train``: the result, the trained model and optimizer (on the training device), the config and
    recipe it ran with, where it was saved and logged."""

    result: TrainResult
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    cfg: Config
    recipe: Recipe
    problem: Problem
    saved: Path | None = None
    run_id: str | None = None


def bind(config: str | Path | Mapping[str, Any] | Config, recipe_path: str | Path, *,
         ignore_architecture: bool = False, sets: Sequence[str] = (), tracking_uri: str | None = None,
         no_tracking: bool = False) -> tuple[Config, dict[str, Any], Problem, Recipe, Settings]:
    """Everything checked before training: the recipe bound to the config's workload (``compare.bind_recipe``)
    and the resolved tracking settings."""
    from kfac_tune import settings
    from kfac_tune.compare import bind_recipe
    from kfac_tune.recipes import load_recipe

    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path)
    loaded = config if isinstance(config, (str, Path)) else settings.load(config)
    cfg, hparams, problem = bind_recipe(loaded, recipe, recipe_path, ignore_architecture=ignore_architecture,
                                        sets=sets)
    resolved = settings.resolve(cfg, tracking_uri=tracking_uri, no_tracking=no_tracking)
    return resolved.apply(cfg), hparams, problem, recipe, resolved


def length(cfg: Config, problem: Problem) -> str:
    """How long a run of ``cfg`` trains, in the budget's own unit: under a seconds budget the step count is only
    an internal cap (``problem.total_steps``), never what the user asked for."""
    budget = cfg.training.budget
    return f"{problem.steps} steps" if budget is None else f"{budget.seconds:g} s"


def differences(recipe: Recipe, cfg: Config, problem: Problem) -> list[tuple[str, object, object]]:
    """(what, the recipe's, the config's) for each training setting the recipe was tuned with that this config
    changes: the batch size, and the length in the config's unit (seconds under a seconds budget, where the
    recipe's steps are the steps its trial happened to reach)."""
    tuned = recipe.training
    found: list[tuple[str, object, object]] = []
    if tuned.batch_size != cfg.data.batch_size:
        found.append(("batch size", tuned.batch_size, cfg.data.batch_size))
    budget = cfg.training.budget
    if budget is None and tuned.seconds is None and tuned.steps != problem.steps:
        found.append(("steps", tuned.steps, problem.steps))
    elif budget is None and tuned.seconds is not None:
        found.append(("a length of", f"{tuned.seconds:g} s", f"{problem.steps} steps"))
    elif budget is not None and tuned.seconds is not None and tuned.seconds != budget.seconds:
        found.append(("seconds", f"{tuned.seconds:g}", f"{budget.seconds:g}"))
    return found


def run(cfg: Config, hparams: Mapping[str, Any], problem: Problem, recipe: Recipe, recipe_path: str | Path,
        resolved: Settings, save_dir: str | Path | None = None) -> TrainOutcome:
    """Train once with test evaluation, then save (``save_dir``) and log (if tracking is on). Raises
    ``training.Diverged`` when the recipe does not train this workload."""
    from kfac_tune.training import train

    if save_dir is not None:
        check_writable_directory(save_dir)  # before the training, not after it
    kept: list[Any] = []
    result = train(cfg, hparams, test=True, on_model=lambda model, opt: kept.extend((model, opt)))
    outcome = TrainOutcome(result, kept[0], kept[1], cfg, recipe, problem)
    if save_dir is not None:
        outcome.saved = save(Path(save_dir), outcome.model, outcome.optimizer, recipe, result)
    if resolved.tracking:
        outcome.run_id = log(resolved, cfg, recipe, Path(recipe_path), result, outcome.model)
    return outcome


def summary(result: TrainResult) -> dict[str, Any]:
    """The final metrics and run facts that ``result.json`` and the MLflow run both record."""
    return {"metric": result.metric, "value": result.value, "best": result.best, "final": result.final,
            "test": result.test, "steps": result.steps, "seconds": result.seconds, "device": result.device}


def save(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, recipe: Recipe,
         result: TrainResult) -> Path:
    """Write the trained state into ``directory`` (see the module docstring); returns the directory."""
    import torch

    from kfac_tune.recipes import save_recipe

    check_writable_directory(directory)
    for name, state in ((MODEL_FILE, model.state_dict()), (OPTIMIZER_FILE, optimizer.state_dict())):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_atomic(directory / name, buffer.getvalue())
    save_recipe(recipe, directory / RECIPE_FILE)
    write_atomic(directory / RESULT_FILE, json.dumps(summary(result), indent=2, default=str))
    return directory


def log(resolved: Settings, cfg: Config, recipe: Recipe, recipe_path: Path, result: TrainResult,
        model: torch.nn.Module | None) -> str:
    """One finished MLflow run for a ``train``: params, curves, final metrics, the data set, the model. Returns
    its run id. Not retried: it is logged once at the end and the CLI reports a failure."""
    import mlflow
    from mlflow.entities import Metric, Param

    from kfac_tune.tracking.runs import dataset_input, flatten, log_model, used_settings
    from kfac_tune.tracking.server import (MAX_METRICS_PER_BATCH, MAX_PARAM_CHARS, get_or_create_experiment,
                                           open_client, prepare_store)

    uri = resolved.tracking_uri
    prepare_store(uri)
    client = open_client(uri)
    experiment_id = get_or_create_experiment(client, uri, resolved.experiment or cfg.stem)
    run = client.create_run(experiment_id, run_name=f"train {recipe.optimizer} ({recipe_path.name})",
                            tags={record.TAG_KIND: record.KIND_TRAIN, record.TAG_RECIPE: mask(str(recipe_path))})
    run_id = run.info.run_id
    config = mask_data(cfg.model_dump(mode="json", by_alias=True), *resolved.secrets())
    params = {**flatten(used_settings(config)), **flatten({"hyperparameters": recipe.hyperparameters}),
              "recipe": mask(str(recipe_path)), "recipe.study": recipe.provenance.study}
    client.log_batch(run_id, params=[Param(k, v[:MAX_PARAM_CHARS]) for k, v in params.items()])
    now = int(time.time() * 1000)
    metrics = [Metric(key, float(value), now, int(point["step"])) for point in result.curves
               for key, value in point.items() if key != "step"]
    metrics += [Metric(f"final_{key}", float(value), now, result.steps) for key, value in result.final.items()]
    for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[start : start + MAX_METRICS_PER_BATCH])
    client.log_inputs(run_id, datasets=[dataset_input(config["data"], context="train")])
    if model is not None:
        log_model(uri, run_id, model)
    client.set_terminated(run_id)
    return run_id
