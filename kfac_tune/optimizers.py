"""Build the optimizer a trial or a recipe asks for, by name, from flat hyperparameters.

The search space and recipes speak in flat ``name: value`` pairs (``beta1``, ``beta2`` rather than a ``betas``
tuple) so that every hyperparameter is one Optuna parameter and one YAML line; the builders here (named by
``kfac_tune.catalog``) are the only place that knows how each constructor wants them. K-FAC takes its constructor
names unchanged. Muon's builder, which also splits the model's parameters, lives in ``kfac_tune.muon``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kfac_tune import catalog


def build_optimizer(name: str, model: nn.Module, hparams: Mapping[str, Any], *, loss: str) -> Any:
    """Optimizer ``name`` over ``model``'s trainable parameters.

    ``loss`` is the functional the training loop minimises; only K-FAC uses it (its curvature is the Fisher of that
    loss), the first-order optimizers ignore it. Unknown or bad hyperparameters raise ``TypeError``/``ValueError``
    from the constructor, which the preflight turns into a config error.
    """
    return catalog.optimizer(name).build(model, hparams, loss=loss)


def optimizer_from_recipe(model: nn.Module, recipe: Any, *, strict: bool = True, **overrides: Any) -> Any:
    """The optimizer a recipe (a path or a loaded ``Recipe``) describes, over ``model``; ``overrides`` win.

    Works for every optimizer in the catalog (``KFAC.from_recipe`` is the K-FAC-only spelling). The recipe's
    hyperparameters are complete constructor arguments, so this builds exactly what the search ran. A recipe
    tuned for another network raises ``RecipeError`` naming both, unless ``strict=False``.
    """
    from kfac_tune.recipes import recipe_for_model

    recipe = recipe_for_model(recipe, model, strict=strict)
    arguments = {**recipe.hyperparameters, **overrides}
    return build_optimizer(recipe.optimizer, model, arguments, loss=arguments.pop("loss", recipe.training.loss))


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def adam_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """Adam-family constructor arguments from flat ones: ``beta1``/``beta2`` (default torch's) become ``betas``."""
    betas = (arguments.pop("beta1", 0.9), arguments.pop("beta2", 0.999))
    return {"betas": betas, **arguments}


def build_kfac(model: nn.Module, arguments: dict[str, Any], *, loss: str | None) -> Any:
    from kfac_tune.optim import KFAC

    return KFAC(model, **{"loss": loss, **arguments}) if loss else KFAC(model, **arguments)


def build_adam(model: nn.Module, arguments: dict[str, Any], *, loss: str | None) -> torch.optim.Optimizer:
    return torch.optim.Adam(trainable(model), **adam_arguments(arguments))


def build_adamw(model: nn.Module, arguments: dict[str, Any], *, loss: str | None) -> torch.optim.Optimizer:
    return torch.optim.AdamW(trainable(model), **adam_arguments(arguments))


def build_sgd(model: nn.Module, arguments: dict[str, Any], *, loss: str | None) -> torch.optim.Optimizer:
    arguments.setdefault("momentum", 0.9)
    arguments.setdefault("nesterov", arguments["momentum"] > 0)
    return torch.optim.SGD(trainable(model), **arguments)


def build_soap(model: nn.Module, arguments: dict[str, Any], *, loss: str | None) -> torch.optim.Optimizer:
    """heavyball's SOAP (Adam in the eigenbasis of Shampoo's preconditioner; Vyas et al. 2024), run eagerly.

    heavyball compiles its step with ``torch.compile`` by default; on a CPU the first step then takes about two
    minutes (measured: 128 s for a 64-32-10 MLP), longer than a whole trial, so kfac-tune switches compilation off
    (a process-wide heavyball setting) and every optimizer it compares runs eagerly alike.
    """
    try:
        import heavyball
    except ImportError as error:
        raise ValueError(f"the soap optimizer needs the heavyball package (pip install heavyball): {error}") from None
    heavyball.utils.compile_mode = None
    defaults = {"beta1": 0.9, "beta2": 0.95}  # heavyball's SOAP defaults, not Adam's
    return heavyball.SOAP(trainable(model), **adam_arguments({**defaults, **arguments}))
