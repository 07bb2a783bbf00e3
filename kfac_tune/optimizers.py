"""The builders the catalog names: each turns flat hyperparameters into one optimizer's constructor call.

The search space and recipes speak in flat ``name: value`` pairs (``beta1``, ``beta2`` rather than a ``betas``
tuple) so that every hyperparameter is one Optuna parameter and one YAML line; the builders here (named by
``kfac_tune.catalog``, which calls them: they import nothing of the tool but the optimizers they build) are the
only place that knows how each constructor wants them. K-FAC takes its constructor names unchanged. Muon's
builder, which also splits the model's parameters, lives in ``kfac_tune.muon``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kfac_tune.lion import Lion


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
    arguments.setdefault("nesterov", arguments["momentum"] > 0)  # momentum: the caller's, or the catalog's 0.9
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
    return heavyball.SOAP(trainable(model), **adam_arguments(arguments))  # betas: the catalog's (heavyball's)


def build_lion(model: nn.Module, arguments: dict[str, Any], *, loss: str | None) -> torch.optim.Optimizer:
    return Lion(trainable(model), **adam_arguments(arguments))
