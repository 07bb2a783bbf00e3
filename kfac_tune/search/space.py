"""The search space: each optimizer's default (its catalog entry's), merged with the YAML's ``search.space`` overrides.

The space is declarative and conditional (define-by-run): an entry may carry ``when: {mode: fixed}`` and is then
sampled only in trials where ``mode`` was drawn as ``fixed``. Optuna's multivariate TPE models such spaces when it
groups parameters by the sets that occur together (``TPESampler(group=True)``, the default here): each group
(fixed-mode trials, automatic-mode trials) gets its own joint model.

K-FAC's default space has two modes:

* ``fixed``: lr, damping, momentum and kl_clip are sampled (a fixed step size, trust region by KL-clipping);
* ``automatic``: Levenberg–Marquardt damping adaptation plus the quadratic model's lr and momentum
  (Martens & Grosse §6.4-6.6; the constructor's ``adaptive_damping/adaptive_lr/adaptive_momentum``): only the
  initial damping λ₀ is sampled, lr and momentum are chosen by the optimizer every step.

Both modes share the statistics knobs (factor_decay, inv_update_freq) and the cost knobs (cov_update_freq,
stat_fraction), which decide K-FAC's wall-clock. lr and damping are coupled (the step is roughly lr / damping along
low-curvature directions), so they are sampled jointly by the multivariate sampler.

``batch_size`` is a training setting every optimizer can search (``search.space.batch_size: [128, 256, 512]``);
it is not in the default spaces because under a step budget a larger batch buys more data for free and would
always win: search it with ``training.budget.seconds``.

The published default point (K-FAC's constructor defaults, the config's batch size) is enqueued as the study's
first trial (``search.enqueue_defaults``), so a search never ends worse than the untuned optimizer.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from kfac_tune import catalog
from kfac_tune.catalog import MODE
from kfac_tune.config import Config, ParamSpec

TRAINING_PARAMETERS = ("batch_size",)  # sampled entries that set the training run, not the optimizer


def default_space(entry: catalog.OptimizerSpec) -> dict[str, ParamSpec]:
    """The optimizer's default space (its catalog entry's), validated as the YAML's ``search.space`` would be."""
    return {name: ParamSpec.model_validate(value) for name, value in entry.space.items()}


def searchable_names(entry: catalog.OptimizerSpec) -> tuple[str, ...]:
    """What ``search.space`` may name: the optimizer's hyperparameters, its default space's entries (K-FAC's
    ``mode``, ``stat_fraction``) and the training parameters."""
    return tuple(dict.fromkeys([*entry.hyperparameters, *entry.space, *TRAINING_PARAMETERS]))


def build_space(cfg: Config) -> dict[str, ParamSpec]:
    """The optimizer's default space with the YAML overrides applied.

    An override replaces the entry's range, choices or value; it keeps the default's ``when`` condition unless it
    gives its own (``when: {}`` samples it in every mode); ``null`` removes the entry. Raises ``ConfigError`` at
    ``search.space.<name>`` for a name the optimizer does not take, and at ``search.space.<name>.when`` for a
    condition on no entry.
    """
    optimizer = cfg.optimizer.name
    entry = catalog.optimizer(optimizer)
    names, defaults = searchable_names(entry), default_space(entry)
    for name in cfg.search.space:
        if name not in names:
            raise cfg.problem(f"search.space.{name}",
                              f"expected a hyperparameter of {optimizer}: {', '.join(names)} "
                              "(other constructor options go under optimizer.options)", name)
    space = dict(defaults)
    for name, spec in cfg.search.space.items():
        if spec is None:  # removed: not searched, the constructor's default (or optimizer.options) applies
            space.pop(name, None)
            continue
        inherit = name in defaults and "when" not in spec.model_fields_set
        space[name] = spec.model_copy(update={"when": defaults[name].when}) if inherit else spec
    for name, spec in space.items():
        for condition in spec.when:
            if condition not in space or space[condition].when:
                raise cfg.problem(f"search.space.{name}.when",
                                  "expected conditions on unconditioned entries of the space "
                                  f"({', '.join(n for n, s in space.items() if not s.when)})", condition)
    return space


def free(space: Mapping[str, ParamSpec]) -> dict[str, ParamSpec]:
    """The entries Optuna samples (ranges and choices); fixed entries are not Optuna parameters."""
    return {name: spec for name, spec in space.items() if spec.kind != "fixed"}


_SKIP = object()


def _walk(space: Mapping[str, ParamSpec], draw: Callable[[str, ParamSpec], Any]) -> dict[str, Any]:
    """Visit the entries active for the values drawn so far, unconditioned ones first (they decide the others);
    ``draw(name, spec)`` gives a sampled entry's value, or ``_SKIP`` to leave it out."""
    point: dict[str, Any] = {}
    for name, spec in sorted(space.items(), key=lambda item: bool(item[1].when)):
        if not spec.active(point):
            continue
        value = spec.value if spec.kind == "fixed" else draw(name, spec)
        if value is not _SKIP:
            point[name] = value
    return point


def suggest(trial: Any, space: Mapping[str, ParamSpec]) -> dict[str, Any]:
    """Sample one point: ``{name: value}`` for every active entry, fixed ones included; an entry whose ``when``
    does not hold is neither sampled nor in the point.

    ``trial`` is an ``optuna.Trial`` (or ``FixedTrial``); Optuna is not imported here so the space stays testable
    without a study.
    """

    def draw(name: str, spec: ParamSpec) -> Any:
        if spec.kind == "choices":
            return trial.suggest_categorical(name, spec.choices)
        if spec.integer:
            return trial.suggest_int(name, int(spec.low), int(spec.high), log=spec.log)  # type: ignore[arg-type]
        return trial.suggest_float(name, spec.low, spec.high, log=spec.log)

    return _walk(space, draw)


def optimizer_arguments(point: Mapping[str, Any], optimizer: str) -> dict[str, Any]:
    """The optimizer's constructor arguments of a point: training parameters dropped, ``mode`` turned into the
    flags the optimizer's catalog entry sets for it (K-FAC's adaptation flags)."""
    arguments = {k: v for k, v in point.items() if k not in TRAINING_PARAMETERS and k != MODE}
    return {**arguments, **catalog.optimizer(optimizer).mode_flags(point[MODE])} if MODE in point else arguments


def with_training(cfg: Config, point: Mapping[str, Any]) -> Config:
    """``cfg`` with the point's training parameters (``batch_size``) applied: the config one trial trains with."""
    if "batch_size" not in point:
        return cfg
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"batch_size": int(point["batch_size"])})})


def published_defaults(cfg: Config) -> dict[str, Any]:
    """The untuned optimizer as a point of the space's vocabulary (its catalog entry's published defaults, K-FAC's
    from its constructor with ``optimizer.options``, and the mode they run in) with the config's batch size."""
    return {**catalog.optimizer(cfg.optimizer.name).published_defaults(cfg.optimizer.options),
            "batch_size": cfg.data.batch_size}


def point_in_space(values: Mapping[str, Any], space: Mapping[str, ParamSpec], optimizer: str) -> dict[str, Any]:
    """``values`` as a point to enqueue: the sampled entries active in its mode (K-FAC's mode read from the
    adaptation flags when ``values`` are constructor arguments), each moved into the space; entries ``values``
    has no (or a ``None``) value for are left to the sampler."""
    values = {**values, MODE: values.get(MODE) or catalog.optimizer(optimizer).mode_of(values)}

    def given(name: str, spec: ParamSpec) -> Any:
        value = values.get(name)
        return _SKIP if value is None else clip(spec, value)

    return {name: value for name, value in _walk(space, given).items() if space[name].kind != "fixed"}


def warm_starts(cfg: Config, space: Mapping[str, ParamSpec]) -> list[dict[str, Any]]:
    """The points to enqueue: the published defaults (clipped to the space) then ``search.enqueue``.

    The defaults point names the entries active in the defaults' mode; a default the space cannot express (a
    ``None`` such as kl_clip off) is left for the sampler. A warm-start point names only sampled parameters; a
    value outside a range or not among the choices is a config error, because Optuna would otherwise silently run
    it anyway.
    """
    sampled = free(space)
    points: list[dict[str, Any]] = []
    if cfg.search.enqueue_defaults:
        points.append(point_in_space(published_defaults(cfg), space, cfg.optimizer.name))
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
    return f"{'integer' if spec.integer else 'float'} in [{spec.low:g}, {spec.high:g}]{', log' if spec.log else ''}"


def describe(space: Mapping[str, ParamSpec]) -> dict[str, str]:
    """One line per hyperparameter, for the CLI and the MLflow parent run."""

    def line(spec: ParamSpec) -> str:
        text = f"fixed {spec.value!r}" if spec.kind == "fixed" else _describe_spec(spec)
        condition = ", ".join(f"{k}={v}" for k, v in spec.when.items())
        return f"{text} (when {condition})" if condition else text

    return {name: line(spec) for name, spec in space.items()}
