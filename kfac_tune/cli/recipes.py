"""``kfac-tune recipe``: work with recipe files (``recipe find``: the recipes closest to a config's model)."""
from __future__ import annotations

from pathlib import Path

import click

from kfac_tune.catalog import OPTIMIZER_NAMES
from kfac_tune.cli.common import config_argument, fail, format_option, handle_errors, print_data, recipes_dir_option


@click.group()
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

    cfg = load_config(config, {"optimizer.name": optimizer} if optimizer else None)  # bad input before torch loads
    from kfac_tune.display import match_rows, matches_table, output_console
    from kfac_tune.recipes import find_recipes, recipe_directories
    from kfac_tune.search.prepare import preflight_space

    problem = preflight_space(cfg)
    directories = recipe_directories(recipes_dirs)
    rows = match_rows(find_recipes(problem.architecture, problem.signature, cfg.optimizer.name, directories,
                                   cfg.data.callable or cfg.data.name)[:count])
    if print_data(rows, output_format):
        return
    if not rows:
        fail(f"no {cfg.optimizer.name} recipe in {', '.join(map(str, directories)) or '(no recipes directory)'}", 1)
    output_console().print(matches_table(rows, title=f"recipes for {problem.architecture} (signature "
                                                     f"{problem.signature['hash']}), {cfg.optimizer.name}"))
