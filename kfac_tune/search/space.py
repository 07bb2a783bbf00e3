"""The search space: defaults per optimizer, merged with the YAML's ``search.space`` overrides.

Default K-FAC ranges are centred on the published defaults (lr 1e-2…1e-1, damping 1e-3, momentum 0.9, factor
EMA 0.95, inverse every 10 steps; docs/kfac-implementations.md §2, §7) and wide enough to reach the outliers
(full-batch autoencoders want damping near 10, ImageNet recipes invert every 100 steps). lr and damping are
coupled (the step is roughly lr / damping along low-curvature directions), so they must be sampled jointly: the
default sampler, Optuna 5's ``TPESampler``, is multivariate and models all parameters of a trial together.

The published default point is also enqueued as the study's first trial (``search.enqueue_defaults``), so a
search never ends worse than the untuned optimizer.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kfac_tune.config import Config, ParamSpec
from kfac_tune.catalog import hyperparameter_names


def _range(low: float, high: float, *, log: bool = False, integer: bool = False) -> ParamSpec:
    return ParamSpec.model_validate({"low": low, "high": high, "log": log, "int": integer})


DEFAULT_SPACES: dict[str, dict[str, ParamSpec]] = {
    "kfac": {
        "lr": _range(1e-4, 1.0, log=True),
        "damping": _range(1e-5, 10.0, log=True),
        "momentum": _range(0.0, 0.99),
        "factor_decay": _range(0.9, 0.999),
        "inv_update_freq": _range(1, 100, log=True, integer=True),
    },
    "adam": {
        "lr": _range(1e-5, 1e-1, log=True),
        "beta1": _range(0.5, 0.99),
        "beta2": _range(0.9, 0.9999),
        "weight_decay": _range(1e-8, 1e-2, log=True),
    },
    "sgd": {
        "lr": _range(1e-4, 1.0, log=True),
        "momentum": _range(0.0, 0.99),
    },
    # the baselines (README "Baselines"): ranges around each package's published defaults, the DEFAULT_POINTS below
    "adamw": {
        "lr": _range(1e-5, 1e-1, log=True),
        "beta1": _range(0.5, 0.99),
        "beta2": _range(0.9, 0.9999),
        "weight_decay": _range(1e-4, 1.0, log=True),
    },
    "muon": {
        "lr": _range(2e-3, 0.2, log=True),
        "momentum": _range(0.8, 0.99),
        "weight_decay": _range(1e-3, 1.0, log=True),
        "adamw_lr": _range(1e-5, 1e-2, log=True),
    },
    "soap": {
        "lr": _range(1e-4, 1e-1, log=True),
        "beta1": _range(0.5, 0.99),
        "beta2": _range(0.9, 0.999),
        "shampoo_beta": _range(0.8, 0.99),
        "weight_decay": _range(1e-4, 1.0, log=True),
        "precondition_frequency": _range(1, 32, log=True, integer=True),
    },
}

DEFAULT_POINTS: dict[str, dict[str, Any]] = {
    "kfac": {"lr": 0.01, "damping": 1e-3, "momentum": 0.9, "factor_decay": 0.95, "inv_update_freq": 10},
    "adam": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "weight_decay": 1e-8},
    "sgd": {"lr": 0.01, "momentum": 0.9},
    "adamw": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.01},  # torch.optim.AdamW's defaults
    # torch.optim.Muon's documented example (lr 0.02, momentum 0.95, its default weight decay 0.1; AdamW lr 3e-4)
    "muon": {"lr": 0.02, "momentum": 0.95, "weight_decay": 0.1, "adamw_lr": 3e-4},
    # heavyball.SOAP's defaults
    "soap": {"lr": 3e-3, "beta1": 0.9, "beta2": 0.95, "shampoo_beta": 0.95, "weight_decay": 0.01,
             "precondition_frequency": 2},
}


def build_space(cfg: Config) -> dict[str, ParamSpec]:
    """The optimizer's default space with the YAML overrides applied (an override replaces the whole entry).

    Raises ``ConfigError`` at ``search.space.<name>`` for a name the optimizer does not take.
    """
    optimizer = cfg.optimizer.name
    names = hyperparameter_names(optimizer)
    for name in cfg.search.space:
        if name not in names:
            raise cfg.problem(
                f"search.space.{name}",
                f"expected a hyperparameter of {optimizer}: {', '.join(names)} "
                "(other constructor options go under optimizer.options)",
                name,
            )
    return {**DEFAULT_SPACES[optimizer], **cfg.search.space}


def free(space: Mapping[str, ParamSpec]) -> dict[str, ParamSpec]:
    """The entries Optuna samples (ranges and choices); fixed entries are not Optuna parameters."""
    return {name: spec for name, spec in space.items() if spec.kind != "fixed"}


def suggest(trial: Any, space: Mapping[str, ParamSpec]) -> dict[str, Any]:
    """Sample one point: ``{name: value}`` for every entry, fixed ones included.

    ``trial`` is an ``optuna.Trial`` (or ``FixedTrial``); Optuna is not imported here so the space stays testable
    without a study.
    """
    point: dict[str, Any] = {}
    for name, spec in space.items():
        if spec.kind == "fixed":
            point[name] = spec.value
        elif spec.kind == "choices":
            point[name] = trial.suggest_categorical(name, spec.choices)
        elif spec.integer:
            point[name] = trial.suggest_int(name, int(spec.low), int(spec.high), log=spec.log)  # type: ignore[arg-type]
        else:
            point[name] = trial.suggest_float(name, spec.low, spec.high, log=spec.log)
    return point


def warm_starts(cfg: Config, space: Mapping[str, ParamSpec]) -> list[dict[str, Any]]:
    """The points to enqueue: the published defaults (clipped to the space) then ``search.enqueue``.

    A warm-start point names only sampled parameters; a value outside a range or not among the choices is a
    config error, because Optuna would otherwise silently run it anyway.
    """
    sampled = free(space)
    points: list[dict[str, Any]] = []
    if cfg.search.enqueue_defaults:
        default = {k: v for k, v in DEFAULT_POINTS[cfg.optimizer.name].items() if k in sampled}
        points.append({k: clip(sampled[k], v) for k, v in default.items()})
    for i, point in enumerate(cfg.search.enqueue):
        for name, value in point.items():
            path = f"search.enqueue[{i}].{name}"
            spec = sampled.get(name)
            if spec is None:
                raise cfg.problem(path, f"expected a sampled hyperparameter: {', '.join(sampled) or '(none)'}", name)
            if not _contains(spec, value):
                raise cfg.problem(path, f"expected a value inside the search space ({_describe_spec(spec)})", value)
        points.append(dict(point))
    return points


def clip(spec: ParamSpec, value: Any) -> Any:
    """``value`` moved into the space: the nearest bound of a range, the first choice if not among the choices."""
    if spec.kind == "choices":
        return value if value in spec.choices else spec.choices[0]  # type: ignore[operator,index]
    clipped = min(max(value, spec.low), spec.high)  # type: ignore[type-var]
    return int(round(clipped)) if spec.integer else clipped


def _contains(spec: ParamSpec, value: Any) -> bool:
    if spec.kind == "choices":
        return value in spec.choices  # type: ignore[operator]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return spec.low <= value <= spec.high and (not spec.integer or float(value).is_integer())  # type: ignore[operator]


def _describe_spec(spec: ParamSpec) -> str:
    if spec.kind == "choices":
        return f"one of {spec.choices}"
    scale = ", log" if spec.log else ""
    kind = "integer" if spec.integer else "float"
    return f"{kind} in [{spec.low:g}, {spec.high:g}]{scale}"


def describe(space: Mapping[str, ParamSpec]) -> dict[str, str]:
    """One line per hyperparameter, for the CLI and the MLflow parent run."""
    return {name: (f"fixed {spec.value!r}" if spec.kind == "fixed" else _describe_spec(spec)) for name, spec in space.items()}
