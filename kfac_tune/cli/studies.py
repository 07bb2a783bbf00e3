"""``kfac-tune show`` and ``kfac-tune export``: read a study back (the one ``search CONFIG`` ran, or the storage's
only one)."""
from __future__ import annotations

from pathlib import Path

import click

from kfac_tune.cli.common import (force_option, format_option, handle_errors, optional_config_argument, print_data,
                                  resolve, storage_option, study_option)


@click.command(epilog="""\b
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
    from kfac_tune.record import study_quantity
    from kfac_tune.search.study import load_study

    resolved = resolve(config, storage=storage, study=study_name)[1]
    study = load_study(resolved.storage, resolved.study)
    rows = trial_rows(study)
    if not print_data(rows, output_format):
        metric = study_quantity(study)
        output_console().print(trials_table(rows, metric, title=f"study {study.study_name}: {len(rows)} trials"))
        if len(study.directions) > 1:
            output_console().print(pareto_table(rows, title=f"Pareto front ({' vs '.join(study.metric_names or [])}); "
                                                            "export one with --pick"))


@click.command(epilog="""\b
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
                   "(a point of the Pareto front of a (metric, train_seconds) study; refused under a seconds "
                   "budget, where every trial trains for the same seconds).")
@click.option("--race-top", type=click.IntRange(1, 100), metavar="N",
              help="With --pick best: race the N best trials on more seeds. Default: what the search planned.")
@click.option("--race-seeds", type=click.IntRange(1, 100), metavar="N",
              help="Seeds per raced trial, its own run included (1: no race). Default: what the search planned; "
                   "runs the search already made are read from the study, not repeated.")
@handle_errors
def export(config: Path | None, study_name: str | None, storage: str | None, output: Path | None, force: bool,
           pick: str, race_top: int | None, race_seeds: int | None) -> None:
    """Write a study's trial (the best by default, or the winner of its seeds race) as a recipe YAML."""
    from rich.console import Console

    from kfac_tune import record
    from kfac_tune.recipes import check_overwrite, default_path
    from kfac_tune.search.export import export_best
    from kfac_tune.search.race import planned_race, summary
    from kfac_tune.search.selection import parse_pick, study_config
    from kfac_tune.search.study import load_study

    try:
        parse_pick(pick)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="'--pick'") from None
    cfg, resolved = resolve(config, storage=storage, study=study_name)
    study = load_study(resolved.storage, resolved.study)
    target = check_overwrite(output or default_path(study.study_name), study.study_name, force,
                             cfg.source if cfg is not None else None)
    # the user's file supplies the code to rerun only if it describes the study's objective
    same = cfg is not None and record.study_attr(study, record.CONFIG_HASH) == cfg.fingerprint()
    console = Console(stderr=True)
    with console.status("racing") as status:
        race = planned_race(study, (cfg if same else None) or study_config(study), pick, race_top, race_seeds,
                            on_run=lambda trial, seed: status.update(f"race: trial {trial} on seed {seed}"))
    recipe, path = export_best(study, cfg if same else None, path=target, pick=pick, race=race)
    if race is not None:
        console.print(summary(race, recipe.result.metric))
    result = recipe.result
    test = "" if result.test_value is None else f", test {result.test_value:.6g}"
    spread = "" if result.seeds is None else f" ± {result.spread:.2g} over {len(result.seeds)} seeds"
    click.echo(f"{path}: {recipe.optimizer} for {recipe.architecture}, {result.metric} = {result.value:.6g}{spread} "
               f"on the {result.split} split{test} (trial {recipe.provenance.trial} of {result.trials}, pick {pick})")
