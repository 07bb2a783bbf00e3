"""Build the optimizer a trial or a recipe asks for, by name, from flat hyperparameters.

The search space and recipes speak in flat ``name: value`` pairs (``beta1``, ``beta2`` rather than a ``betas``
tuple) so that every hyperparameter is one Optuna parameter and one YAML line; this module is the only place that
knows how each optimizer's constructor wants them. K-FAC takes its constructor names unchanged.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

OPTIMIZERS = ("kfac", "adam", "sgd")


def hyperparameter_names(name: str) -> tuple[str, ...]:
    """The hyperparameters the search may tune for optimizer ``name`` (beyond these, options are fixed)."""
    if name == "kfac":
        from kfac_tune.optim import KFAC

        return tuple(KFAC.HYPERPARAMETERS)
    if name == "adam":
        return ("lr", "beta1", "beta2", "weight_decay", "eps")
    if name == "sgd":
        return ("lr", "momentum", "weight_decay", "nesterov", "dampening")
    raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")


def build_optimizer(name: str, model: nn.Module, hparams: Mapping[str, Any], *, loss: str) -> torch.optim.Optimizer:
    """``torch.optim`` optimizer ``name`` over ``model``'s trainable parameters.

    ``loss`` is the functional the training loop minimises; only K-FAC uses it (its curvature is the Fisher of that
    loss), the first-order optimizers ignore it. Unknown or bad hyperparameters raise ``TypeError``/``ValueError``
    from the constructor, which the preflight turns into a config error.
    """
    params = dict(hparams)
    if name == "kfac":
        from kfac_tune.optim import KFAC

        return KFAC(model, **{"loss": loss, **params})
    trainable = [p for p in model.parameters() if p.requires_grad]
    if name == "adam":
        betas = (params.pop("beta1", 0.9), params.pop("beta2", 0.999))
        return torch.optim.Adam(trainable, betas=betas, **params)
    if name == "sgd":
        params.setdefault("momentum", 0.9)
        params.setdefault("nesterov", params["momentum"] > 0)
        return torch.optim.SGD(trainable, **params)
    raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
