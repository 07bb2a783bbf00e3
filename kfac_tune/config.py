"""The model-YAML schema and the one-paragraph errors a bad file gets.

A study runs for hours, so a typo must stop it before any training: every section is a pydantic v2 model with
``extra="forbid"`` and strict types, every field has a default (a ten-line YAML works), and every failure becomes a
``ConfigError`` naming the file, the line, the field path (``search.space.lr.low``), what was expected and what
was found. The CLI prints that message and exits with code 2, never a traceback.

Two things here are deliberate departures from the obvious:

* YAML is read by a ``yaml.SafeLoader`` subclass that also reads ``1e-4`` as a float (YAML 1.2 does; PyYAML's
  YAML 1.1 resolver reads it as a string, and a learning-rate range written ``low: 1e-4`` would be rejected). It
  constructs plain scalars, lists and mappings only, exactly as ``yaml.safe_load``.
* ``module:callable`` references (``model.callable``, ``data.callable``) are imported while validating. That import
  is the one place user code runs; it runs so that a missing module is reported before the study starts.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import json
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from kfac_tune.catalog import LOSSES, OPTIMIZERS
from kfac_tune.stores import DEFAULT_STORAGE, DEFAULT_TRACKING_URI

MAX_TRIALS = 1_000_000
MAX_STEPS = 10**9
MAX_NODES = 100_000  # scalars, lists and mappings after alias expansion; a real config has a few hundred
MAX_BOUND = 1e15  # a search-space bound beyond this is a typo, not a hyperparameter
CALLABLE_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
STORED = "stored"  # validation context key: the config comes from a storage, so its callables are not imported
TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql")


class ConfigError(ValueError):
    """A model YAML that cannot be used; ``str(error)`` is the whole user-facing paragraph."""


# --------------------------------------------------------------------------------------------------- sections
class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=False)


class _Named(_Section):
    """A section that may also be written as its name alone (``optimizer: adam``, ``pruner: none``)."""

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data


def import_callable(reference: str) -> Any:
    """Import ``package.module:function``; every failure becomes a ValueError saying what went wrong."""
    if not CALLABLE_PATTERN.match(reference):
        raise ValueError("expected 'package.module:function' (a module path, a colon, a function name)")
    module_name, attribute = reference.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # user code: anything may be raised while importing it
        raise ValueError(f"expected an importable module, but importing {module_name!r} failed "
                         f"({type(error).__name__}: {error})") from None
    target = getattr(module, attribute, None)
    if target is None:
        raise ValueError(f"expected module {module_name!r} to define {attribute!r}, it does not")
    if not callable(target):
        raise ValueError(f"expected {reference!r} to be callable, it is a {type(target).__name__}")
    return target


def check_tracking_uri(uri: str) -> None:
    """Raise ``ValueError`` unless ``uri`` is an MLflow store kfac-tune supports (see ``TRACKING_SCHEMES``)."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    if scheme not in TRACKING_SCHEMES or (scheme == "sqlite" and not uri.startswith("sqlite:///")):
        raise ValueError("expected an MLflow tracking URI: sqlite:///PATH (a local store), http(s)://HOST:PORT (a "
                         "server, e.g. `kfac-tune ui`) or a database URL such as postgresql://USER@HOST/DB; plain "
                         "paths and file:// stores are not supported")


def _known(kind: str, registry: Callable[[], Mapping[str, Any]]) -> AfterValidator:
    """A name in ``registry()`` (called when validating: the zoo imports torch), else a 'did you mean' error."""

    def check(name: str) -> str:
        known = registry()
        if name not in known:
            hint = difflib.get_close_matches(name, list(known), n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ValueError(f"expected a {kind}, one of {', '.join(sorted(known))}{suggestion}")
        return name

    return AfterValidator(check)


def _zoo(registry: str) -> Any:
    return getattr(importlib.import_module("kfac_tune.zoo"), registry)


def _scalar(value: Any) -> Any:
    if not isinstance(value, (bool, int, float, str)):
        raise ValueError("expected a number, a string or true/false")
    return value


class _Callable(_Section):
    """A section with a ``callable: pkg.module:fn`` of the user's, imported while validating."""

    callable: str | None = None

    @field_validator("callable")
    @classmethod
    def _importable(cls, reference: str | None, info: ValidationInfo) -> str | None:
        if reference is None:
            return None
        if (info.context or {}).get(STORED):  # data read back from a storage: checked, never imported
            if not CALLABLE_PATTERN.match(reference):
                raise ValueError("expected 'package.module:function' (a module path, a colon, a function name)")
        else:
            import_callable(reference)
        return reference


class _Buildable(_Named, _Callable):
    """What model and data share: a built-in ``name`` with ``kwargs``, or a ``callable`` of the user's."""

    kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source(self) -> _Buildable:
        if self.callable is not None and "name" in self.model_fields_set:
            raise ValueError("expected either name (a built-in) or callable (your own code), not both")
        return self


class ModelConfig(_Buildable):
    """A built-in architecture (``name`` + ``kwargs``) or ``callable: pkg.module:fn`` returning an ``nn.Module``.

    A callable is called as ``fn(input_shape=..., num_classes=..., **kwargs)``; ``task`` says whether its output
    is class logits (the default), a reconstruction of the (flattened) input, or a regression of the data's
    real-valued targets (``mse``, or ``bce`` for targets in [0, 1]; ``num_classes`` is then 0). Built-ins know
    their task.
    """

    name: Annotated[str, _known("built-in architecture", lambda: _zoo("ARCHITECTURES"))] = "mlp"
    task: Literal["classification", "reconstruction", "regression"] | None = None

    @property
    def architecture(self) -> str:
        """The name recipes are filed under: the built-in's name or the callable's function name."""
        return self.callable.split(":")[1] if self.callable else self.name


class AugmentConfig(_Callable):
    """Per-example augmentation of the training split only (validation and test examples are left as they are).

    ``random_crop: P`` pads each image by P zero pixels and crops it back to its size at a random offset;
    ``horizontal_flip: true`` mirrors half the images; ``callable: pkg.module:fn`` is the user's own transform, a
    function (or a transform object such as a ``torchvision.transforms.v2.Compose``) from one example tensor to a
    tensor of the same shape, applied after the built-ins. Checked on a real example at preflight.
    """

    random_crop: int | None = Field(None, ge=1, le=4096)
    horizontal_flip: bool = False


class DataConfig(_Buildable):
    """A built-in dataset or ``callable: pkg.module:fn`` returning a ``DataBundle``, ``(train_x, train_y, test_x,
    test_y)`` tensors or ``(train, test)`` Datasets (with a validation split in the middle, optionally). The
    callable is given the settings below that its signature names (see :mod:`kfac_tune.userdata`)."""

    name: Annotated[str, _known("built-in dataset", lambda: _zoo("DATASETS"))] = "digits"
    root: str | None = None
    train_size: int | None = Field(None, ge=1, le=10**8)
    test_size: int | None = Field(None, ge=1, le=10**8)
    test_from_train: bool = False
    # share of the training examples held out (seeded by training.seed) as the validation split the search selects
    # on; 0 selects on the test split (the old protocol). A data callable that returns a validation set wins.
    validation: float = Field(0.1, ge=0, lt=1)
    batch_size: int = Field(128, ge=1, le=10**7)
    eval_batch_size: int = Field(4096, ge=1, le=10**7)
    download: bool = False
    # DataLoader worker processes for Dataset data (a data callable's Datasets, or augmented data); 0 loads in the
    # training process. In-memory tensors without augmentation are sliced on the device and ignore it.
    workers: int = Field(0, ge=0, le=256)
    augment: AugmentConfig | None = None


class BudgetConfig(_Section):
    """A wall-clock budget: every trial trains for the same ``seconds`` of training time (evaluation excluded)."""

    seconds: float = Field(gt=0, le=10**7)


METRICS = ("eval_loss", "eval_accuracy", "train_loss")
TIME_OBJECTIVE = "train_seconds"


class TrainingConfig(_Section):
    """The budget of one trial and what it is judged on."""

    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    epochs: float | None = Field(None, gt=0, le=10**6)
    # training seconds per run; steps/epochs, when also given, cap the steps
    budget: BudgetConfig | None = None
    eval_every: int = Field(50, ge=1, le=MAX_STEPS)
    # evaluate every this many seconds of training time instead of every eval_every steps: under a seconds budget
    # every optimizer is then evaluated, pruned and timed to a target on the same clock, whatever its step cost
    eval_seconds: float | None = Field(None, gt=0, le=10**7)
    metric: Literal["eval_loss", "eval_accuracy", "train_loss"] = "eval_loss"
    direction: Literal["minimize", "maximize"] | None = None
    seed: int = Field(0, ge=0, le=2**32 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, le=4096)  # torch CPU threads; 1 is fastest for small nets on busy CPUs
    # data-parallel processes per trial (one per GPU, or CPU processes with gloo); each takes an equal slice of
    # every batch, so data.batch_size must be a multiple of it
    processes: int = Field(1, ge=1, le=1024)
    loss: Annotated[str, _known("loss", lambda: LOSSES)] | None = None
    # a loss this many times the first step's loss counts as diverged (null: only NaN/inf do)
    divergence_factor: float | None = Field(1000.0, gt=1, le=1e30)

    @model_validator(mode="after")
    def _no_conflicts(self) -> TrainingConfig:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("expected a budget in steps or in epochs, not both")
        if self.eval_seconds is not None and "eval_every" in self.model_fields_set:
            raise ValueError("expected eval_every (steps) or eval_seconds (training seconds), not both")
        return self

    @property
    def goal(self) -> Literal["minimize", "maximize"]:
        """Accuracy is maximised, losses minimised, unless the YAML says otherwise."""
        return self.direction or ("maximize" if self.metric == "eval_accuracy" else "minimize")


class OptimizerConfig(_Named):
    """The optimizer whose hyperparameters are searched, plus options passed to it unchanged."""

    name: Annotated[str, _known("optimizer", lambda: OPTIMIZERS)] = "kfac"
    options: dict[str, Any] = Field(default_factory=dict)


class ParamSpec(_Section):
    """One hyperparameter: a range (``low``/``high``, ``log``, ``int``), ``choices``, or a fixed ``value``.

    In YAML a bare scalar pins the value (``momentum: 0.9``) and a bare list gives the choices.
    Fields are declared in validation order: ``low`` is checked knowing ``log``, ``high`` knowing ``low``.
    """

    log: bool = False
    integer: bool = Field(False, alias="int")
    low: float | None = Field(None, ge=-MAX_BOUND, le=MAX_BOUND)
    high: float | None = Field(None, ge=-MAX_BOUND, le=MAX_BOUND)
    choices: list[Any] | None = Field(None, min_length=1)
    value: Any = None
    # sampled only when every named entry of the space has (one of) the given value(s): ``when: {mode: fixed}``
    when: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, list):
            return {"choices": data}
        return data if isinstance(data, dict) else {"value": data}

    @field_validator("choices")
    @classmethod
    def _scalar_choices(cls, choices: list[Any] | None) -> list[Any] | None:
        return None if choices is None else [_scalar(c) for c in choices]

    @field_validator("value")
    @classmethod
    def _scalar_value(cls, value: Any) -> Any:
        return None if value is None else _scalar(value)

    @field_validator("when")
    @classmethod
    def _scalar_conditions(cls, when: dict[str, Any]) -> dict[str, Any]:
        return {name: [_scalar(v) for v in wanted] if isinstance(wanted, list) else _scalar(wanted)
                for name, wanted in when.items()}

    def active(self, point: Mapping[str, Any]) -> bool:
        """Whether this entry is sampled given the values drawn so far (its ``when`` conditions hold)."""
        return all(point.get(name) in (wanted if isinstance(wanted, list) else [wanted])
                   for name, wanted in self.when.items())

    @field_validator("low")
    @classmethod
    def _positive_on_log_scale(cls, low: float | None, info: Any) -> float | None:
        if low is not None and info.data.get("log") and low <= 0:
            raise ValueError("expected low > 0 because log: true (a log scale never reaches 0)")
        return low

    @field_validator("high")
    @classmethod
    def _ordered(cls, high: float | None, info: Any) -> float | None:
        low = info.data.get("low")
        if high is not None and low is not None and high < low:
            raise ValueError(f"expected high >= low ({low:g})")
        return high

    @model_validator(mode="after")
    def _one_kind(self) -> ParamSpec:
        given = [k for k in ("low", "high", "choices", "value") if getattr(self, k) is not None]
        ranged = {"low", "high"} & set(given)
        if len(ranged) == 1:
            raise ValueError(f"expected both low and high for a range (only {given[0]} is given)")
        if len(given) - len(ranged) + bool(ranged) != 1:
            raise ValueError("expected exactly one of: low/high (a range), choices, or a fixed value")
        if (self.log or self.integer) and not ranged:
            raise ValueError("expected log/int only together with low and high")
        if self.integer and not (float(self.low).is_integer() and float(self.high).is_integer()):  # type: ignore[arg-type]
            raise ValueError("expected whole-number low and high because int: true")
        return self

    @property
    def kind(self) -> Literal["range", "choices", "fixed"]:
        return "range" if self.low is not None else "choices" if self.choices is not None else "fixed"


class SamplerConfig(_Named):
    name: Literal["tpe", "random", "gp", "qmc", "cmaes"] = "tpe"
    seed: int = Field(0, ge=0, le=2**31 - 1)
    args: dict[str, Any] = Field(default_factory=dict)


class PrunerConfig(_Named):
    name: Literal["median", "hyperband", "none"] = "median"
    args: dict[str, Any] = Field(default_factory=dict)


class RaceConfig(_Section):
    """Seed-robust selection: before the recipe is written, the study's ``top`` best trials are trained again on
    more seeds (``seeds`` in all, the trial's own run counting as the first), a candidate clearly worse than the
    leader dropped after each seed, and the best mean chosen (:mod:`kfac_tune.search.race`). ``seeds: 1`` is off."""

    top: int = Field(3, ge=1, le=100)
    seeds: int = Field(3, ge=1, le=100)

    @property
    def runs(self) -> int:
        """The most training runs the race can cost: every candidate on every extra seed."""
        return self.top * (self.seeds - 1)


class SearchConfig(_Section):
    """The study: budget, sampler, pruner, space overrides, warm starts, crash recovery and the final race."""

    trials: int = Field(20, ge=1, le=MAX_TRIALS)
    timeout: float | None = Field(None, gt=0, le=10**8)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    pruner: PrunerConfig = Field(default_factory=PrunerConfig)
    # overrides of the default space; null removes an entry (the constructor default or optimizer.options apply)
    space: dict[str, ParamSpec | None] = Field(default_factory=dict)
    # what the study optimises: null = training.metric alone; [eval_loss, train_seconds] = a Pareto search over
    # the metric and the training seconds a run uses (Optuna directions; pruning is off for several objectives)
    objectives: list[Literal["eval_loss", "eval_accuracy", "train_loss", "train_seconds"]] | None = Field(
        None, min_length=1, max_length=2)
    # the value of the metric's validation curve a trial reports (and is pruned on): final (at the end of the
    # budget), best (best reached; the recipe stops where it was reached) or auc (its mean over the budget)
    objective: Literal["final", "best", "auc"] = "final"
    enqueue: list[dict[str, Any]] = Field(default_factory=list)
    enqueue_defaults: bool = True
    # true: first try the closest recipe found (recipes/, --recipes-dir); a path: that recipe
    warm_start: bool | str = False
    heartbeat_interval: int = Field(60, ge=1, le=86400)
    grace_period: int | None = Field(None, ge=2, le=10 * 86400)
    max_retry: int = Field(2, ge=0, le=100)
    race: RaceConfig = Field(default_factory=RaceConfig)

    @field_validator("enqueue")
    @classmethod
    def _scalar_points(cls, points: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{name: _scalar(v) for name, v in point.items()} for point in points]

    @field_validator("objectives")
    @classmethod
    def _one_metric_and_time(cls, objectives: list[str] | None) -> list[str] | None:
        if objectives is None:
            return None
        metrics = [name for name in objectives if name != TIME_OBJECTIVE]
        if len(metrics) != 1 or len(set(objectives)) != len(objectives):
            raise ValueError(f"expected one metric ({', '.join(METRICS)}), optionally followed by {TIME_OBJECTIVE}")
        return objectives

    @model_validator(mode="after")
    def _grace_after_heartbeat(self) -> SearchConfig:
        if self.grace_period is not None and self.grace_period <= self.heartbeat_interval:
            raise ValueError("expected grace_period > heartbeat_interval (else live trials are failed as stale)")
        return self


class TrackingConfig(_Section):
    enabled: bool = True
    uri: str = DEFAULT_TRACKING_URI
    experiment: str | None = None
    # "best": each trial that leads the study when it completes (the best value, or off every earlier trial's
    # Pareto front) logs its trained network to its run, so the trial that `export` picks always has its model
    log_model: Literal["none", "best"] = "none"

    @field_validator("uri")
    @classmethod
    def _known_store(cls, uri: str) -> str:
        """Only stores the CLI can create, serve and check: a plain path or ``file://`` would make MLflow's
        deprecated file store, an unknown scheme a plugin lookup failing deep inside MLflow."""
        check_tracking_uri(uri)
        return uri


class Config(_Section):
    """A whole model YAML. ``source`` is the file it came from (``None`` when built in code)."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    storage: str = DEFAULT_STORAGE

    _source: str | None = PrivateAttr(default=None)
    _lines: dict[str, int] = PrivateAttr(default_factory=dict)
    _stored: bool = PrivateAttr(default=False)  # read back from a storage (``stored_config``): not the user's file

    @model_validator(mode="after")
    def _metric_from_objectives(self) -> Config:
        """``search.objectives`` names the metric; ``training.metric`` follows it unless the file sets it."""
        if self.search.objectives is not None and "metric" not in self.training.model_fields_set:
            metric = next(n for n in self.search.objectives if n != TIME_OBJECTIVE)
            self.training.metric = metric  # type: ignore[assignment]
        return self

    def check_objectives(self) -> None:
        """What one section cannot check alone: the objectives and the model logging against the training section
        (a ConfigError naming ``search.objectives`` or ``tracking.log_model``)."""
        if self.tracking.log_model == "best" and self.training.processes > 1:
            raise self.problem("tracking.log_model", "expected none with training.processes > 1 (the trained "
                               "network lives in the rank processes)", self.tracking.log_model)
        objectives = self.search.objectives
        if objectives is None:
            return
        if self.training.metric not in objectives:
            raise self.problem("search.objectives", f"expected a list naming training.metric "
                               f"({self.training.metric}), the metric every trial reports", objectives)
        if TIME_OBJECTIVE in objectives and self.training.budget is not None:
            raise self.problem("search.objectives", f"expected a steps or epochs budget with the {TIME_OBJECTIVE} "
                               "objective (under training.budget.seconds every trial trains for the same seconds, "
                               "so that objective would be a constant)", objectives)

    @property
    def objectives(self) -> list[str]:
        """What the study optimises, in order: ``search.objectives`` or ``[training.metric]``."""
        return list(self.search.objectives or [self.training.metric])

    @property
    def directions(self) -> list[str]:
        """Optuna's direction of each objective: the metric's goal; seconds are minimised."""
        return ["minimize" if name == TIME_OBJECTIVE else self.training.goal for name in self.objectives]

    @property
    def source(self) -> str | None:
        return self._source

    @property
    def stored(self) -> bool:
        return self._stored

    def stored_code(self) -> list[str]:
        """``section.callable`` of each user callable a stored config names (empty for the user's own config):
        running them means importing code that whoever can write to the storage chose."""
        if not self._stored:
            return []
        return [f"{name}.callable {ref!r}" for name, ref in (("model", self.model.callable),
                                                              ("data", self.data.callable)) if ref]

    @property
    def stem(self) -> str:
        """The default study and experiment name: the YAML file's stem, else the architecture."""
        return Path(self._source).stem if self._source else self.model.architecture

    def problem(self, path: str, expected: str, found: Any) -> ConfigError:
        """A ConfigError about ``path`` in this config, for checks made after loading (space, preflight)."""
        return _error(self._source, path, expected, found, self._lines)

    def fingerprint(self) -> str:
        """Hash of what defines the objective (model, data, training, optimizer, space): two configs with the
        same hash may share a study; budgets, tracking, storage and how many processes train a trial do not count
        (data-parallel training is the same computation on the same batches)."""
        keys = {"model", "data", "training", "optimizer"}
        # fields added later count only when they change the objective from what it was before them, so older
        # studies and recipes keep their hash under the settings they were made with
        unchanged = {"processes", *(("budget",) if self.training.budget is None else ()),
                     *(("eval_seconds",) if self.training.eval_seconds is None else ())}
        data = {"workers", *(("validation",) if self.data.validation == 0 else ()),
                *(("augment",) if self.data.augment is None else ())}
        excluded: dict[str, Any] = {"training": unchanged, "data": data}
        payload = self.model_dump(mode="json", include=keys, exclude=excluded)
        payload["space"] = self.search.model_dump(mode="json", include={"space"}, by_alias=True)["space"]
        if self.search.objectives is not None:  # only when set, so single-objective studies keep their hash
            payload["objectives"] = self.search.objectives
        if self.search.objective != "final":  # likewise: studies from before the field keep their hash
            payload["objective"] = self.search.objective
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ loading
class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads YAML 1.2 floats without a dot (``1e-4``, ``3E5``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    """One value as the YAML file would read it (``1e-4`` a float, ``true`` a bool, ``[32, 32]`` a list); a
    ValueError for text that is not YAML."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as error:
        raise ValueError(f"{text!r} is not YAML ({str(error).splitlines()[0]})") from None


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read and validate a model YAML; ``overrides`` maps dotted paths (``search.trials``) to values and is
    applied before validation, so a bad override is reported like a bad file entry."""
    path = Path(path)
    source = str(path)
    raw, lines = read_yaml(path)
    if raw is None:
        raise ConfigError(f"{source}: the file is empty; expected a mapping with sections such as model, data, "
                          "training, search (see examples/digits_mlp.yaml).")
    config_dir = str(path.resolve().parent)
    if config_dir not in sys.path:  # lets model.callable name a module that sits next to the YAML
        sys.path.append(config_dir)
    config = _validate(raw, overrides, source, lines)
    config._source, config._lines = source, lines
    config.check_objectives()
    return config


def parse_config(data: Any, overrides: Mapping[str, Any] | None = None, where: str = "<config>") -> Config:
    """A config given as data (the Python API's dict) with dotted ``overrides``, validated like a file."""
    copy = json.loads(json.dumps(data)) if isinstance(data, dict) else data  # overrides must not edit the caller's
    config = _validate(copy, overrides, where, {})
    config.check_objectives()
    return config


def _validate(raw: Any, overrides: Mapping[str, Any] | None, where: str, lines: Mapping[str, int]) -> Config:
    """``raw`` (a file's or the caller's mapping) with its dotted ``overrides`` applied, as a Config."""
    if not isinstance(raw, dict):
        raise _error(where, "(top level)", "a mapping of sections (model, data, training, ...)", raw, lines)
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise _pydantic_problem(where, error, lines) from None


def stored_config(data: Any, where: str) -> Config:
    """A config read back from a storage (a study's ``config`` attribute): validated as data, its callables
    checked for form but never imported, since whoever can write to a shared study could name any module."""
    if isinstance(data, dict):  # a stored dump holds the default ``name`` beside a callable: not the user's choice
        data = {**data, **{section: {k: v for k, v in data[section].items() if k != "name"}
                           for section in ("model", "data")
                           if isinstance(data.get(section), dict) and data[section].get("callable")}}
    try:
        config = Config.model_validate(data, context={STORED: True})
    except ValidationError as error:
        raise _pydantic_problem(where, error, {}) from None
    config._stored = True
    return config


def read_yaml(path: str | Path) -> tuple[Any, dict[str, int]]:
    """The document in the YAML file ``path`` and its field -> line map, read safely.

    Refuses (``ConfigError``, one paragraph naming the file) what cannot be a config or recipe: a special file or
    one over ``files.MAX_YAML_BYTES``, binary content, a syntax error, a key given twice in one mapping (YAML
    would silently keep the second ``training:`` section), an alias bomb.
    """
    from kfac_tune.files import FileError, read_text

    source = str(path)
    try:
        text = read_text(path)
    except FileError as error:
        raise ConfigError(f"{error}.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{source}: cannot read the file ({type(error).__name__}: {error}).") from None
    try:
        node = yaml.compose(text, Loader=_Loader)
        nodes = _expanded_size(node, {})
        if nodes > MAX_NODES:
            raise ConfigError(f"{source}: expected a config of at most {MAX_NODES:,} values once YAML aliases are "
                              f"expanded; found {nodes:,} (an alias bomb?).")
        _check_unique_keys(source, node, set())
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as error:
        raise ConfigError(_yaml_problem(source, error)) from None
    except (ValueError, OverflowError, RecursionError) as error:  # e.g. a timestamp PyYAML cannot represent
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"{source}: the YAML could not be read ({type(error).__name__}: {error}).") from None
    return raw, _line_map(node)


def _check_unique_keys(source: str, node: yaml.Node | None, seen: set[int]) -> None:
    """Refuse a mapping that names a key twice, with both lines (merge keys ``<<`` excepted)."""
    if node is None or id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[Any, int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                line = key.start_mark.line + 1
                if key.value in first:
                    raise ConfigError(f"{source} line {line}: key {key.value!r} is given twice (first on line "
                                      f"{first[key.value]}); expected each key once (YAML would silently keep only "
                                      f"the second).")
                first[key.value] = line
            _check_unique_keys(source, value, seen)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_unique_keys(source, item, seen)


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for key in parents:
        child = node.get(key)
        if isinstance(child, str):  # ``optimizer: adam`` shorthand, about to get a sibling key
            child = {"name": child}
        node[key] = child if isinstance(child, dict) else {}
        node = node[key]
    node[leaf] = value


def _expanded_size(node: yaml.Node | None, memo: dict[int, int]) -> int:
    """How many nodes the document holds once every alias is expanded, counted without expanding them.

    ``&a [*b, *b, ...]`` chains (the "billion laughs") compose into a small graph that every later walk (the line
    map, validation, hashing) would expand exponentially; refusing them here keeps a malicious or broken file
    from hanging the CLI.
    """
    if node is None:
        return 0
    key = id(node)
    if key not in memo:
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        memo[key] = 1 + sum(_expanded_size(child, memo) for child in children)
    return memo[key]


def _line_map(node: yaml.Node | None, prefix: str = "") -> dict[str, int]:
    """Dotted field path -> 1-based line, so errors can point into the file."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = f"{prefix}.{key.value}" if prefix else str(key.value)
            lines[path] = key.start_mark.line + 1
            lines.update(_line_map(value, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = f"{prefix}[{i}]"
            lines[path] = item.start_mark.line + 1
            lines.update(_line_map(item, path))
    return lines


def _yaml_problem(source: str, error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context = getattr(error, "context", None)
    detail = f"{problem} ({context})" if context else problem
    return f"{source}{where}: expected valid YAML, found a syntax error: {detail}."


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        keys = ", ".join(str(k) for k in list(value)[:6])
        return f"a mapping with keys {keys}" if value else "an empty mapping"
    if isinstance(value, list):
        return f"a list of {len(value)} item{'s' * (len(value) != 1)}"
    if value is None:
        return "nothing (null)"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _error(source: str | None, path: str, expected: str, found: Any, lines: Mapping[str, int]) -> ConfigError:
    line = lines.get(path)
    where = f"{source or '<config>'}{f' line {line}' if line else ''}"
    found_text = found if isinstance(found, Phrase) else _describe(found)
    return ConfigError(f"{where}: {path}: {expected}; found {found_text}.")


class Phrase(str):
    """An already-phrased 'found' clause (not to be repr'd)."""


_EXPECTED = {"int_type": "an integer", "int_parsing": "an integer", "int_from_float": "a whole number",
             "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
             "bool_type": "true or false", "string_type": "a string", "dict_type": "a mapping",
             "model_type": "a mapping", "model_attributes_type": "a mapping", "list_type": "a list",
             "missing": "a value (the field is required)", "too_short": "a non-empty list"}
_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _pydantic_problem(source: str, error: ValidationError, lines: Mapping[str, int]) -> ConfigError:
    """The first (most specific) pydantic error as one paragraph; others follow in a count."""
    errors = error.errors()
    first = errors[0]
    loc = list(first["loc"])
    path = _dotted(loc) or "(top level)"
    kind, ctx = first["type"], first.get("ctx") or {}
    if kind == "extra_forbidden":
        valid = _valid_keys(loc[:-1])
        hint = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        expected = f"one of the keys {', '.join(valid)}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
        found_clause: Any = Phrase(f"unknown key {str(loc[-1])!r}")
    else:
        expected = _expected(kind, first["msg"], ctx)
        found_clause = first.get("input")
        if kind == "missing":
            found_clause = Phrase("nothing")
    problem = _error(source, path, f"expected {expected}", found_clause, lines)
    more = len(errors) - 1
    if more:
        return ConfigError(f"{problem} ({more} more problem{'s' * (more > 1)} in the file after fixing this one.)")
    return problem


def _expected(kind: str, message: str, ctx: Mapping[str, Any]) -> str:
    if kind == "value_error":
        text = message.removeprefix("Value error, ")
        return text.removeprefix("expected ")
    if kind == "literal_error":
        return f"one of {ctx.get('expected')}"
    bound = next((k for k in _BOUNDS if k in ctx), None)
    if bound:
        return f"a number {_BOUNDS[bound]} {ctx[bound]}"
    return _EXPECTED.get(kind, message[0].lower() + message[1:])


def _dotted(loc: list[Any]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _valid_keys(loc: list[Any]) -> list[str]:
    """The keys accepted at ``loc`` (walking the schema), for 'did you mean' hints."""
    annotation: Any = Config
    for part in loc:
        annotation = _unwrap_optional(annotation)
        if typing.get_origin(annotation) in (dict, list):
            annotation = typing.get_args(annotation)[-1]
        elif _is_section(annotation):
            field = next((f for n, f in annotation.model_fields.items() if (f.alias or n) == part), None)
            if field is None:
                return []
            annotation = field.annotation
        else:
            return []
    annotation = _unwrap_optional(annotation)
    return [f.alias or n for n, f in annotation.model_fields.items()] if _is_section(annotation) else []


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)
