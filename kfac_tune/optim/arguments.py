"""What K-FAC's constructor arguments mean: which ones a store keeps, what a store written before a convention
existed meant by it, how an unset mode and ``kl_clip="auto"`` resolve, and the checks that name a bad argument.

The optimizer (:class:`~kfac_tune.optim.optimizer.KFAC`) uses these when it is built; recipes and the search use
them through ``KFAC.HYPERPARAMETERS``, ``KFAC.CONVENTIONS``, ``KFAC.LEGACY``, ``KFAC.defaults()``,
``KFAC.complete_arguments()`` and ``KFAC.stored_arguments()``, which delegate here.  Nothing in this module knows
about tensors.
"""
from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Callable, Mapping, Optional, Union

from kfac_tune.optim import fisher
from kfac_tune.optim.blocks import DAMPING_MODES

FISHER_TYPES = ("true", "empirical", "exact")

# The tunable hyperparameters; their defaults are the constructor's signature (``defaults(KFAC)``), the single
# truth that the search's default point and recipes read.
HYPERPARAMETERS = (
    "lr",
    "damping",
    "momentum",
    "factor_decay",
    "inv_update_freq",
    "cov_update_freq",
    "weight_decay",
    "kl_clip",
)


# Everything that decides what a given ``damping`` or ``lr`` means: recipes store all of it, because values do
# not transfer across conventions (damping mode, Fisher type, adaptation rules).
CONVENTIONS = (
    "loss",
    "fisher",
    "temporal",
    "damping_mode",
    "adaptive_damping",
    "adaptive_lr",
    "adaptive_momentum",
    "damping_adaptation_interval",
    "damping_adaptation_decay",
    "damping_rule",
    "min_damping",
    "max_damping",
    "stat_fraction",
    "damping_scale",
    "damping_boost",
    "max_update_ratio",
    "rejection_ratio",
)

# What the conventions added after recipe format 1 was first written meant before they existed: arguments
# stored without them (a recipe, a trial) are completed with these, not with today's defaults, so that they
# still reproduce.  ``KFAC(model, **LEGACY)`` with kl_clip=None is the optimizer before the safe defaults.
LEGACY = {
    "damping_scale": "absolute",
    "damping_boost": None,
    "max_update_ratio": None,
    "rejection_ratio": None,
    "damping_rule": "martens",
}



def defaults(constructor: Callable[..., Any]) -> dict[str, Any]:
    """Every hyperparameter and convention with its default: the constructor's signature is the only truth."""
    return {name: p.default for name, p in inspect.signature(constructor).parameters.items()
            if name in HYPERPARAMETERS + CONVENTIONS}


def complete_arguments(constructor: Callable[..., Any], arguments: Mapping[str, Any]) -> dict[str, Any]:
    """``arguments`` with every hyperparameter and convention filled in from the constructor's defaults, the
    loss-dependent ``kl_clip="auto"`` resolved for the loss they name (a store holds what ran)."""
    complete = {**defaults(constructor), **arguments}
    complete["kl_clip"] = resolve_kl_clip(complete["kl_clip"], arguments.get("loss", complete["loss"]))
    # stores describe runs with step(closure) (the tool's loop, a recipe's): unset, that is the automatic mode
    automatic = mode_is_unset(*(complete[k] for k in ("lr", "momentum", "adaptive_damping", "adaptive_lr",
                                                       "adaptive_momentum")))
    for flag in ("adaptive_damping", "adaptive_lr", "adaptive_momentum"):
        complete[flag] = automatic if complete[flag] is None else complete[flag]
    complete["lr"] = FIXED_LR if complete["lr"] is None else complete["lr"]
    complete["momentum"] = FIXED_MOMENTUM if complete["momentum"] is None else complete["momentum"]
    return complete


def stored_arguments(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments read back from a store (a recipe): complete ones written before a convention in
    :data:`LEGACY` existed get its old meaning pinned, so that they reproduce what was run."""
    arguments = dict(arguments)
    # complete_arguments writes every hyperparameter and convention; a complete store that lacks a convention
    # was written before that convention existed, and gets what it meant then
    if set(HYPERPARAMETERS) <= set(arguments):
        arguments = {**{k: v for k, v in LEGACY.items() if k not in arguments}, **arguments}
    return arguments


KL_CLIP = 1e-3  # tf-kfac's and kfac-pytorch's default bound, in nats
FIXED_LR, FIXED_MOMENTUM = 0.01, 0.9  # the fixed-lr mode's step size and momentum when not given


def mode_is_unset(lr: Optional[float], momentum: Optional[float], *flags: Optional[bool]) -> bool:
    """True when nothing chose the mode: no lr, no momentum, and every adaptation flag unset (None)."""
    return lr is None and momentum is None and all(flag is None for flag in flags)


def resolve_kl_clip(kl_clip: Union[float, str, None], loss: str) -> Optional[float]:
    """``"auto"``: KL-clipping at 1e-3 nats for the losses whose KL is unit-free (a categorical or Bernoulli output
    distribution: ``cross_entropy``, ``bce``), off for ``mse``.  The "KL" of a unit-variance Gaussian is in the
    targets' squared units, so no single bound means the same on every regression, and a Gauss-Newton step has a
    KL of half the loss: 1e-3 shrank it 4,000x on targets of scale 100 (measured, issue 24), while the bound never
    fired on the MSE workloads it was meant to guard (the digits autoencoder: identical runs with and without)."""
    if kl_clip == "auto":
        return None if loss == "mse" else KL_CLIP
    if isinstance(kl_clip, str):
        raise ValueError(f"KFAC: kl_clip={kl_clip!r}: expected a number > 0, None (off) or 'auto'")
    return kl_clip


# what each hyperparameter must be: (integer?, test, wording of the test)
_POSITIVE = (False, lambda v: v > 0, "a finite number > 0")
_FRACTION = (False, lambda v: 0 <= v < 1, "in [0, 1)")
_STEPS = (True, lambda v: v >= 1, "an integer >= 1 (a number of steps)")
_RULES = {
    "lr": _POSITIVE, "damping": _POSITIVE, "min_damping": _POSITIVE, "max_damping": _POSITIVE,
    "momentum": _FRACTION, "factor_decay": _FRACTION,
    "inv_update_freq": _STEPS, "cov_update_freq": _STEPS,
    "weight_decay": (False, lambda v: v >= 0, "a finite number >= 0"),
    "kl_clip": (False, lambda v: v > 0, "a finite number > 0 (or None: off)"),
}


def validate(h: dict[str, Any], *, min_damping: float, max_damping: float) -> dict[str, Any]:
    """Reject hyperparameters that would make K-FAC silently misbehave, each error naming its argument; return
    them as plain Python numbers (numpy scalars are accepted: a search or a config reader may hand them over)."""
    def check(name: str, value: Any) -> Any:
        integer, test, wording = _RULES[name]
        if value is None and name == "kl_clip":
            return None
        kind = numbers.Integral if integer else numbers.Real
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ValueError(f"KFAC: {name} must be {wording}, got {value!r} ({type(value).__name__})")
        value = int(value) if integer else float(value)
        if not (math.isfinite(value) and test(value)):
            raise ValueError(f"KFAC: {name} must be {wording}, got {value!r}")
        return value

    h = {name: check(name, value) for name, value in h.items()}
    min_damping, max_damping = check("min_damping", min_damping), check("max_damping", max_damping)
    if not math.isfinite(h["lr"] * h["lr"]):
        # the trust region squares lr: beyond ~1.3e154 that overflows a float (OverflowError at the first step)
        raise ValueError(f"KFAC: lr={h['lr']!r} is too large to be used (its square overflows a float); "
                         "a learning rate that large would skip every update anyway")
    if not (min_damping <= h["damping"] <= max_damping):
        raise ValueError(f"KFAC: damping {h['damping']!r} is outside [min_damping, max_damping] = "
                         f"[{min_damping}, {max_damping}]")
    return h


DAMPING_SCALES = ("relative", "absolute")


def validate_safety(damping_scale: str, boost: Optional[float], max_update_ratio: Optional[float],
                     rejection_ratio: Optional[float]) -> None:
    if damping_scale not in DAMPING_SCALES:
        raise ValueError(f"KFAC: damping_scale={damping_scale!r}: expected one of {', '.join(DAMPING_SCALES)}")
    for name, value, low in (("damping_boost", boost, 1), ("max_update_ratio", max_update_ratio, 0),
                             ("rejection_ratio", rejection_ratio, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= low):
            raise ValueError(f"KFAC: {name} must be None (off) or a finite number > {low}, got {value!r}")


def fisher_check(loss: str, fisher_type: str, damping_mode: str, stat_fraction: float, interval: int,
                 decay: float) -> None:
    fisher.check_loss(loss)
    if fisher_type not in FISHER_TYPES:
        raise ValueError(f"KFAC: fisher={fisher_type!r} is not supported: expected one of {', '.join(FISHER_TYPES)}")
    if damping_mode not in DAMPING_MODES:
        raise ValueError(f"KFAC: damping_mode={damping_mode!r}: expected one of {', '.join(DAMPING_MODES)}")
    if not (0 < stat_fraction <= 1):
        raise ValueError(f"KFAC: stat_fraction must be in (0, 1], got {stat_fraction!r}")
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"KFAC: damping_adaptation_interval must be an integer >= 1, got {interval!r}")
    if not (0 < decay < 1):
        raise ValueError(f"KFAC: damping_adaptation_decay must be in (0, 1), got {decay!r}")
