"""Warm starts from recipes: the first trial of a new study is the closest recipe's point.

A recipe for the same network (or a similar one) is usually a far better first guess than the published
defaults, and TPE builds its model from whatever has been evaluated, so one good early trial pulls the whole
search towards its region. Only the sampled hyperparameters are taken, moved into the search space, since a
recipe may come from a wider space or pin values this study searches.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kfac_tune.config import Config, Phrase
from kfac_tune.recipes import Match, RecipeError, find_recipes, load_recipe, match, recipe_directories
from kfac_tune.problem import Problem


def warm_start_match(cfg: Config, problem: Problem, directories: Sequence[str | Path] = ()) -> Match | None:
    """The recipe ``search.warm_start`` asks for: a path, or (``true``) the closest one for this optimizer and
    network in ``directories``, ``./recipes`` and the shipped ``recipes/``. ``None`` when off or nothing fits."""
    setting = cfg.search.warm_start
    if setting is False:
        return None
    if isinstance(setting, str):
        try:
            recipe = load_recipe(setting)
        except RecipeError as error:
            raise cfg.problem("search.warm_start", "expected a readable recipe file (or true)",
                              Phrase(str(error))) from None
        if recipe.optimizer != cfg.optimizer.name:
            raise cfg.problem("search.warm_start", f"expected a recipe for {cfg.optimizer.name}, the optimizer "
                              "searched", Phrase(f"a recipe for {recipe.optimizer}"))
        return match(Path(setting), recipe, problem.architecture, problem.signature)
    matches = find_recipes(problem.architecture, problem.signature, cfg.optimizer.name,
                           recipe_directories(directories), cfg.data.callable or cfg.data.name)
    return matches[0] if matches else None
