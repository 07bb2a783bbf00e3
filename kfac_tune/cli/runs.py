"""``kfac-tune train`` and ``kfac-tune compare``: train recipes on a config's workload and report the result."""
from __future__ import annotations

import shlex
from pathlib import Path

import click

from kfac_tune.cli.common import (ManyValuesCommand, config_argument, format_option, handle_errors,
                                  no_tracking_option, print_data, set_option, tracking_uri_option)


@click.command(epilog="""\b
Examples:
  kfac-tune train examples/digits_mlp.yaml --recipe recipes/mlp.yaml
  kfac-tune train model.yaml --recipe tuned.yaml --ignore-architecture
  kfac-tune train model.yaml --recipe recipes/mlp.yaml -f json
  kfac-tune train model.yaml --recipe recipes/model.yaml --save runs/model --set training.steps=2000
--save DIR writes model.pt (the state_dict), optimizer.pt, recipe.yaml and result.json; MLflow (unless
--no-tracking) gets a run with the config, the hyperparameters, the curves, the data set and the model.""")
@config_argument
@click.option("--recipe", "recipe_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              metavar="PATH", help="Recipe YAML (from `kfac-tune export`).")
@click.option("--ignore-architecture", is_flag=True,
              help="Use the recipe even if it was tuned for a different network.")
@click.option("--save", "save_dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Write the trained weights, the optimizer state, the recipe and the result into DIR.")
@tracking_uri_option
@no_tracking_option
@set_option
@format_option
@handle_errors
def train(config: Path, recipe_path: Path, ignore_architecture: bool, save_dir: Path | None,
          tracking_uri: str | None, no_tracking: bool, sets: tuple[str, ...], output_format: str) -> None:
    """Train once with a recipe's hyperparameters, print the result, and log it to MLflow."""
    from kfac_tune import train_run
    from kfac_tune.display import add_plain_row, output_console, plain_table, safe
    from kfac_tune.recipes import RecipeError
    from kfac_tune.secrets import display_url
    from kfac_tune.training import Diverged

    cfg, hparams, problem, recipe, resolved = train_run.bind(
        config, recipe_path, ignore_architecture=ignore_architecture, sets=sets, tracking_uri=tracking_uri,
        no_tracking=no_tracking)
    console = output_console(stderr=output_format != "table")
    tuned = recipe.training
    for what, theirs, ours in train_run.differences(recipe, cfg, problem):
        console.print(f"[yellow]note[/]: the recipe was tuned with {what} {theirs}, {safe(config)} uses {ours}")
    with console.status(safe(f"training {problem.architecture} with {recipe.optimizer} for "
                             f"{train_run.length(cfg, problem)}")):
        try:
            outcome = train_run.run(cfg, hparams, problem, recipe, recipe_path, resolved, save_dir)
        except Diverged as error:
            raise RecipeError(f"recipe {recipe_path} does not train {config}'s workload: {error}. Its "
                              f"hyperparameters were tuned for batch size {tuned.batch_size} and {tuned.steps} "
                              f"steps on {tuned.dataset}; tune them for this workload (kfac-tune search "
                              f"{shlex.quote(str(config))} --warm-start)") from None
    result, run_id = outcome.result, outcome.run_id
    if save_dir is not None:
        console.print(safe(f"saved the trained model to {save_dir / train_run.MODEL_FILE} (with "
                           f"{train_run.OPTIMIZER_FILE}, {train_run.RECIPE_FILE}, {train_run.RESULT_FILE})"))
    if run_id is not None:
        console.print(safe(f"logged to MLflow run {run_id} in experiment {resolved.experiment} at "
                           f"{display_url(resolved.tracking_uri)}"))
    summary = {**train_run.summary(result), "recipe_value": recipe.result.value,
               "recipe_test_value": recipe.result.test_value, "step_time_s": result.step_time,
               "mlflow_run_id": run_id, "saved": None if save_dir is None else str(save_dir)}
    if print_data(summary, output_format):
        return
    table = plain_table(f"{recipe.optimizer} on {problem.architecture} ({recipe_path})", show_header=False)
    rows = [(f"final {result.metric}", f"{result.value:.6g}"), (f"best {result.metric}", f"{result.best:.6g}"),
            (f"recipe {recipe.result.metric} ({recipe.result.split})", f"{recipe.result.value:.6g}"),
            *(() if recipe.result.test_value is None else (("recipe test value", f"{recipe.result.test_value:.6g}"),)),
            *((k, f"{v:.6g}") for k, v in result.final.items() if k not in ("step_time", result.metric)),
            ("steps", str(result.steps)), ("step time", f"{result.step_time * 1e3:.3f} ms"),
            ("wall time", f"{result.seconds:.1f} s"), ("device", result.device)]
    for row in rows:
        add_plain_row(table, *row)
    console.print(table)


class _CompareCommand(ManyValuesCommand):
    many_values = ("--recipes",)


@click.command(cls=_CompareCommand, epilog="""\b
Examples:
  kfac-tune compare examples/digits_mlp.yaml --recipes recipes/digits_mlp-kfac.yaml recipes/digits_mlp-adam.yaml
  kfac-tune compare model.yaml --recipes a.yaml b.yaml c.yaml --seeds 5 -o plots/
  kfac-tune compare model.yaml --recipes a.yaml b.yaml --no-tracking -f json
The common target is the best value every run of every recipe reaches (the worst of their bests).""")
@config_argument
@click.option("--recipes", "recipe_paths", required=True, multiple=True, metavar="PATH...",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Recipe YAMLs of any optimizers (K-FAC, Adam, SGD, AdamW, Muon, SOAP; usually two or more), "
                   "each trained on CONFIG's workload. "
                   "Put CONFIG first: the list runs up to the next option.")
@click.option("--seeds", type=click.IntRange(1, 100), default=3, show_default=True,
              help="Seeds per recipe, starting at the config's training.seed (which reproduces the recipe's run).")
@click.option("-o", "--output-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("compare"),
              show_default=True, metavar="DIR", help="Where to write compare-<config stem>.png and .json.")
@tracking_uri_option
@no_tracking_option
@click.option("--ignore-architecture", is_flag=True,
              help="Use recipes even if they were tuned for a different network.")
@set_option
@format_option
@handle_errors
def compare(config: Path, recipe_paths: tuple[Path, ...], seeds: int, output_dir: Path, tracking_uri: str | None,
            no_tracking: bool, ignore_architecture: bool, sets: tuple[str, ...], output_format: str) -> None:
    """Train recipes with several seeds on one workload: final metric, steps and seconds to a common target."""
    from rich.console import Console

    from kfac_tune import settings
    from kfac_tune.compare import compare as run_comparison
    from kfac_tune.compare import log_to_mlflow, write_outputs
    from kfac_tune.display import comparison_table, output_console, safe
    from kfac_tune.files import check_writable_directory, writable_target

    cfg = settings.load(config, sets)
    resolved = settings.resolve(cfg, tracking_uri=tracking_uri, no_tracking=no_tracking)
    check_writable_directory(output_dir)  # before the training, not after it
    for suffix in (".png", ".json"):
        writable_target(output_dir / f"compare-{cfg.stem}{suffix}")
    console = Console(stderr=True)
    with console.status("comparing") as status:
        result = run_comparison(config, recipe_paths, seeds, ignore_architecture=ignore_architecture, sets=sets,
                                on_run=lambda label, seed: status.update(safe(f"training {label}, seed {seed}")))
    png, table = write_outputs(result, output_dir, cfg.stem)
    if resolved.tracking:
        experiment = resolved.experiment or cfg.stem
        run_id = log_to_mlflow(result, recipe_paths, seeds, resolved.tracking_uri, experiment, [png, table])
        console.print(safe(f"logged to MLflow run {run_id} in experiment {experiment}"))
    rows = result.rows()
    if not print_data({"metric": result.metric, "target": result.target, "seeds": result.seeds, "recipes": rows},
                      output_format):
        output_console().print(comparison_table(rows, result.metric, result.target, result.direction == "maximize",
                                                title=f"{cfg.stem}: {len(result.seeds)} seeds, {result.metric}"))
    console.print(safe(f"plot: {png}  table: {table}"))
