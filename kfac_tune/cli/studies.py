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
    from kfac_tune.record import study_metric
    from kfac_tune.search.study import load_study

    resolved = resolve(config, storage=storage, study=study_name)[1]
    study = load_study(resolved.storage, resolved.study)
    rows = trial_rows(study)
    if not print_data(rows, output_format):
        metric = study_metric(study)
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
                   "(a point of the Pareto front of a (metric, train_seconds) study).")
@handle_errors
def export(config: Path | None, study_name: str | None, storage: str | None, output: Path | None, force: bool,
           pick: str) -> None:
    """Write a study's trial (the best by default) as a recipe YAML."""
    from kfac_tune import record
    from kfac_tune.recipes import check_overwrite, default_path, export_best
    from kfac_tune.search.selection import parse_pick
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
    recipe, path = export_best(study, cfg if same else None, path=target, pick=pick)
    result = recipe.result
    test = "" if result.test_value is None else f", test {result.test_value:.6g}"
    click.echo(f"{path}: {recipe.optimizer} for {recipe.architecture}, {result.metric} = {result.value:.6g} on the "
               f"{result.split} split{test} (trial {recipe.provenance.trial} of {result.trials}, pick {pick})")
