"""The model-YAML schema: what a config may hold, its defaults and its checks.

Every section is a pydantic v2 model with ``extra="forbid"`` and strict types, and every field has a default (a
ten-line YAML works). Reading the YAML safely and wording its errors (file, line, field path, expected, found) is
:mod:`kfac_tune.config_reader`'s; its public names (``ConfigError``, ``read_yaml``, ``parse_value``) are also
importable from here.

``module:callable`` references (``model.callable``, ``data.callable``) are imported while validating. That import
is the one place user code runs; it runs so that a missing module is reported before the study starts.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import json
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from kfac_tune.catalog import LOSSES, OPTIMIZERS
from kfac_tune.config_reader import ConfigError, field_error, pydantic_problem, read_yaml
from kfac_tune.config_reader import Phrase, parse_value  # noqa: F401 - re-exported: callers import them from here
from kfac_tune.stores import DEFAULT_STORAGE, DEFAULT_TRACKING_URI

MAX_TRIALS = 1_000_000
MAX_STEPS = 10**9
MAX_BOUND = 1e15  # a search-space bound beyond this is a typo, not a hyperparameter
CALLABLE_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
STORED = "stored"  # validation context key: the config comes from a storage, so its callables are not imported
TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql")


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
    except (Exception, SystemExit) as error:  # user code: anything may be raised while importing it, exit() too
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
    def _no_conflicts(self, info: ValidationInfo) -> TrainingConfig:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("expected a budget in steps or in epochs, not both")
        # a stored config is a whole dump, every field written: its eval_every is the default, not the user's
        stored = (info.context or {}).get(STORED)
        if self.eval_seconds is not None and "eval_every" in self.model_fields_set and not stored:
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
        return field_error(self._source, path, expected, found, self._lines)

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
    # a copy (overrides must not edit the caller's), with numpy's numbers as Python's: np.int64(5) is 5 to a user
    copy = _plain_data(data, where) if isinstance(data, dict) else data
    config = _validate(copy, overrides and _plain_data(dict(overrides), where), where, {})
    config.check_objectives()
    return config


def _plain_data(data: dict[str, Any], where: str) -> dict[str, Any]:
    """A JSON copy of ``data``, numpy scalars as Python numbers; ``ConfigError`` for anything else JSON cannot
    hold (an object, a tensor)."""
    try:
        return json.loads(json.dumps(data, default=_plain_number))
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: expected plain data (numbers, strings, true/false, null, lists and mappings); "
                          f"{error}.") from None


def _plain_number(value: Any) -> Any:
    """A numpy scalar (``np.int64``, ``np.float32``, ``np.bool_``) as the Python number it holds; anything else
    JSON cannot hold stays an error, naming its type."""
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "shape", None) == ():
        return value.item()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _validate(raw: Any, overrides: Mapping[str, Any] | None, where: str, lines: Mapping[str, int]) -> Config:
    """``raw`` (a file's or the caller's mapping) with its dotted ``overrides`` applied, as a Config."""
    if not isinstance(raw, dict):
        raise field_error(where, "(top level)", "a mapping of sections (model, data, training, ...)", raw, lines)
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise pydantic_problem(where, error, lines, Config) from None


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
        raise pydantic_problem(where, error, {}, Config) from None
    config._stored = True
    return config


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
