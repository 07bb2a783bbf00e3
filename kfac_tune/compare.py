"""``kfac-tune compare``: train several recipes on one workload with several seeds and put them side by side.

The question a user asks is "does the tuned K-FAC recipe beat the tuned Adam recipe on my model, in steps and in
seconds?". Answering it fairly needs three things this module keeps:

* **One workload.** Every recipe trains on the CONFIG's data, model and budget; each recipe brings only its
  optimizer and hyperparameters (``bind_recipe``), and a recipe tuned for another network is refused.
* **A common target.** "Steps to target" is measured against the best value *every* recipe reaches on *every*
  seed (the worst of the per-run bests), never a recipe's own minimum: otherwise a recipe that plateaus early
  would look fast.
* **Seeds.** Seed ``s`` changes the initialisation, the batch order, K-FAC's sampled targets (and, for digits,
  the train/test split); seed ``cfg.training.seed`` reproduces the recipe's own run. Spreads are the sample
  standard deviation over seeds. A seed that diverges is counted and left out of the statistics.
"""
from __future__ import annotations

import io
import json
import math
import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kfac_tune import settings
from kfac_tune.config import Config, ConfigError
from kfac_tune.files import write_atomic
from kfac_tune.optim.callsite import KFACWarning
from kfac_tune.recipes import Recipe, RecipeError, check_architecture, load_recipe
from kfac_tune.problem import Problem, preflight
from kfac_tune.training import Diverged, TrainResult, train, warm_up


def bind_recipe(config: Path | Config, recipe: Recipe, recipe_path: Path, *, ignore_architecture: bool = False,
                sets: Sequence[str] = ()) -> tuple[Config, dict[str, Any], Problem]:
    """The CONFIG's workload with the recipe's optimizer: (config, hyperparameters, problem).

    The recipe's hyperparameters are complete constructor arguments (fixed options included), so the config's
    ``optimizer.options`` are dropped rather than merged: options for K-FAC would break an Adam recipe. Raises
    ``RecipeError`` for a recipe tuned for another architecture (unless ``ignore_architecture``) or another loss.
    """
    searched = {"data.batch_size": recipe.training.batch_size} if "batch_size" in recipe.searched else {}
    cfg = settings.load(config, sets, {"optimizer.name": recipe.optimizer, "optimizer.options": {}, **searched})
    hparams = {k: v for k, v in recipe.hyperparameters.items() if k != "loss"}
    try:
        problem = preflight(cfg, hparams)
    except ConfigError as error:
        # the config's optimizer.options were emptied above: what the optimizer refused is the recipe's
        marker = ": optimizer.options: "
        if marker not in str(error):
            raise
        found = str(error).split("; found ", 1)[-1].rstrip(".")
        raise RecipeError(f"recipe {recipe_path}: hyperparameters: expected arguments accepted by "
                          f"{recipe.optimizer}; found {found}") from None
    if not ignore_architecture:
        check_architecture(recipe, problem.architecture, problem.signature)
    if recipe.hyperparameters.get("loss", problem.loss) != problem.loss:
        raise RecipeError(f"{recipe_path}: the recipe was tuned for loss {recipe.hyperparameters['loss']!r}, "
                          f"but {config} trains with {problem.loss!r}")
    return cfg, hparams, problem


# ------------------------------------------------------------------------------------------------ results
@dataclass
class RecipeRuns:
    """One recipe's runs over the seeds (diverged seeds counted, not kept)."""

    label: str
    path: Path
    recipe: Recipe
    runs: list[TrainResult] = field(default_factory=list)
    diverged: int = 0

    def best(self, maximize: bool) -> float:
        """The worst per-seed best: a value every kept seed of this recipe reached."""
        bests = [run.best for run in self.runs]
        return min(bests) if maximize else max(bests)

    def to_target(self, target: float, maximize: bool) -> list[tuple[int, float]]:
        """(step, training seconds) of each seed's first evaluation at or beyond ``target``."""
        reached = []
        for run in self.runs:
            point = next(p for p in run.curves if (p[run.metric] >= target if maximize else p[run.metric] <= target))
            reached.append((int(point["step"]), point["train_seconds"]))
        return reached


@dataclass
class Comparison:
    metric: str
    direction: str
    target: float | None
    seeds: list[int]
    recipes: list[RecipeRuns]

    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per recipe (mean and spread over seeds): the data behind the table, JSON and MLflow."""
        maximize = self.direction == "maximize"
        rows = []
        for entry in self.recipes:
            row: dict[str, Any] = {"recipe": entry.label, "path": str(entry.path), "optimizer": entry.recipe.optimizer,
                                   "seeds": len(entry.runs), "diverged": entry.diverged,
                                   "recorded": recorded(entry.recipe)}
            if entry.runs:
                reached = entry.to_target(self.target, maximize) if self.target is not None else []
                row.update({"final": mean_spread([run.value for run in entry.runs]),
                            "final_test": final_test(entry.runs),
                            "test": test_metrics(entry.runs),
                            "best": mean_spread([run.best for run in entry.runs]),
                            "steps_to_target": mean_spread([step for step, _ in reached]) if reached else None,
                            "seconds_to_target": mean_spread([s for _, s in reached]) if reached else None,
                            "step_time_ms": mean_spread([run.step_time * 1e3 for run in entry.runs]),
                            "steps": entry.runs[0].steps})
            rows.append(row)
        return rows


def recorded(recipe: Recipe) -> dict[str, Any]:
    """What the recipe promised: its value (a mean over ``seeds`` after a race, with its spread), which quantity
    of the curve it is (``objective``) and on which split, to read beside the runs' own."""
    result = recipe.result
    return {"mean": result.value, "spread": result.spread or 0.0, "seeds": len(result.seeds or [recipe.training.seed]),
            "objective": result.objective, "split": result.split}


def final_test(runs: Sequence[TrainResult]) -> dict[str, float] | None:
    """The test split's counterpart of the metric at the end (``eval_loss`` -> ``test_loss``), over the seeds."""
    from kfac_tune.search.selection import test_value

    values = [test_value(run.metric, run.test) for run in runs]
    return mean_spread([v for v in values if v is not None]) if all(v is not None for v in values) else None


def test_metrics(runs: Sequence[TrainResult]) -> dict[str, dict[str, float]]:
    """Every test-split metric at the end (``test_loss``, ``test_accuracy``), over the seeds: a comparison ranked
    on the loss is still read by its accuracy."""
    names = set.intersection(*(set(run.test) for run in runs))
    return {name: mean_spread([run.test[name] for run in runs]) for name in sorted(names)}


def mean_spread(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return {"mean": statistics.fmean(values), "spread": statistics.stdev(values) if len(values) > 1 else 0.0}


def common_target(recipes: Sequence[RecipeRuns], maximize: bool) -> float | None:
    """The best value every kept run of every recipe reached: the worst of the recipes' bests."""
    bests = [entry.best(maximize) for entry in recipes if entry.runs]
    return (min(bests) if maximize else max(bests)) if bests else None


# ------------------------------------------------------------------------------------------------ running
def compare(config: Path, recipe_paths: Sequence[Path], seeds: int, *, ignore_architecture: bool = False,
            sets: Sequence[str] = (), on_run: Callable[[str, int], None] | None = None) -> Comparison:
    """Train every recipe for ``seeds`` seeds on CONFIG's workload (with the ``--set`` items ``sets``);
    ``on_run(label, seed)`` before each run."""
    bound = []
    for label, path in zip(labels(recipe_paths), recipe_paths):
        recipe = load_recipe(path)
        cfg, hparams, _ = bind_recipe(config, recipe, path, ignore_architecture=ignore_architecture, sets=sets)
        bound.append((RecipeRuns(label, path, recipe), cfg, hparams))
    first = bound[0][1]
    seed_list = [first.training.seed + i for i in range(seeds)]
    for _, cfg, hparams in bound:
        warm_up(cfg, hparams)
    for entry, cfg, hparams in bound:
        for seed in seed_list:
            if on_run is not None:
                on_run(entry.label, seed)
            seeded = cfg.model_copy(update={"training": cfg.training.model_copy(update={"seed": seed})})
            try:
                with warnings.catch_warnings():
                    # K-FAC's guards acting (an update skipped or undone, λ raised) is part of the run measured,
                    # as in a search: its lines named no recipe or seed, and pointed into the training loop
                    warnings.simplefilter("ignore", KFACWarning)
                    entry.runs.append(train(seeded, hparams, test=True))
            except Diverged:
                entry.diverged += 1
    entries = [entry for entry, _, _ in bound]
    maximize = first.training.goal == "maximize"
    return Comparison(first.training.metric, first.training.goal, common_target(entries, maximize), seed_list,
                      entries)


def labels(paths: Sequence[Path]) -> list[str]:
    """File stems, or whole paths where two stems collide."""
    stems = [path.stem for path in paths]
    return [stem if stems.count(stem) == 1 else str(path) for stem, path in zip(stems, paths)]


# ------------------------------------------------------------------------------------------------ output
def mean_curves(entry: RecipeRuns) -> dict[str, list[float]]:
    """Per evaluation step over the kept seeds: step, mean training seconds, metric mean and spread."""
    if not entry.runs:
        return {"step": [], "seconds": [], "mean": [], "spread": []}
    metric = entry.runs[0].metric
    length = min(len(run.curves) for run in entry.runs)
    points = [[run.curves[i] for run in entry.runs] for i in range(length)]
    stats = [mean_spread([p[metric] for p in at]) for at in points]
    return {"step": [at[0]["step"] for at in points],
            "seconds": [statistics.fmean(p["train_seconds"] for p in at) for at in points],
            "mean": [s["mean"] for s in stats], "spread": [s["spread"] for s in stats]}


def plot(comparison: Comparison, path: Path, title: str) -> Path:
    """Metric against steps and against training seconds: mean line, ±1 spread band, the target dashed."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.5))
    axes_steps, axes_seconds = figure.subplots(1, 2)
    values = [v for entry in comparison.recipes for run in entry.runs for v in (p[run.metric] for p in run.curves)]
    log_y = bool(values) and min(values) > 0 and comparison.metric != "eval_accuracy"
    for entry in comparison.recipes:
        curves = mean_curves(entry)
        low = [m - s for m, s in zip(curves["mean"], curves["spread"])]
        high = [m + s for m, s in zip(curves["mean"], curves["spread"])]
        for axes, x in ((axes_steps, curves["step"]), (axes_seconds, curves["seconds"])):
            (line,) = axes.plot(x, curves["mean"], marker=".", label=f"{entry.label} ({entry.recipe.optimizer})")
            axes.fill_between(x, low, high, color=line.get_color(), alpha=0.2)
    for axes, xlabel in ((axes_steps, "step"), (axes_seconds, "training seconds (evaluation excluded)")):
        if comparison.target is not None:
            axes.axhline(comparison.target, color="grey", linestyle="--", linewidth=1, label="common target")
        axes.set(xlabel=xlabel, ylabel=comparison.metric, yscale="log" if log_y else "linear")
        axes.grid(alpha=0.3)
    axes_steps.legend()
    figure.suptitle(f"{title}: mean ± std over {len(comparison.seeds)} seeds")
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=100, bbox_inches="tight")
    return write_atomic(path, image.getvalue())


def write_outputs(comparison: Comparison, directory: Path, stem: str) -> tuple[Path, Path]:
    """The plot (PNG) and the table (JSON) in ``directory``, named after the config."""
    png = plot(comparison, directory / f"compare-{stem}.png", stem)
    data = {"metric": comparison.metric, "direction": comparison.direction, "target": comparison.target,
            "seeds": comparison.seeds, "recipes": comparison.rows()}
    table = write_atomic(directory / f"compare-{stem}.json", json.dumps(data, indent=2) + "\n")
    return png, table


def log_to_mlflow(comparison: Comparison, recipe_paths: Sequence[Path], seeds: int, tracking_uri: str,
                  experiment: str, files: Sequence[Path]) -> str:
    """One finished MLflow run for the comparison (its recipes, seeds, metric and target as params; summary
    metrics and mean curves; ``files``); returns its run id."""
    from kfac_tune.tracking import log_comparison

    summary, curves = _tracked_metrics(comparison)
    return log_comparison(
        tracking_uri, experiment, f"compare {' vs '.join(r.label for r in comparison.recipes)}",
        params={"recipes": " ".join(str(p) for p in recipe_paths), "seeds": str(seeds), "metric": comparison.metric,
                "target": str(comparison.target)}, summary=summary, curves=curves, files=list(files))


def _tracked_metrics(comparison: Comparison) -> tuple[dict[str, float], dict[str, list[tuple[int, float]]]]:
    """Summary metrics (``<recipe>.final_mean`` ...) and mean curves (``<recipe>.<metric>`` by step) for MLflow."""
    summary: dict[str, float] = {} if comparison.target is None else {"target": comparison.target}
    for row in comparison.rows():
        for key in ("final", "final_test", "steps_to_target", "seconds_to_target", "step_time_ms"):
            if row.get(key):
                summary[f"{row['recipe']}.{key}_mean"] = row[key]["mean"]
                summary[f"{row['recipe']}.{key}_spread"] = row[key]["spread"]
    means = {f"{entry.label}.{comparison.metric}": mean_curves(entry) for entry in comparison.recipes}
    return summary, {key: [(int(s), m) for s, m in zip(mean["step"], mean["mean"]) if math.isfinite(m)]
                     for key, mean in means.items()}
