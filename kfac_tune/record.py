"""Every key kfac-tune stores on Optuna studies and trials, and every MLflow tag and id name it writes.

Why one module: the search writes these keys and ``export``, ``show``, recipes and tracking read them back, often
in another process or a later version; a key spelled in two places drifts (``mlflow_run_id`` was a constant in one
file and a literal in another). Read and write through the helpers below, never through bare strings.

Study user attributes (written once, when the search creates the study; ``versions`` on every resume):
``config`` (the resolved config, passwords masked), ``config_hash``, ``optimizer``, ``architecture``,
``signature``, ``parameter_groups``, ``loss``, ``task``, ``steps``, ``metric``, ``split``, ``space``, ``versions``;
``mlflow_parent_run_id`` (tracking); ``test.<trial number>`` (a trial's test-split metrics, measured once);
``race`` (the race the search planned: top, seeds) and ``race.<trial number>.<seed>`` (one race run's value, null
when it diverged; one key per run, so a run is stored whole or not at all).

Trial user attributes: ``hyperparameters`` (the optimizer constructor's arguments), ``result`` (one dict: seconds,
steps, device, final/best metrics, batch size), ``fail_reason``/``prune_reason``, ``mlflow_run_id``;
``warm_start``/``warm_start_recipe`` on enqueued points.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from kfac_tune.version import __version__

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    AnyTrial = optuna.Trial | FrozenTrial

# ---------------------------------------------------------------------------------------------- study attributes
CONFIG = "config"
CONFIG_HASH = "config_hash"
OPTIMIZER = "optimizer"
ARCHITECTURE = "architecture"
SIGNATURE = "signature"
PARAMETER_GROUPS = "parameter_groups"
LOSS = "loss"
TASK = "task"
STEPS = "steps"
METRIC = "metric"
SPLIT = "split"
SPACE = "space"
VERSIONS = "versions"
PARENT_RUN = "mlflow_parent_run_id"
TEST_PREFIX = "test."  # test.<trial number> -> the trial's test-split metrics
RACE = "race"  # {"top": N, "seeds": N}: the race the search planned for its candidates
RACE_PREFIX = "race."  # race.<trial number>.<seed> -> that run's value (None: diverged)

# ---------------------------------------------------------------------------------------------- trial attributes
HYPERPARAMETERS = "hyperparameters"
RESULT = "result"
FAIL_REASON = "fail_reason"
PRUNE_REASON = "prune_reason"
TRIAL_RUN = "mlflow_run_id"
WARM_START = "warm_start"
WARM_START_RECIPE = "warm_start_recipe"

# ---------------------------------------------------------------------------------------------- MLflow tags
TAG_STUDY_NAME = "optuna.study_name"
TAG_DIRECTION = "optuna.direction"
TAG_TRIAL_NUMBER = "optuna.trial_number"
TAG_STATE = "optuna.state"
TAG_REASON = "optuna.reason"
TAG_BEST_TRIAL = "best.trial"
TAG_BEST_PREFIX = "best."  # best.<parameter> on the parent run
TAG_TRIALS_PREFIX = "trials."  # trials.<state> counts on the parent run
TAG_KIND = "kfac_tune.kind"  # what a run that is not a study or a trial holds
KIND_COMPARE = "compare"
KIND_TRAIN = "train"
TAG_RECIPE = "kfac_tune.recipe"  # the recipe a train run trained
TAG_RECIPES = "kfac_tune.recipes"  # the recipes a comparison ran
# what the study's parent run searched, and where (beside CONFIG_HASH, OPTIMIZER, ARCHITECTURE and METRIC)
TAG_ARCHITECTURE_HASH, TAG_DATASET, TAG_STORAGE, TAG_SAMPLER, TAG_PRUNER, TAG_JOBS, TAG_DEVICE = (
    "architecture_hash", "dataset", "storage", "sampler", "pruner", "jobs", "device")
METRIC_BEST_VALUE = "best_value"
METRIC_OUTCOME = "objective_value"


# ---------------------------------------------------------------------------------------------- studies
def versions() -> dict[str, str]:
    """Package versions worth recording (read from metadata: importing torch just for this would cost seconds)."""
    found = {}
    for package in ("kfac-tune", "torch", "optuna"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[package] = importlib.metadata.version(package)
    if "kfac-tune" not in found:  # running from a checkout
        found["kfac-tune"] = __version__
    return found


def write_study(study: optuna.Study, attrs: Mapping[str, Any]) -> None:
    """Store each of ``attrs`` (keys: the study constants above) on the study."""
    for key, value in attrs.items():
        study.set_user_attr(key, value)


def study_attr(study: optuna.Study, key: str, default: Any = None) -> Any:
    return study.user_attrs.get(key, default)


def study_metric(study: optuna.Study) -> str:
    """The metric the study was searched on (``value`` for a study kfac-tune did not create)."""
    return study.user_attrs.get(METRIC, "value")


def study_quantity(study: optuna.Study) -> str:
    """What the study's values are, for a column header: the metric, with the curve's quantity when it is not
    the final value (``best eval_loss``, ``auc eval_loss``; ``search.objective``)."""
    objective = (study.user_attrs.get(CONFIG) or {}).get("search", {}).get("objective", "final")
    return study_metric(study) if objective == "final" else f"{objective} {study_metric(study)}"


def created_by_search(study: optuna.Study) -> bool:
    """Whether ``kfac-tune search`` created the study (it carries the recipe metadata)."""
    return ARCHITECTURE in study.user_attrs


def parent_run_id(study: optuna.Study) -> str | None:
    return study.user_attrs.get(PARENT_RUN)


def set_parent_run_id(study: optuna.Study, run_id: str) -> None:
    study.set_user_attr(PARENT_RUN, run_id)


def test_metrics(study: optuna.Study, trial_number: int) -> dict[str, float] | None:
    """The trial's stored test-split metrics, or None when not measured yet."""
    key = f"{TEST_PREFIX}{trial_number}"
    return dict(study.user_attrs[key]) if key in study.user_attrs else None


def set_test_metrics(study: optuna.Study, trial_number: int, metrics: Mapping[str, float]) -> None:
    study.set_user_attr(f"{TEST_PREFIX}{trial_number}", dict(metrics))


def race_plan(study: optuna.Study) -> dict[str, int] | None:
    """The race the search planned (``{"top", "seeds"}``), or None when it planned none."""
    plan = study.user_attrs.get(RACE)
    return dict(plan) if isinstance(plan, dict) else None


def set_race_plan(study: optuna.Study, top: int, seeds: int) -> None:
    study.set_user_attr(RACE, {"top": top, "seeds": seeds})


def race_runs(study: optuna.Study, trial_number: int) -> dict[int, float | None]:
    """The stored race runs of one trial: seed -> value (None for a run that diverged)."""
    prefix = f"{RACE_PREFIX}{trial_number}."
    return {int(key[len(prefix):]): value for key, value in study.user_attrs.items() if key.startswith(prefix)}


def set_race_run(study: optuna.Study, trial_number: int, seed: int, value: float | None) -> None:
    study.set_user_attr(f"{RACE_PREFIX}{trial_number}.{seed}", value)


# ---------------------------------------------------------------------------------------------- trials
def result(trial: AnyTrial) -> dict[str, Any]:
    """The trial's recorded result (empty for a trial that did not complete)."""
    return trial.user_attrs.get(RESULT, {})


def set_result(trial: optuna.Trial, values: Mapping[str, Any]) -> None:
    trial.set_user_attr(RESULT, dict(values))  # one storage write (each costs ~20 ms on SQLite)


def hyperparameters(trial: AnyTrial, default: Any = None) -> Any:
    """The optimizer constructor's arguments the trial ran with (``default`` for a trial that recorded none)."""
    return trial.user_attrs.get(HYPERPARAMETERS, default)


def set_hyperparameters(trial: optuna.Trial, arguments: Mapping[str, Any]) -> None:
    trial.set_user_attr(HYPERPARAMETERS, dict(arguments))


def reason(trial: AnyTrial) -> str | None:
    """Why the trial was pruned or failed, if it says."""
    return trial.user_attrs.get(PRUNE_REASON) or trial.user_attrs.get(FAIL_REASON)


def set_fail_reason(trial: optuna.Trial, text: str) -> None:
    trial.set_user_attr(FAIL_REASON, text)


def set_prune_reason(trial: optuna.Trial, text: str) -> None:
    trial.set_user_attr(PRUNE_REASON, text)


def trial_run_id(trial: AnyTrial) -> str | None:
    return trial.user_attrs.get(TRIAL_RUN)


def set_trial_run_id(trial: optuna.Trial, run_id: str) -> None:
    trial.set_user_attr(TRIAL_RUN, run_id)


def warm_start_attrs(recipe_path: str | None = None) -> dict[str, Any]:
    """The user attributes of an enqueued warm-start point (``recipe_path``: the recipe it came from)."""
    attrs: dict[str, Any] = {WARM_START: True}
    if recipe_path is not None:
        attrs[WARM_START_RECIPE] = recipe_path
    return attrs


# ---------------------------------------------------------------------------------------------- reading back
class StoredDataError(ValueError):
    """A study or trial attribute that is not what kfac-tune writes (a storage edited by hand, damaged, or written
    by another tool); ``str(error)`` is the whole paragraph, naming the study and the attribute."""


def _number(value: Any) -> bool:
    """A number as JSON gives one back (NaN and infinities included: a diverged trial records them)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numbers(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and (v is None or _number(v)) for k, v in value.items())


def _result(value: Any) -> bool:
    """``set_result``'s dict: numbers (or null), the device's name and the final metrics."""
    return isinstance(value, dict) and all(
        _numbers(v) if k == "final" else isinstance(v, str) if k == "device" else v is None or _number(v)
        for k, v in value.items())


def _mapping(value: Any) -> bool:
    return isinstance(value, dict)


def _text(value: Any) -> bool:
    return isinstance(value, str)


# what each attribute must be, as (a phrase for the message, a check); an attribute that is absent is not checked
_STUDY_SHAPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    CONFIG: ("a mapping (the resolved config)", _mapping), CONFIG_HASH: ("a string", _text),
    OPTIMIZER: ("a string", _text), ARCHITECTURE: ("a string", _text), SIGNATURE: ("a mapping", _mapping),
    PARAMETER_GROUPS: ("a mapping or null", lambda v: v is None or isinstance(v, dict)), LOSS: ("a string", _text),
    TASK: ("a string", _text),
    STEPS: ("a whole number > 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0),
    METRIC: ("a string", _text), SPLIT: ("a string", _text), SPACE: ("a mapping", _mapping),
    VERSIONS: ("a mapping", _mapping), PARENT_RUN: ("a string", _text)}
_TRIAL_SHAPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    HYPERPARAMETERS: ("a mapping of argument names to values", _mapping),
    RESULT: ("a mapping of numbers, the device and the final metrics", _result),
    FAIL_REASON: ("a string", _text), PRUNE_REASON: ("a string", _text), TRIAL_RUN: ("a string", _text),
    WARM_START: ("true or false", lambda v: isinstance(v, bool)), WARM_START_RECIPE: ("a string", _text)}


def check_study(study: optuna.Study) -> None:
    """Raise :class:`StoredDataError` unless every attribute kfac-tune reads back from ``study`` and its trials
    has the shape kfac-tune writes: the commands that read a study trust them after this."""
    name = study.study_name
    for key, value in study.user_attrs.items():
        expected, check = (("a mapping of metric names to numbers", _numbers) if key.startswith(TEST_PREFIX)
                           else _STUDY_SHAPES.get(key, ("", lambda _: True)))
        if not check(value):
            raise stored_problem(name, f"the stored study attribute {key!r}", expected, value)
    for trial in study.get_trials(deepcopy=False):
        for key, value in trial.user_attrs.items():
            expected, check = _TRIAL_SHAPES.get(key, ("", lambda _: True))
            if not check(value):
                raise stored_problem(name, f"trial {trial.number}'s stored attribute {key!r}", expected, value)


def stored_problem(study_name: str, what: str, expected: str, found: Any) -> StoredDataError:
    """The one paragraph for a stored attribute that cannot be used: which study, which attribute, what it must be."""
    text = repr(found)
    text = text if len(text) <= 60 else text[:57] + "..."
    return unreadable(study_name, f"{what} is {text}; expected {expected}")


def unreadable(study_name: str, problem: str) -> StoredDataError:
    return StoredDataError(f"study {study_name!r}: {problem}. The storage was edited, damaged or written by another "
                           f"tool, so this study cannot be read; restore the storage from a backup, or search again "
                           f"into a new study.")
