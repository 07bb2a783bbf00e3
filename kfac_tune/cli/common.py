"""What every command shares: the options used by several commands (defined once), the one way a command ends in
error, and output as JSON or YAML.

Nothing here imports torch, optuna or mlflow at module level, so ``kfac-tune --help`` answers at once.
"""
from __future__ import annotations

import functools
import json
import math
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from kfac_tune.settings import DEFAULT_STORAGE, DEFAULT_TRACKING_URI, STORAGE_ENV, TRACKING_URI_ENV
from kfac_tune.text import first_line

F = TypeVar("F", bound=Callable[..., Any])
EXIT_BAD_INPUT, EXIT_INTERRUPTED = 2, 130

config_argument = click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
optional_config_argument = click.argument("config", required=False,
                                          type=click.Path(exists=True, dir_okay=False, path_type=Path))
study_option = click.option(
    "--study", "study_name", metavar="NAME",
    help="Study name. Default: the config file's stem; show/export without CONFIG: the storage's only study.")
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
def _directories(ctx: click.Context, param: click.Parameter, value: tuple[Path, ...]) -> tuple[Path, ...]:
    """Click's ``file_okay=False`` lets a FIFO, socket or device through (none is a regular file), and a recipes
    directory that is none of them was silently searched as empty."""
    for path in value:
        if not path.is_dir():
            raise click.BadParameter(f"{path} is not a directory; expected a directory of recipe YAML files")
    return value


recipes_dir_option = click.option(
    "--recipes-dir", "recipes_dirs", multiple=True, metavar="DIR", callback=_directories,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Also look for recipes here (repeatable; searched before ./recipes and the shipped recipes/).")
format_option = click.option("-f", "--format", "output_format", type=click.Choice(["table", "json", "yaml"]),
                             default="table", show_default=True, help="Output format (json/yaml for scripts).")


def fail(message: str, code: int) -> None:
    """The one way a command ends in error: the message with every credential masked, then exit ``code``."""
    from kfac_tune.secrets import mask

    click.echo(f"Error: {mask(message)}", err=True)
    raise SystemExit(code)


def shell_command(*words: object) -> str:
    """A command line to print for the user to paste: every word shell-quoted (a config named ``a; rm x`` is one
    argument, not two commands), credentials masked."""
    from kfac_tune.secrets import mask

    return " ".join(shlex.quote(mask(str(word))) for word in words)


def finite_seconds(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
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
        from kfac_tune.record import StoredDataError
        from kfac_tune.stores import StoreError, StudyNotFound

        try:
            return command(*args, **kwargs)
        except (ConfigError, RecipeError, StudyNotFound, FileError, StoreError, StoredDataError) as error:
            fail(str(error), EXIT_BAD_INPUT)
        except KeyboardInterrupt:
            fail("interrupted.", EXIT_INTERRUPTED)
        except Exception as error:
            from sqlalchemy.exc import SQLAlchemyError

            from kfac_tune.tracking import TrackingUnavailable

            if isinstance(error, (TrackingUnavailable, SQLAlchemyError)):
                fail(first_line(error), 1)
            raise

    return wrapper  # type: ignore[return-value]


class ManyValuesCommand(click.Command):
    """A command whose ``many_values`` options take every following value up to the next option
    (``--recipes a.yaml b.yaml c.yaml``).

    Click's ``multiple=True`` alone wants ``--recipes a --recipes b``; the documented spelling lists them after
    one flag, so the arguments are rewritten into Click's form before Click's own parser (a public override, no
    reaching into the parser's internals) sees them.
    """

    many_values: tuple[str, ...] = ()

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rewritten: list[str] = []
        flag, first = None, False  # the many-values option being read; whether its next value is its first
        for position, arg in enumerate(args):
            if arg == "--":
                rewritten += args[position:]
                break
            if arg.startswith("-"):
                flag = next((name for name in self.many_values if arg == name or arg.startswith(name + "=")), None)
                first = arg in self.many_values  # ``--recipes a``: Click reads a; ``--recipes=a``: it has its value
                rewritten.append(arg)
            elif flag is not None and not first:
                rewritten += [flag, arg]
            else:
                first = False
                rewritten.append(arg)
        return super().parse_args(ctx, rewritten)


def print_data(data: Any, output_format: str) -> bool:
    """Print ``data`` as JSON or YAML; False for ``table`` (the caller renders its own)."""
    if output_format == "json":
        click.echo(json.dumps(data, indent=2, default=str))
    elif output_format == "yaml":
        import yaml

        click.echo(yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False))
    return output_format != "table"


def resolve(config: Path | None, **flags: Any) -> tuple[Any, Any]:
    """(the config or None, its ``settings.Settings``) for a command whose CONFIG is optional."""
    from kfac_tune import settings

    cfg = None if config is None else settings.load(config)
    return cfg, settings.resolve(cfg, **flags)
