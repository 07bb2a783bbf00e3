"""The catalog: every optimizer and loss kfac-tune knows, each named once.

Everything that lists optimizer or loss names (the config schema, the CLI's ``--optimizer`` choices, recipes, the
search space, the trainer) reads them from here, as ``zoo``'s ``ARCHITECTURES``/``DATASETS`` do for models and
data, so adding an optimizer is one entry here, one builder in ``kfac_tune.optimizers`` and its default space.
``build_optimizer`` builds one by name: the builders never look the catalog up, so the references run one way.

Importing this module imports no torch: constructors and loss functions are ``module:attribute`` references resolved
on first use. Validating a YAML therefore stays cheap, and an optional package (``heavyball`` for SOAP) only matters
to the optimizer that needs it.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer: how to build it and which of its arguments a search may tune.

    ``hyperparameters`` are flat ``name: value`` pairs (``beta1``, ``beta2`` rather than a ``betas`` tuple) so that
    each is one Optuna parameter and one YAML line; ``builder`` (``module:function``) turns them into constructor
    arguments. It is called as ``builder(model, arguments, loss=...)`` and returns a ``torch.optim.Optimizer``-like
    object (``step(closure)``, ``zero_grad``).
    """

    name: str
    builder: str
    hyperparameters: tuple[str, ...]

    def build(self, model: Any, arguments: Mapping[str, Any], *, loss: str | None) -> Any:
        return resolve(self.builder)(model, dict(arguments), loss=loss)


_ADAM_FAMILY = ("lr", "beta1", "beta2", "weight_decay", "eps")

OPTIMIZERS: dict[str, OptimizerSpec] = {spec.name: spec for spec in (
    # K-FAC's are KFAC.HYPERPARAMETERS, written out so that reading them imports no torch (a test keeps them equal)
    OptimizerSpec("kfac", "kfac_tune.optimizers:build_kfac",
                  ("lr", "damping", "momentum", "factor_decay", "inv_update_freq", "cov_update_freq", "weight_decay",
                   "kl_clip")),
    OptimizerSpec("adam", "kfac_tune.optimizers:build_adam", _ADAM_FAMILY),
    OptimizerSpec("sgd", "kfac_tune.optimizers:build_sgd", ("lr", "momentum", "weight_decay", "nesterov", "dampening")),
    OptimizerSpec("adamw", "kfac_tune.optimizers:build_adamw", _ADAM_FAMILY),
    OptimizerSpec("muon", "kfac_tune.muon:build_muon",
                  ("lr", "momentum", "weight_decay", "nesterov", "adamw_lr", "adamw_beta1", "adamw_beta2",
                   "adamw_weight_decay")),
    OptimizerSpec("soap", "kfac_tune.optimizers:build_soap",
                  ("lr", "beta1", "beta2", "shampoo_beta", "weight_decay", "eps", "precondition_frequency")),
)}
OPTIMIZER_NAMES: tuple[str, ...] = tuple(OPTIMIZERS)

# name -> the torch functional it is; K-FAC's Fisher (kfac_tune.optim.fisher) supports exactly these
LOSSES: dict[str, str] = {"cross_entropy": "torch.nn.functional:cross_entropy",
                          "mse": "torch.nn.functional:mse_loss",
                          "bce": "torch.nn.functional:binary_cross_entropy_with_logits"}
LOSS_NAMES: tuple[str, ...] = tuple(LOSSES)
# the losses that fit each task; the first is the task's default
TASK_LOSSES: dict[str, tuple[str, ...]] = {
    "classification": ("cross_entropy",), "reconstruction": ("mse", "bce"), "regression": ("mse", "bce"),
    "sequence": ("cross_entropy",)}


def optimizer(name: str) -> OptimizerSpec:
    """The spec of optimizer ``name``; ``ValueError`` naming the known ones otherwise."""
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZER_NAMES)}") from None


def build_optimizer(name: str, model: Any, hparams: Mapping[str, Any], *, loss: str) -> Any:
    """Optimizer ``name`` over ``model``'s trainable parameters (imports its builder, and torch, now).

    ``loss`` is the functional the training loop minimises; only K-FAC uses it (its curvature is the Fisher of that
    loss), the first-order optimizers ignore it. Unknown or bad hyperparameters raise ``TypeError``/``ValueError``
    from the constructor, which the preflight turns into a config error.
    """
    return optimizer(name).build(model, hparams, loss=loss)


def hyperparameter_names(name: str) -> tuple[str, ...]:
    """The hyperparameters the search may tune for optimizer ``name`` (other options are fixed)."""
    return optimizer(name).hyperparameters


def loss_function(name: str) -> Callable[..., Any]:
    """The torch functional of loss ``name`` (imports torch)."""
    return resolve(LOSSES[name])


def resolve(reference: str) -> Any:
    """The object a ``module:attribute`` reference names, imported now."""
    module, attribute = reference.split(":")
    return getattr(importlib.import_module(module), attribute)
