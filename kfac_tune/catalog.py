"""The catalog: every optimizer and loss kfac-tune knows, each optimizer in one entry that holds everything about it.

An entry says how to build the optimizer (its builder and the defaults the builder applies), what a search tunes
(its hyperparameters and default space, and the published default point enqueued first) and what a trial and a
recipe store (``complete``/``stored``). Everything that lists optimizer or loss names (the config schema, the CLI's
``--optimizer`` choices, recipes, the search space, the trainer) reads them from here, as ``zoo``'s
``ARCHITECTURES``/``DATASETS`` do for models and data: adding an optimizer is one entry here, its builder, and its
tests (docs/design.md, "Adding an optimizer").

Importing this module imports no torch: builders, K-FAC's argument completion and loss functions are
``module:attribute`` references resolved on first use, and spaces are written as the YAML's ``search.space`` would
write them. Validating a YAML therefore stays cheap, an optional package (``heavyball`` for SOAP) only matters to
the optimizer that needs it, and the modules referenced never import the catalog (the references run one way).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

MODE = "mode"  # the space entry that picks one of an optimizer's modes (K-FAC: fixed or automatic)


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer.

    ``hyperparameters`` are flat ``name: value`` pairs (``beta1``, ``beta2`` rather than a ``betas`` tuple) so that
    each is one Optuna parameter and one YAML line; ``builder`` (``module:function``) turns them into constructor
    arguments. It is called as ``builder(model, arguments, loss=...)`` with ``defaults`` under the arguments, and
    returns a ``torch.optim.Optimizer``-like object (``step(closure)``, ``zero_grad``).

    ``space`` is the default search space (entries as in the YAML's ``search.space``; a ``when`` condition names a
    mode); ``default_point`` the published defaults, or a ``module:function`` that computes them from
    ``optimizer.options``; ``modes`` maps each value of the ``mode`` entry to the constructor flags it sets.
    ``complete`` (``module:function``) makes the arguments a trial runs and stores complete, so that a recipe
    reproduces under later defaults; ``stored`` reads them back from a recipe (K-FAC: old conventions pinned).
    """

    name: str
    builder: str
    hyperparameters: tuple[str, ...]
    space: Mapping[str, Any]
    default_point: Mapping[str, Any] | str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    modes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    complete: str | None = None
    stored: str | None = None

    def build(self, model: Any, arguments: Mapping[str, Any], *, loss: str | None) -> Any:
        return resolve(self.builder)(model, {**self.defaults, **arguments}, loss=loss)

    def published_defaults(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The untuned optimizer as a point: its published defaults (K-FAC's: its constructor's, with ``options``
        applied) and, for an optimizer with modes, the mode they run in."""
        point = (resolve(self.default_point)(dict(options)) if isinstance(self.default_point, str)
                 else dict(self.default_point))
        return {**point, MODE: self.mode_of(point)} if self.modes else point

    def trial_arguments(self, arguments: Mapping[str, Any], loss: str) -> dict[str, Any]:
        """What the constructor receives and a trial stores: ``arguments``, completed where the entry says how."""
        return resolve(self.complete)({**arguments, "loss": loss}) if self.complete else dict(arguments)

    def stored_arguments(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor arguments read back from a recipe, with the meaning they were stored under."""
        return resolve(self.stored)(arguments) if self.stored else dict(arguments)

    def mode_flags(self, mode: str) -> dict[str, Any]:
        return dict(self.modes[mode])

    def mode_of(self, arguments: Mapping[str, Any]) -> str:
        """The mode a set of constructor arguments runs in: the one that agrees with them on the flags every mode
        sets (an absent flag reads false), else the first; ``""`` for an optimizer without modes."""
        if not self.modes:
            return ""
        shared = set.intersection(*(set(flags) for flags in self.modes.values()))
        for mode, flags in self.modes.items():
            if all(bool(arguments.get(flag)) == bool(flags[flag]) for flag in shared):
                return mode
        return next(iter(self.modes))


def _range(low: float, high: float, *, log: bool = False, integer: bool = False, **when: Any) -> dict[str, Any]:
    return {"low": low, "high": high, "log": log, "int": integer, "when": when}


_ADAM_FAMILY = ("lr", "beta1", "beta2", "weight_decay", "eps")
_ADAM_SPACE = {"lr": _range(1e-5, 1e-1, log=True), "beta1": _range(0.5, 0.99), "beta2": _range(0.9, 0.9999)}
_KFAC = "kfac_tune.optim.optimizer:KFAC"
_MUON_ADAMW = {"adamw_lr": 3e-4}  # the AdamW part's lr, as in torch.optim.Muon's example
_SOAP_BETAS = {"beta1": 0.9, "beta2": 0.95}  # heavyball's SOAP defaults, not Adam's

OPTIMIZERS: dict[str, OptimizerSpec] = {spec.name: spec for spec in (
    OptimizerSpec(
        "kfac", "kfac_tune.optimizers:build_kfac",
        # KFAC.HYPERPARAMETERS, written out so that reading them imports no torch (a test keeps them equal)
        ("lr", "damping", "momentum", "factor_decay", "inv_update_freq", "cov_update_freq", "weight_decay", "kl_clip"),
        # fixed: a fixed step size, trust region by KL-clipping; automatic: Levenberg-Marquardt damping plus the
        # quadratic model's lr and momentum, only the initial damping sampled (search/space.py says more)
        space={MODE: ["fixed", "automatic"],
               "lr": _range(1e-4, 1.0, log=True, mode="fixed"),
               "damping": _range(1e-5, 1e3, log=True),  # fixed: λ; automatic: λ₀, where LM adaptation starts
               "momentum": _range(0.0, 0.99, mode="fixed"),
               "kl_clip": _range(1e-5, 1.0, log=True, mode="fixed"),
               "factor_decay": _range(0.9, 0.999),
               "inv_update_freq": _range(1, 100, log=True, integer=True),
               "cov_update_freq": _range(1, 20, log=True, integer=True),
               "stat_fraction": _range(0.1, 1.0, log=True)},
        # its constructor's defaults: a change of them reaches the enqueued trial by itself
        default_point=f"{_KFAC}.complete_arguments",
        # fixed leaves adaptive_damping to the constructor default (or optimizer.options), so a damping schedule
        # the optimizer applies by default stays on
        modes={"fixed": {"adaptive_lr": False, "adaptive_momentum": False},
               "automatic": {"adaptive_damping": True, "adaptive_lr": True, "adaptive_momentum": True}},
        complete=f"{_KFAC}.complete_arguments", stored=f"{_KFAC}.stored_arguments"),
    OptimizerSpec(
        "adam", "kfac_tune.optimizers:build_adam", _ADAM_FAMILY,
        space={**_ADAM_SPACE, "weight_decay": _range(1e-8, 1e-2, log=True)},
        default_point={"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "weight_decay": 1e-8}),  # torch's, decay at the floor
    OptimizerSpec(
        "sgd", "kfac_tune.optimizers:build_sgd", ("lr", "momentum", "weight_decay", "nesterov", "dampening"),
        space={"lr": _range(1e-4, 1.0, log=True), "momentum": _range(0.0, 0.99)},
        default_point={"lr": 0.01, "momentum": 0.9}, defaults={"momentum": 0.9}),
    # the baselines (README "Baselines"): ranges around each package's published defaults
    OptimizerSpec(
        "adamw", "kfac_tune.optimizers:build_adamw", _ADAM_FAMILY,
        space={**_ADAM_SPACE, "weight_decay": _range(1e-4, 1.0, log=True)},
        default_point={"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.01}),  # torch.optim.AdamW's
    OptimizerSpec(
        "muon", "kfac_tune.muon:build_muon",
        ("lr", "momentum", "weight_decay", "nesterov", "adamw_lr", "adamw_beta1", "adamw_beta2", "adamw_weight_decay"),
        space={"lr": _range(2e-3, 0.2, log=True), "momentum": _range(0.8, 0.99),
               "weight_decay": _range(1e-3, 1.0, log=True), "adamw_lr": _range(1e-5, 1e-2, log=True)},
        # torch.optim.Muon's documented example (lr 0.02, momentum 0.95, its default weight decay 0.1; AdamW lr 3e-4)
        default_point={"lr": 0.02, "momentum": 0.95, "weight_decay": 0.1, **_MUON_ADAMW}, defaults=_MUON_ADAMW),
    OptimizerSpec(
        "soap", "kfac_tune.optimizers:build_soap",
        ("lr", "beta1", "beta2", "shampoo_beta", "weight_decay", "eps", "precondition_frequency"),
        space={"lr": _range(1e-4, 1e-1, log=True), "beta1": _range(0.5, 0.99), "beta2": _range(0.9, 0.999),
               "shampoo_beta": _range(0.8, 0.99), "weight_decay": _range(1e-4, 1.0, log=True),
               "precondition_frequency": _range(1, 32, log=True, integer=True)},
        default_point={"lr": 3e-3, **_SOAP_BETAS, "shampoo_beta": 0.95, "weight_decay": 0.01,
                       "precondition_frequency": 2},  # heavyball.SOAP's defaults
        defaults=_SOAP_BETAS),
    # Lion (kfac_tune/lion.py): lr 3-10x below AdamW's, weight decay 3-10x above (Chen et al. 2023)
    OptimizerSpec(
        "lion", "kfac_tune.optimizers:build_lion", ("lr", "beta1", "beta2", "weight_decay"),
        space={"lr": _range(1e-5, 1e-2, log=True), "beta1": _range(0.8, 0.99), "beta2": _range(0.9, 0.999),
               "weight_decay": _range(1e-4, 10.0, log=True)},
        # the paper's betas and lr; its weight decay 0 at the range's floor
        default_point={"lr": 1e-4, "beta1": 0.9, "beta2": 0.99, "weight_decay": 1e-4}, defaults={"beta2": 0.99}),
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
    """The object a ``module:attribute`` reference names (``attribute`` may be dotted: ``KFAC.stored_arguments``),
    imported now."""
    module, attributes = reference.split(":")
    found = importlib.import_module(module)
    for attribute in attributes.split("."):
        found = getattr(found, attribute)
    return found
