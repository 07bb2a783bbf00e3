"""The ``kfac-tune`` command line: search, show, export, train, compare, recipe find, ui.

One module per command family (``tune``: search; ``studies``: show, export; ``runs``: train, compare;
``recipes``: recipe find; ``server``: ui), each a thin command that parses its arguments, calls the module that
owns the work and renders the result; ``common`` holds the shared options and the error handling. Every command
imports torch, optuna and mlflow inside its body, so ``kfac-tune --help`` answers at once. Exit codes: 0 success,
1 a runtime failure (storage or tracking unreachable), 2 bad input (the model YAML, a recipe, a study name;
printed as one paragraph, no traceback), 130 interrupted by Ctrl-C (completed trials are kept; the message says
how to resume).
"""
from __future__ import annotations

import click

from kfac_tune.version import __version__
from kfac_tune.cli.recipes import find, recipe
from kfac_tune.cli.runs import compare, train
from kfac_tune.cli.server import ui
from kfac_tune.cli.studies import export, show
from kfac_tune.cli.tune import search

__all__ = ["cli", "compare", "export", "find", "main", "recipe", "search", "show", "train", "ui"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(version=__version__, prog_name="kfac-tune")
def cli() -> None:
    """Tune K-FAC (or Adam/SGD) hyperparameters for a model described in YAML.

    Optuna runs the study (resumable, SQLite by default), MLflow records every trial, and the best trial is
    exported as a recipe YAML that kfac_tune.optimizer_from_recipe() and `kfac-tune train` load.
    """


for _command in (search, show, export, train, compare, recipe, ui):
    cli.add_command(_command)


def main() -> None:
    """Console-script entry point (``kfac-tune``). SIGTERM and SIGHUP stop a command as Ctrl-C does, so the
    processes it started are stopped too (:mod:`kfac_tune.processes`)."""
    from kfac_tune.processes import command_finished, exit_fast_when_done, interrupt_on_signals

    exit_fast_when_done()
    interrupt_on_signals()
    try:
        cli.main(prog_name="kfac-tune")  # standalone: ends in SystemExit with the command's status
    except SystemExit as done:
        command_finished(done.code if isinstance(done.code, int) else 0 if done.code is None else 1)
        raise
