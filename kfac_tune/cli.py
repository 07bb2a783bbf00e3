"""The ``kfac-tune`` command line: search, show, export, train, ui.

Options used by several commands are defined once below. Every command imports torch, optuna and mlflow inside
its body, so ``kfac-tune --help`` answers at once. Exit codes: 0 success, 1 a runtime failure (storage or tracking
unreachable), 2 bad input (the model YAML, a recipe, a study name; printed as one paragraph, no traceback),
130 interrupted by Ctrl-C (completed trials are kept; the message says how to resume).
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click

from kfac_tune import __version__
from kfac_tune.catalog import OPTIMIZER_NAMES
from kfac_tune.settings import DEFAULT_STORAGE, DEFAULT_TRACKING_URI, STORAGE_ENV, TRACKING_URI_ENV
from kfac_tune.text import first_line

F = TypeVar("F", bound=Callable[..., Any])
EXIT_BAD_INPUT, EXIT_INTERRUPTED = 2, 130

# ------------------------------------------------------------------------------------------- shared options

config_argument = click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
optional_config_argument = click.argument("config", required=False,
                                          type=click.Path(exists=True, dir_okay=False, path_type=Path))
study_option = click.option(
    "--study", "study_name", metavar="NAME",
    help="Study name. Default: the config file's stem; show/export without CONFIG: the storage's only study.",
)
storage_option = click.option(
    "--storage", metavar="URL",
    help=f"Optuna storage, any SQLAlchemy URL (postgresql+psycopg2://user@host/db for several machines; put the "
         f"password in the environment, e.g. PGPASSWORD). Default: ${STORAGE_ENV}, else the config's `storage`, "
         f"else {DEFAULT_STORAGE}.",
)
tracking_uri_option = click.option(
    "--tracking-uri", metavar="URI",
    help=f"MLflow tracking URI (sqlite:///… or http://host:port). Default: ${TRACKING_URI_ENV}, else the config's "
         f"`tracking.uri`, else {DEFAULT_TRACKING_URI}.",
)
no_tracking_option = click.option("--no-tracking", is_flag=True, help="Do not log to MLflow (tracking.enabled: false).")
set_option = click.option(
    "--set", "sets", multiple=True, metavar="KEY=VALUE",
    help="Override one config entry before validation, as if written in the file (repeatable): "
         "--set training.steps=50 --set optimizer.options.damping=1e-3. Values are YAML.")
force_option = click.option("--force", is_flag=True,
                            help="Overwrite a recipe file that holds another study's recipe.")

recipes_dir_option = click.option(
    "--recipes-dir", "recipes_dirs", multiple=True, metavar="DIR",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Also look for recipes here (repeatable; searched before ./recipes and the shipped recipes/).")
format_option = click.option("-f", "--format", "output_format", type=click.Choice(["table", "json", "yaml"]),
                             default="table", show_default=True, help="Output format (json/yaml for scripts).")


def _fail(message: str, code: int) -> None:
    """The one way a command ends in error: the message with every credential masked, then exit ``code``."""
    from kfac_tune.secrets import mask

    click.echo(f"Error: {mask(message)}", err=True)
    raise SystemExit(code)


def _command(*words: object) -> str:
    """A command line to print for the user to paste: every word shell-quoted (a config named ``a; rm x`` is one
    argument, not two commands), credentials masked."""
    from kfac_tune.secrets import mask

    return " ".join(shlex.quote(mask(str(word))) for word in words)


def _finite_seconds(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"expected a finite number of seconds > 0, found {value}")
    return value


def handle_errors(command: F) -> F:
    """Turn the errors a user can fix into a message and an exit code instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from kfac_tune.config import ConfigError
        from kfac_tune.files import FileError
        from kfac_tune.recipes import RecipeError
        from kfac_tune.stores import StoreError

        try:
            return command(*args, **kwargs)
        except (ConfigError, RecipeError, StudyNotFound, FileError, StoreError) as error:
            _fail(str(error), EXIT_BAD_INPUT)
        except KeyboardInterrupt:
            _fail("interrupted.", EXIT_INTERRUPTED)
        except Exception as error:
            from sqlalchemy.exc import SQLAlchemyError

            from kfac_tune.tracking import TrackingUnavailable

            if isinstance(error, (TrackingUnavailable, SQLAlchemyError)):
                _fail(first_line(error), 1)
            raise

    return wrapper  # type: ignore[return-value]


class _ManyOption(click.Option):
    """An option taking every following value up to the next option (``--recipes a.yaml b.yaml c.yaml``).

    Click's ``multiple=True`` alone wants ``--recipes a --recipes b``; the issue's spelling lists them after one
    flag, so the parser hands this option the run of non-option arguments that follows it.
    """

    def add_to_parser(self, parser: Any, ctx: click.Context) -> None:
        super().add_to_parser(parser, ctx)
        option = parser._long_opt.get(self.opts[0]) or parser._short_opt.get(self.opts[0])
        original = option.process

        def process(value: str, state: Any) -> None:
            original(value, state)
            while state.rargs and not state.rargs[0].startswith("-"):
                original(state.rargs.pop(0), state)

        option.process = process


class StudyNotFound(LookupError):
    """``--study`` names no study in the storage (or it was omitted and the storage holds several)."""


# ------------------------------------------------------------------------------------------------ group


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(version=__version__, prog_name="kfac-tune")
def cli() -> None:
    """Tune K-FAC (or Adam/SGD) hyperparameters for a model described in YAML.

    Optuna runs the study (resumable, SQLite by default), MLflow records every trial, and the best trial is
    exported as a recipe YAML that KFAC.from_recipe() and `kfac-tune train` load.
    """


@cli.command(epilog="""\b
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
@click.option("--timeout", type=float, callback=_finite_seconds, metavar="S",
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
@format_option
@handle_errors
def search(config: Path, trials: int | None, timeout: float | None, study_name: str | None, storage: str | None,
           jobs: int, tracking_uri: str | None, optimizer: str | None, no_tracking: bool,
           output: Path | None, force: bool, sets: tuple[str, ...], warm_start: bool,
           recipes_dirs: tuple[Path, ...], output_format: str) -> None:
    """Run (or resume) an Optuna study over the optimizer's hyperparameters."""
    from rich.console import Console

    from kfac_tune.api import prepare_search
    from kfac_tune.display import SearchDisplay, describe_match, output_console, trial_rows, trials_table
    from kfac_tune.secrets import display_url

    overrides = {key: value for key, value in {"optimizer.name": optimizer,
                                               "search.warm_start": warm_start or None}.items() if value is not None}
    prepared, resolved = prepare_search(
        config, sets=sets, overrides=overrides, study=study_name, storage=storage, tracking_uri=tracking_uri,
        tracking=not no_tracking, output=output, force=force, trials=trials, timeout=timeout, jobs=jobs,
        recipe_dirs=recipes_dirs)
    cfg, name, storage_url = prepared.cfg, prepared.spec.study_name, resolved.storage
    console = Console(stderr=True)
    if prepared.warm_start is not None:
        console.print(f"warm start: {describe_match(prepared.warm_start)}")
    elif cfg.search.warm_start:
        console.print(f"[yellow]warm start[/]: no {cfg.optimizer.name} recipe found; starting cold")
    console.print(f"study [bold]{name}[/] in {display_url(storage_url)}  ({cfg.optimizer.name} on "
                  f"{cfg.model.architecture}, {' and '.join(cfg.objectives)}, {jobs} worker{'s' * (jobs > 1)})")
    if len(cfg.objectives) > 1 and cfg.search.pruner.name != "none":
        console.print(f"[yellow]note[/]: the {cfg.search.pruner.name} pruner is off: Optuna prunes single-objective "
                      "studies only (diverged trials are still pruned)")
    with _second_interrupt_ignored(), SearchDisplay(console, prepared.spec.budget, cfg.training.metric) as display:
        display.update(prepared.study)
        outcome = prepared.run(on_progress=display.update)
        display.update(outcome.study)
    storage_words = ("--storage", storage_url) if resolved.origin["storage"] == "--storage" else ()
    resume = _command("kfac-tune", "search", config, "--study", name, *storage_words)
    if outcome.interrupted:
        _fail(f"interrupted: the running trial was marked failed; completed trials are kept in "
              f"{display_url(storage_url)}. Resume with: {resume}", EXIT_INTERRUPTED)
    _warn_incomplete_tracking(cfg.tracking.uri if prepared.spec.tracking else None, name, storage_url,
                              outcome.tracking_given_up)
    rows = trial_rows(outcome.study)
    recipe_path = None if outcome.recipe_path is None else str(outcome.recipe_path)
    if not _print_data({"study": name, "storage": display_url(storage_url), "recipe": recipe_path, "trials": rows},
                       output_format):
        output_console().print(trials_table(rows[:10], cfg.training.metric, title=f"study {name}: best trials"))
    if recipe_path is None:
        # without --storage, `show CONFIG` finds the storage the config (or the environment) names
        show = ("show", "--study", name, *storage_words) if storage_words else ("show", config, "--study", name)
        _fail(f"no trial completed, so no recipe was written. Inspect failures with: {_command('kfac-tune', *show)}", 1)
    if output_format == "table":
        click.echo(f"best recipe written to {recipe_path}")


@cli.command(epilog="""\b
Examples:
  kfac-tune show examples/digits_mlp.yaml   # the study `search` ran for this file, in its storage
  kfac-tune show
  kfac-tune show --study digits_mlp -f json
  KFAC_TUNE_STORAGE=sqlite:///runs/tune.db kfac-tune show -f yaml""")
@optional_config_argument
@study_option
@storage_option
@format_option
@handle_errors
def show(config: Path | None, study_name: str | None, storage: str | None, output_format: str) -> None:
    """List a study's trials, best first: state, value, parameters, duration, prune/fail reason; for several
    objectives, the Pareto front too. With CONFIG, its study in its storage (as `search CONFIG` ran it)."""
    from kfac_tune.display import output_console, pareto_table, trial_rows, trials_table
    from kfac_tune.record import study_metric

    study = _load_study(_resolve(config, storage=storage, study=study_name)[1])
    rows = trial_rows(study)
    if not _print_data(rows, output_format):
        metric = study_metric(study)
        output_console().print(trials_table(rows, metric, title=f"study {study.study_name}: {len(rows)} trials"))
        if len(study.directions) > 1:
            output_console().print(pareto_table(rows, title=f"Pareto front ({' vs '.join(study.metric_names or [])}); "
                                                            "export one with --pick"))


@cli.command(epilog="""\b
Examples:
  kfac-tune export examples/digits_mlp.yaml   # the study `search` ran for this file -> recipes/digits_mlp.yaml
  kfac-tune export
  kfac-tune export --study digits_mlp -o recipes/digits-mlp-kfac.yaml
  kfac-tune export --pick fastest-within=2%   # the fastest trial whose metric is within 2 % of the best
The chosen trial is measured once on the test split (trained again unless the search already did); for a
model.callable or data.callable study that needs the study's CONFIG, with your module importable.""")
@optional_config_argument
@study_option
@storage_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), metavar="PATH",
              help="Recipe file to write (atomically). Default: recipes/<study>.yaml.")
@force_option
@click.option("--pick", default="best", show_default=True, metavar="best|fastest-within=P%",
              help="Which trial: the best metric, or the fewest training seconds within P % of the best metric "
                   "(a point of the Pareto front of a (metric, train_seconds) study).")
@handle_errors
def export(config: Path | None, study_name: str | None, storage: str | None, output: Path | None, force: bool,
           pick: str) -> None:
    """Write a study's trial (the best by default) as a recipe YAML."""
    from kfac_tune import record
    from kfac_tune.recipes import check_overwrite, default_path, export_best
    from kfac_tune.search.selection import parse_pick

    try:
        parse_pick(pick)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="'--pick'") from None
    cfg, resolved = _resolve(config, storage=storage, study=study_name)
    study = _load_study(resolved)
    target = check_overwrite(output or default_path(study.study_name), study.study_name, force)
    # the user's file supplies the code to rerun only if it describes the study's objective
    same = cfg is not None and record.study_attr(study, record.CONFIG_HASH) == cfg.fingerprint()
    recipe, path = export_best(study, cfg if same else None, path=target, pick=pick)
    result = recipe.result
    test = "" if result.test_value is None else f", test {result.test_value:.6g}"
    click.echo(f"{path}: {recipe.optimizer} for {recipe.architecture}, {result.metric} = {result.value:.6g} on the "
               f"{result.split} split{test} (trial {recipe.provenance.trial} of {result.trials}, pick {pick})")


@cli.command(epilog="""\b
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
    from rich.table import Table

    from kfac_tune import train_run
    from kfac_tune.display import output_console
    from kfac_tune.recipes import RecipeError

    cfg, hparams, problem, recipe, resolved = train_run.bind(
        config, recipe_path, ignore_architecture=ignore_architecture, sets=sets, tracking_uri=tracking_uri,
        no_tracking=no_tracking)
    console = output_console(stderr=output_format != "table")
    tuned = recipe.training
    for what, theirs, ours in (("batch size", tuned.batch_size, cfg.data.batch_size), ("steps", tuned.steps,
                                                                                         problem.steps)):
        if theirs != ours:
            console.print(f"[yellow]note[/]: the recipe was tuned with {what} {theirs}, {config} uses {ours}")
    from kfac_tune.training import Diverged

    with console.status(f"training {problem.architecture} with {recipe.optimizer} for {problem.steps} steps"):
        try:
            outcome = train_run.run(cfg, hparams, problem, recipe, recipe_path, resolved, save_dir)
        except Diverged as error:
            raise RecipeError(f"recipe {recipe_path} does not train {config}'s workload: {error}. Its "
                              f"hyperparameters were tuned for batch size {tuned.batch_size} and {tuned.steps} "
                              f"steps on {tuned.dataset}; tune them for this workload (kfac-tune search "
                              f"{shlex.quote(str(config))} --warm-start)") from None
    result, run_id = outcome.result, outcome.run_id
    if save_dir is not None:
        console.print(f"saved the trained model to {save_dir / train_run.MODEL_FILE} (with {train_run.OPTIMIZER_FILE}, "
                      f"{train_run.RECIPE_FILE}, {train_run.RESULT_FILE})")
    if run_id is not None:
        from kfac_tune.secrets import display_url

        console.print(f"logged to MLflow run {run_id} in experiment {resolved.experiment} at "
                      f"{display_url(resolved.tracking_uri)}")
    summary = {"metric": result.metric, "value": result.value, "best": result.best, "recipe_value": recipe.result.value,
               "test": result.test, "recipe_test_value": recipe.result.test_value,
               "final": result.final, "steps": result.steps, "step_time_s": result.step_time,
               "seconds": result.seconds, "device": result.device, "mlflow_run_id": run_id,
               "saved": None if save_dir is None else str(save_dir)}
    if _print_data(summary, output_format):
        return
    table = Table(title=f"{recipe.optimizer} on {problem.architecture} ({recipe_path})", show_header=False)
    rows = [(f"final {result.metric}", f"{result.value:.6g}"), (f"best {result.metric}", f"{result.best:.6g}"),
            (f"recipe {recipe.result.metric} ({recipe.result.split})", f"{recipe.result.value:.6g}"),
            *(() if recipe.result.test_value is None else (("recipe test value", f"{recipe.result.test_value:.6g}"),)),
            *((k, f"{v:.6g}") for k, v in result.final.items() if k not in ("step_time", result.metric)),
            ("steps", str(result.steps)), ("step time", f"{result.step_time * 1e3:.3f} ms"),
            ("wall time", f"{result.seconds:.1f} s"), ("device", result.device)]
    for row in rows:
        table.add_row(*row)
    console.print(table)


@cli.command(epilog="""\b
Examples:
  kfac-tune compare examples/digits_mlp.yaml --recipes recipes/digits_mlp-kfac.yaml recipes/digits_mlp-adam.yaml
  kfac-tune compare model.yaml --recipes a.yaml b.yaml c.yaml --seeds 5 -o plots/
  kfac-tune compare model.yaml --recipes a.yaml b.yaml --no-tracking -f json
The common target is the best value every run of every recipe reaches (the worst of their bests).""")
@config_argument
@click.option("--recipes", "recipe_paths", required=True, multiple=True, metavar="PATH...",
              type=click.Path(exists=True, dir_okay=False, path_type=Path), cls=_ManyOption,
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

    from kfac_tune.compare import compare as run_comparison
    from kfac_tune.compare import tracked_metrics, write_outputs
    from kfac_tune import settings
    from kfac_tune.display import comparison_table, output_console
    from kfac_tune.files import check_writable_directory, writable_target

    cfg = settings.load(config, sets)
    resolved = settings.resolve(cfg, tracking_uri=tracking_uri, no_tracking=no_tracking)
    check_writable_directory(output_dir)  # before the training, not after it
    for suffix in (".png", ".json"):
        writable_target(output_dir / f"compare-{cfg.stem}{suffix}")
    console = Console(stderr=True)
    with console.status("comparing") as status:
        result = run_comparison(config, recipe_paths, seeds, ignore_architecture=ignore_architecture, sets=sets,
                                on_run=lambda label, seed: status.update(f"training {label}, seed {seed}"))
    png, table = write_outputs(result, output_dir, cfg.stem)
    if resolved.tracking:
        from kfac_tune.tracking import log_comparison

        summary, curves = tracked_metrics(result)
        experiment = resolved.experiment or cfg.stem
        run_id = log_comparison(
            resolved.tracking_uri, experiment, f"compare {' vs '.join(r.label for r in result.recipes)}",
            params={"recipes": " ".join(str(p) for p in recipe_paths), "seeds": str(seeds), "metric": result.metric,
                    "target": str(result.target)}, summary=summary, curves=curves, files=[png, table])
        console.print(f"logged to MLflow run {run_id} in experiment {experiment}")
    rows = result.rows()
    if not _print_data({"metric": result.metric, "target": result.target, "seeds": result.seeds, "recipes": rows},
                       output_format):
        output_console().print(comparison_table(rows, result.metric, result.target, result.direction == "maximize",
                                                title=f"{cfg.stem}: {len(result.seeds)} seeds, {result.metric}"))
    console.print(f"plot: {png}  table: {table}")


@cli.group()
def recipe() -> None:
    """Work with recipe files (recipes/ ships tuned K-FAC and Adam recipes for the examples)."""


@recipe.command(epilog="""\b
Examples:
  kfac-tune recipe find examples/digits_mlp.yaml
  kfac-tune recipe find model.yaml --optimizer adam -n 3
  kfac-tune recipe find model.yaml --recipes-dir ~/my-recipes -f json
Then warm-start a search with it: kfac-tune search model.yaml --warm-start""")
@config_argument
@click.option("--optimizer", type=click.Choice(OPTIMIZER_NAMES),
              help="Recipes for this optimizer. Default: the config's.")
@recipes_dir_option
@click.option("-n", "--count", type=click.IntRange(1, 1000), default=1, show_default=True,
              help="How many recipes to list, closest first.")
@format_option
@handle_errors
def find(config: Path, optimizer: str | None, recipes_dirs: tuple[Path, ...], count: int, output_format: str) -> None:
    """Report the recipes closest to CONFIG's model: same architecture and signature first, then the same
    architecture name, then the nearest layer shapes."""
    from kfac_tune.config import load_config

    cfg = load_config(config, {"optimizer.name": optimizer} if optimizer else None)
    from kfac_tune.recipes import find_recipes, recipe_directories
    from kfac_tune.search.prepare import preflight_space

    problem = preflight_space(cfg)
    directories = recipe_directories(recipes_dirs)
    matches = find_recipes(problem.architecture, problem.signature, cfg.optimizer.name, directories,
                           cfg.data.callable or cfg.data.name)[:count]
    rows = [{"path": str(m.path), "match": m.kind, "distance": round(m.distance, 3), "optimizer": m.recipe.optimizer,
             "architecture": m.recipe.architecture, "dataset": m.recipe.training.dataset,
             "metric": m.recipe.result.metric, "value": m.recipe.result.value, "trials": m.recipe.result.trials}
            for m in matches]
    if _print_data(rows, output_format):
        return
    if not rows:
        _fail(f"no {cfg.optimizer.name} recipe in {', '.join(map(str, directories)) or '(no recipes directory)'}", 1)
    from kfac_tune.display import matches_table, output_console

    output_console().print(matches_table(rows, title=f"recipes for {problem.architecture} (signature "
                                                     f"{problem.signature['hash']}), {cfg.optimizer.name}"))


@cli.command(epilog="""\b
Examples:
  kfac-tune ui
  kfac-tune ui examples/digits_mlp.yaml   # the config's tracking.uri
  kfac-tune ui --tracking-uri sqlite:///runs/mlflow.db --port 5001
  kfac-tune ui --host 0.0.0.0   # reachable from other machines: the server has no authentication""")
@optional_config_argument
@tracking_uri_option
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True, help="Port to listen on.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (local only by default).")
@handle_errors
def ui(config: Path | None, tracking_uri: str | None, port: int, host: str) -> None:
    """Serve the MLflow UI on a local tracking store and wait (Ctrl-C, SIGTERM or SIGHUP stops it). The store:
    --tracking-uri, else $MLFLOW_TRACKING_URI, else CONFIG's tracking.uri, else the default."""
    from kfac_tune import processes
    from kfac_tune.secrets import display_url
    from kfac_tune.tracking import experiment_url, serve_ui

    uri = _resolve(config, tracking_uri=tracking_uri)[1].tracking_uri
    process = serve_ui(uri, host=host, port=port)
    try:
        base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        click.echo(f"MLflow UI for {display_url(uri)} at {base}")
        from mlflow import MlflowClient

        for experiment in MlflowClient(uri).search_experiments():
            click.echo(f"  {experiment.name}: {experiment_url(base, experiment.experiment_id)}")
        process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        processes.stop([process])


# ------------------------------------------------------------------------------------------------ helpers


def _warn_incomplete_tracking(tracking_uri: str | None, study_name: str, storage_url: str,
                              failed: list[str]) -> None:
    """One closing warning when MLflow calls were given up during the search (the server died or stalled): the
    study is complete, its MLflow record is not, and the user should know which is which."""
    if tracking_uri is None:
        return
    from kfac_tune.secrets import display_url

    if failed:
        click.echo(f"Warning: MLflow tracking at {display_url(tracking_uri)} failed for {len(failed)} call(s) "
                   f"(first: {failed[0]}); the runs of study {study_name} are incomplete in MLflow, but every "
                   f"trial is kept in {display_url(storage_url)} ({_command('kfac-tune', 'show', '--study', study_name)}).",
                   err=True)


@contextlib.contextmanager
def _second_interrupt_ignored() -> Iterator[None]:
    """Let the first Ctrl-C interrupt the search and ignore the ones after it.

    The first one makes Optuna fail the running trial and the command print how to resume; a second one a moment
    later would land inside that clean-up (Optuna's ``tell``, the storage's commit) and end the command with
    Optuna's traceback, or skip the resume message. Once interrupted, SIGINT stays ignored until the process
    exits.
    """
    import signal

    interrupted = False

    from kfac_tune import processes

    def on_interrupt(signum: int, frame: Any) -> None:
        nonlocal interrupted
        interrupted = True
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # in the kernel: holds through interpreter shutdown too
        processes.note_interrupt()  # re-raised at the next evaluation if it lands where Python drops it
        raise KeyboardInterrupt

    processes.note_interrupts()
    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        if not interrupted:
            signal.signal(signal.SIGINT, previous)


def _print_data(data: Any, output_format: str) -> bool:
    """Print ``data`` as JSON or YAML; False for ``table`` (the caller renders its own)."""
    if output_format == "json":
        click.echo(json.dumps(data, indent=2, default=str))
    elif output_format == "yaml":
        import yaml

        click.echo(yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False))
    return output_format != "table"


def _resolve(config: Path | None, **flags: Any) -> tuple[Any, Any]:
    """(the config or None, its ``settings.Settings``) for a command whose CONFIG is optional."""
    from kfac_tune import settings

    cfg = None if config is None else settings.load(config)
    return cfg, settings.resolve(cfg, **flags)


def _load_study(resolved: Any) -> Any:
    """Load the resolved study (or the storage's only study) without touching heartbeats or samplers."""
    import optuna

    from kfac_tune.search.workers import quiet
    from kfac_tune.secrets import display_url
    from kfac_tune.stores import check_storage_url

    quiet()
    url, study_name = resolved.storage, resolved.study
    check_storage_url(url)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        raise StudyNotFound(f"no storage at {display_url(url)}: run `kfac-tune search CONFIG` first, or pass --storage")
    names = optuna.get_all_study_names(storage=url)
    if study_name is None:
        if len(names) != 1:
            listing = ", ".join(names) if names else "none"
            raise StudyNotFound(f"{display_url(url)} holds {len(names)} studies ({listing}); choose one with --study")
        study_name = names[0]
    if study_name not in names:
        raise StudyNotFound(f"no study {study_name!r} in {display_url(url)}; studies there: {', '.join(names) or 'none'}")
    return optuna.load_study(study_name=study_name, storage=url)


def main() -> None:
    """Console-script entry point (``kfac-tune``). SIGTERM and SIGHUP stop a command as Ctrl-C does, so the
    processes it started are stopped too (:mod:`kfac_tune.processes`)."""
    from kfac_tune.processes import interrupt_on_signals

    interrupt_on_signals()
    cli.main(prog_name="kfac-tune")


if __name__ == "__main__":
    main()
