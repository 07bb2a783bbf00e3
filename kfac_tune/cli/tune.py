"""``kfac-tune search``: run (or resume) a study and write its best recipe."""
from __future__ import annotations

from pathlib import Path

import click

from kfac_tune.catalog import OPTIMIZER_NAMES
from kfac_tune.cli.common import (EXIT_INTERRUPTED, config_argument, fail, finite_seconds, force_option,
                                  format_option, handle_errors, no_tracking_option, print_data, recipes_dir_option,
                                  set_option, shell_command, storage_option, study_option, tracking_uri_option)


@click.command(epilog="""\b
Examples:
  kfac-tune search examples/digits_mlp.yaml
  kfac-tune search model.yaml --trials 50 --jobs 2 --study mlp-v2
  kfac-tune search model.yaml --optimizer adam --no-tracking
  kfac-tune search model.yaml --storage postgresql+psycopg2://tuner@db/kfac   # several machines
  kfac-tune search model.yaml -f json > result.json   # progress on stderr, the result as JSON on stdout
Re-running the same command resumes the study until the budget is reached.""")
@config_argument
@click.option("--trials", type=click.IntRange(1, 1_000_000), metavar="N",
              help="Finished trials (complete + pruned) the study should reach, counting earlier runs and all "
                   "workers. Default: the config's search.trials.")
@click.option("--timeout", type=float, callback=finite_seconds, metavar="S",
              help="Start no new trial after S seconds. Default: the config's search.timeout (none).")
@study_option
@storage_option
@click.option("--jobs", type=click.IntRange(1, 256), default=1, show_default=True, metavar="N",
              help="Worker processes on this machine, sharing the storage (each with its own sampler seed).")
@tracking_uri_option
@click.option("--optimizer", type=click.Choice(OPTIMIZER_NAMES), help="Override the config's optimizer.")
@no_tracking_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), metavar="PATH",
              help="Where to write the best recipe. Default: recipes/<study>.yaml.")
@force_option
@set_option
@click.option("--warm-start", is_flag=True,
              help="First try the closest recipe for this optimizer and network (see `kfac-tune recipe find`); "
                   "same as search.warm_start: true.")
@recipes_dir_option
@click.option("--race-top", type=click.IntRange(1, 100), metavar="N",
              help="Race the N best trials on more seeds before writing the recipe (search.race.top, default 3).")
@click.option("--race-seeds", type=click.IntRange(1, 100), metavar="N",
              help="Seeds per raced trial, its own run included; 1 turns the race off (search.race.seeds, "
                   "default 3). The race's runs count in --trials: it runs when they take at most half of it.")
@format_option
@handle_errors
def search(config: Path, trials: int | None, timeout: float | None, study_name: str | None, storage: str | None,
           jobs: int, tracking_uri: str | None, optimizer: str | None, no_tracking: bool,
           output: Path | None, force: bool, sets: tuple[str, ...], warm_start: bool,
           recipes_dirs: tuple[Path, ...], race_top: int | None, race_seeds: int | None,
           output_format: str) -> None:
    """Run (or resume) an Optuna study over the optimizer's hyperparameters, race its best trials on more seeds,
    and write the best mean as a recipe."""
    from rich.console import Console

    from kfac_tune.api import prepare_search
    from kfac_tune.display import SearchDisplay, describe_match, output_console, safe, trial_rows, trials_table
    from kfac_tune.processes import second_interrupt_ignored
    from kfac_tune.record import study_quantity
    from kfac_tune.search.race import summary as race_summary
    from kfac_tune.secrets import display_url

    overrides = {key: value for key, value in {"optimizer.name": optimizer, "search.warm_start": warm_start or None,
                                               "search.race.top": race_top, "search.race.seeds": race_seeds}.items()
                 if value is not None}
    prepared, resolved = prepare_search(
        config, sets=sets, overrides=overrides, study=study_name, storage=storage, tracking_uri=tracking_uri,
        tracking=not no_tracking, output=output, force=force, trials=trials, timeout=timeout, jobs=jobs,
        recipe_dirs=recipes_dirs)
    cfg, name, storage_url = prepared.cfg, prepared.spec.study_name, resolved.storage
    console = Console(stderr=True)
    if prepared.warm_start is not None:
        console.print(f"warm start: {safe(describe_match(prepared.warm_start))}")
    elif cfg.search.warm_start:
        console.print(f"[yellow]warm start[/]: no {cfg.optimizer.name} recipe found; starting cold")
    console.print(f"study [bold]{safe(name)}[/] in {safe(display_url(storage_url))}  ({cfg.optimizer.name} on "
                  f"{safe(cfg.model.architecture)}, {' and '.join(cfg.objectives)}, {jobs} worker{'s' * (jobs > 1)})")
    if len(cfg.objectives) > 1 and cfg.search.pruner.name != "none":
        console.print(f"[yellow]note[/]: the {cfg.search.pruner.name} pruner is off: Optuna prunes single-objective "
                      "studies only (diverged trials are still pruned)")
    with second_interrupt_ignored(), SearchDisplay(console, prepared.spec.budget, cfg.training.metric) as display:
        display.update(prepared.study)
        outcome = prepared.run(on_progress=display.update, on_race=display.racing)
        display.update(outcome.study)
    storage_words = ("--storage", storage_url) if resolved.origin["storage"] == "--storage" else ()
    resume = shell_command("kfac-tune", "search", config, "--study", name, *storage_words)
    if outcome.interrupted:
        fail(f"interrupted: the running trial was marked failed; completed trials are kept in "
             f"{display_url(storage_url)}. Resume with: {resume}", EXIT_INTERRUPTED)
    if prepared.spec.tracking and outcome.tracking_given_up:
        _warn_incomplete_tracking(cfg.tracking.uri, name, storage_url, outcome.tracking_given_up)
    rows = trial_rows(outcome.study)
    recipe_path = None if outcome.recipe_path is None else str(outcome.recipe_path)
    race = None if outcome.race is None else outcome.race.as_dict()
    if not print_data({"study": name, "storage": display_url(storage_url), "recipe": recipe_path, "race": race,
                       "trials": rows}, output_format):
        output_console().print(trials_table(rows[:10], study_quantity(outcome.study),
                                            title=f"study {name}: best trials"))
    if outcome.race is not None:
        console.print(race_summary(outcome.race, cfg.training.metric))
    if recipe_path is None:
        # without --storage, `show CONFIG` finds the storage the config (or the environment) names
        show = ("show", "--study", name, *storage_words) if storage_words else ("show", config, "--study", name)
        fail(f"no trial completed, so no recipe was written. Inspect failures with: "
             f"{shell_command('kfac-tune', *show)}", 1)
    if output_format == "table":
        click.echo(f"best recipe written to {recipe_path}")


def _warn_incomplete_tracking(tracking_uri: str, study_name: str, storage_url: str, failed: list[str]) -> None:
    """One closing warning when MLflow calls were given up during the search (the server died or stalled): the
    study is complete, its MLflow record is not, and the user should know which is which."""
    from kfac_tune.secrets import display_url

    click.echo(f"Warning: MLflow tracking at {display_url(tracking_uri)} failed for {len(failed)} call(s) "
               f"(first: {failed[0]}); the runs of study {study_name} are incomplete in MLflow, but every "
               f"trial is kept in {display_url(storage_url)} "
               f"({shell_command('kfac-tune', 'show', '--study', study_name)}).", err=True)
