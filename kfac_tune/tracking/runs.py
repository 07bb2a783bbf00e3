"""MLflow runs of kfac-tune studies: one parent run per study, one child run per trial.

Layout (design.md): the experiment holds a parent run named after the Optuna study, carrying the study's tags,
the resolved configuration, search space and budget as params, the trial counters as ``trials.<state>`` tags, its
input files (model YAML, search space), the plots and the exported recipe. Each trial is a child run
``trial-<n>`` (tag ``mlflow.parentRunId``; renamed ``trial-<n> (pruned)``/``(failed)`` when it did not complete)
with the whole resolved configuration and its sampled hyperparameters as params, the data set as an input, and
its evaluation curves as metrics. The link lives in Optuna user attributes (``mlflow_parent_run_id`` on the
study, ``mlflow_run_id`` on each trial), so a resumed study and every worker process find the same parent.

Everything talks to the store through :class:`mlflow.MlflowClient` rather than the fluent ``mlflow.start_run``:
the client keeps no process-global "active run", so threads (``n_jobs > 1``) and worker processes cannot trip
over each other's run stacks; mlflow is imported inside functions (see :mod:`kfac_tune.tracking.server`).

Tracking must never kill a trial: store calls made while a trial trains are retried with backoff and then
turned into a logged warning, and kept on the tracker (``given_up``) for the summary the CLI prints.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Mapping, TypeVar

from kfac_tune import record
from kfac_tune.secrets import mask
from kfac_tune.settings import TRACKING_URI_ENV
from kfac_tune.text import first_line
from kfac_tune.tracking.logs import without_messages
from kfac_tune.tracking.plots import best_trial, render_plots
from kfac_tune.tracking.server import (MAX_METRICS_PER_BATCH, MAX_PARAM_CHARS, MAX_PARAMS_TAGS_PER_BATCH,
                                       MAX_TAG_CHARS, client_uri, get_or_create_experiment, open_client)

if TYPE_CHECKING:
    import optuna
    import torch
    from mlflow import MlflowClient

log = logging.getLogger(__name__)
T = TypeVar("T")

OUTCOME_STATES = ("COMPLETE", "PRUNED", "FAIL")
# Name suffix of the run of a trial that did not complete, so the runs table tells them apart at a glance.
RUN_NAME_SUFFIX = {"PRUNED": " (pruned)", "FAIL": " (failed)"}

# Retries of our own around every store call made while a trial trains (see StoreCalls).
_RETRY_DELAYS_S = (0.25, 0.5, 1.0)
# After a flush gave up, wait this long before talking to the store again, so a dead server costs the trial
# one round of retries per interval instead of one per evaluation.
_COOL_DOWN_S = 30.0


# ----------------------------------------------------------------------------------------------------- retries
class StoreCalls:
    """Store calls made while a trial trains, retried with backoff; what was given up on is kept in ``given_up``.

    Used for every call made while a trial trains, so a flaky or dead tracking server (or a briefly locked
    SQLite file) degrades tracking instead of failing the trial. A study whose server died still completes;
    ``given_up`` (oldest first) is how the caller learns that its tracking is incomplete. Worker processes
    (``--jobs N``) have their own trackers and report through their log warnings.
    """

    def __init__(self) -> None:
        self.given_up: list[str] = []

    def __call__(self, action: Callable[[], T], what: str) -> tuple[bool, T | None]:
        """Run ``action``; on final failure log a warning (the error's first line only: HTTP client errors
        repeat the URL and the connection pool's state over several hundred characters) and return
        ``(False, None)``."""
        attempts = len(_RETRY_DELAYS_S) + 1
        for attempt in range(attempts):
            try:
                return True, action()
            except Exception as err:  # the store raises MlflowException, requests/SQLAlchemy errors, OSError
                if attempt == attempts - 1:
                    self.given_up.append(what)
                    log.warning("MLflow: %s failed after %d attempts, giving up: %s", what, attempts,
                                first_line(err, limit=240))
                else:
                    log.debug("MLflow: %s failed (%s); retrying", what, err)
                    time.sleep(_RETRY_DELAYS_S[attempt])
        return False, None


# -------------------------------------------------------------------------------------------------- trial runs
# MLflow run status of each trial state: a pruned trial was stopped early, which MLflow calls KILLED.
_RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


@dataclass(frozen=True)
class _Outcome:
    state: str
    value: float | None
    reason: str | None
    run_status: str


class TrialRun:
    """The child run of one trial: buffered metrics, outcome tags, and the run's end status.

    ``log_eval`` only appends to a buffer; the buffer goes to the store in one ``log_batch`` per flush, and a
    flush happens at most every ``flush_interval_s`` (and always on exit). ``run_id`` is ``""`` when the run
    could not be created: the trial then trains untracked. ``run_name`` gets the outcome's suffix on exit.
    """

    def __init__(self, client: MlflowClient | None, run_id: str, flush_interval_s: float = 0.0,
                 run_name: str = "", calls: StoreCalls | None = None, tracking_uri: str = "") -> None:
        self.run_id, self.run_name, self._client, self._calls = run_id, run_name, client, calls or StoreCalls()
        self._tracking_uri, self._flush_interval_s = tracking_uri, flush_interval_s
        self._metrics: list[Any] = []
        self._last_step, self._last_flush, self._resume_at = 0, -math.inf, -math.inf
        self._outcome: _Outcome | None = None

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        """Buffer one evaluation's metrics; flush if the last flush is ``flush_interval_s`` old."""
        if not self.run_id:
            return
        self._last_step = int(step)
        self._metrics.extend(_metric(key, v, self._last_step) for key, v in metrics.items())
        if time.monotonic() - self._last_flush >= self._flush_interval_s:
            self.flush()

    def flush(self) -> None:
        """Send the buffered metrics in batches of the REST limit; keep them if the store is unreachable."""
        self._send(tags={})

    def log_model(self, model: torch.nn.Module) -> None:
        """The trained network as the run's MLflow model (``tracking.log_model: best``); retried like every call."""
        if self.run_id:
            self._calls(lambda: log_model(self._tracking_uri, self.run_id, model), f"logging the model of {self.run_id}")

    def set_outcome(self, state: str, value: float | None = None, reason: str | None = None) -> None:
        """Record how the trial ended; written as ``optuna.state``/``optuna.reason`` tags on exit."""
        if state not in OUTCOME_STATES:
            raise ValueError(f"state must be one of {OUTCOME_STATES}, got {state!r}")
        self._outcome = _Outcome(state, value, reason, _RUN_STATUS[state])

    def __enter__(self) -> TrialRun:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Write the outcome with the last metrics in one batch, then end the run; never raise."""
        if not self.run_id:
            return
        outcome = self._resolve_outcome(exc)
        if outcome.value is not None:
            self._metrics.append(_metric(record.METRIC_OUTCOME, outcome.value, self._last_step))
        tags = {record.TAG_STATE: outcome.state}
        if self.run_name and outcome.state in RUN_NAME_SUFFIX:
            from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

            tags[MLFLOW_RUN_NAME] = self.run_name + RUN_NAME_SUFFIX[outcome.state]
        if outcome.reason:
            tags[record.TAG_REASON] = outcome.reason[:MAX_TAG_CHARS]
        self._resume_at = -math.inf  # the final write deserves one more round of retries
        self._send(tags)
        self._calls(lambda: self._client.set_terminated(self.run_id, outcome.run_status), f"ending run {self.run_id}")

    def _resolve_outcome(self, exc: BaseException | None) -> _Outcome:
        """Combine the explicit outcome with how the ``with`` block ended.

        An explicit ``set_outcome`` wins, except that an error after a ``COMPLETE`` outcome is a failure and
        an interrupt is always one (Optuna marks interrupted trials FAIL; the run is KILLED, with the reason
        given to ``set_outcome("FAIL", ...)`` if any, else the interrupt's name).
        """
        import optuna

        explicit = self._outcome
        if exc is not None and not isinstance(exc, Exception):
            said = explicit.reason if explicit is not None and explicit.state == "FAIL" else None
            return _Outcome("FAIL", None, said or type(exc).__name__, "KILLED")
        failed = exc is not None and not isinstance(exc, optuna.TrialPruned)
        if explicit is not None and not (failed and explicit.state == "COMPLETE"):
            return explicit
        if exc is None:
            return _Outcome("COMPLETE", None, None, "FINISHED")
        if not failed:
            return _Outcome("PRUNED", None, str(exc) or "pruned", "KILLED")
        return _Outcome("FAIL", None, f"{type(exc).__name__}: {exc}", "FAILED")

    def _send(self, tags: dict[str, str]) -> None:
        """One ``log_batch`` per 1000 metrics (tags ride on the first); pause after the store gave up."""
        if not self.run_id or (not self._metrics and not tags) or time.monotonic() < self._resume_at:
            return
        from mlflow.entities import RunTag

        tag_list = [RunTag(key, value) for key, value in tags.items()]
        while self._metrics or tag_list:
            chunk = self._metrics[:MAX_METRICS_PER_BATCH]
            sent, _ = self._calls(
                lambda: self._client.log_batch(self.run_id, metrics=chunk, tags=tag_list, synchronous=True),
                f"logging {len(chunk)} metrics to run {self.run_id}")
            if not sent:
                self._resume_at = time.monotonic() + _COOL_DOWN_S
                return
            del self._metrics[: len(chunk)]
            tag_list = []
        self._last_flush = time.monotonic()


def _metric(key: str, value: object, step: int) -> Any:
    """An MLflow ``Metric`` stamped now, of a value the store accepts: NaN and ±inf are stored by MLflow; anything
    unconvertible is NaN."""
    from mlflow.entities import Metric

    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    return Metric(key, number, int(time.time() * 1000), step)


# -------------------------------------------------------------------------------- configurations and data sets
def used_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """A dumped config without the settings a callable replaces: ``model.name`` beside ``model.callable`` and
    ``data.name`` beside ``data.callable`` are the schema's defaults (``mlp``, ``digits``), never used, and as run
    params they would say a stranger's study trained an MLP on digits."""
    used = dict(config)
    for section in ("model", "data"):
        if isinstance(used.get(section), Mapping) and used[section].get("callable"):
            used[section] = {k: v for k, v in used[section].items() if k != "name"}
    return used


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested configuration as MLflow params: dotted keys (``data.batch_size``), scalars as JSON writes them
    (``null``, ``true``), strings as they are, lists and empty sections as JSON; credentials masked (``secrets.mask``).

    Params are what the MLflow runs table can show as columns and compare, so every setting a run depends on
    goes there, not only the sampled hyperparameters.
    """
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, str):  # the value itself may be a URL (storage, tracking.uri): parsed, not guessed
            flat[name] = mask(value, value)
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


def log_model(uri: str, run_id: str, model: torch.nn.Module) -> None:
    """``mlflow.pytorch.log_model`` into the run, on the CPU, with torch pinned as its requirement (inferring the
    requirements would import-scan the environment, seconds for nothing). Pickled, not MLflow's default ``pt2``:
    that traces ``forward`` with an input example, which fails for networks with data-dependent control flow;
    ``mlflow.pytorch.load_model`` needs the model's module importable, as ``model.callable`` does anyway."""
    import importlib.metadata

    import mlflow
    import mlflow.pytorch

    # the distribution's version (2.14.1), not torch.__version__ (2.14.1+cu130): MLflow compares the pin with the
    # installed distribution and warns of a mismatch that is none
    torch_requirement = f"torch=={importlib.metadata.version('torch')}"
    # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI into os.environ, where it would outrank the YAML
    # of the next command run in this process (the Python API, a notebook): put back what was there.
    before = os.environ.get(TRACKING_URI_ENV)
    mlflow.set_tracking_uri(client_uri(uri))
    try:
        with mlflow.start_run(run_id=run_id):
            with without_messages("mlflow.pytorch", "Saving pytorch model by Pickle"):  # chosen, and said above
                mlflow.pytorch.log_model(model.cpu(), name="model", pip_requirements=[torch_requirement],
                                         serialization_format="pickle")
    finally:
        mlflow.set_tracking_uri(before)


def dataset_input(data: Mapping[str, Any], context: str) -> Any:
    """An ``mlflow.entities.DatasetInput`` describing the config's ``data`` section, without uploading any data.

    Name: the built-in data set or the callable's import path. Digest: a hash of the whole section, so runs on
    the same data (same sizes, root, kwargs) share one data set in MLflow and a changed split shows as another.
    The section itself is the profile. ``context`` (``train``, ``eval``) is MLflow's usual input tag.
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag

    description = json.dumps(data, sort_keys=True, default=str)
    name = str(data.get("callable") or data.get("name") or "data")
    source = {"callable": name} if data.get("callable") else {"kfac_tune.zoo": name, "root": data.get("root")}
    dataset = Dataset(name=name, digest=hashlib.sha256(description.encode()).hexdigest()[:10], source_type="code",
                      source=json.dumps(source), profile=description)
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])


# ----------------------------------------------------------------------------------------------------- studies
class StudyTracker:
    """Tracks one Optuna study in one MLflow experiment; safe to construct in every worker process.

    ``flush_interval_s`` bounds how often a trial's metric buffer goes to the store; 0 sends every
    evaluation at once (one ``log_batch`` per evaluation), which is cheap next to an evaluation.
    ``run_config``: the resolved configuration as plain data (``Config.model_dump(mode="json")``); every run logs
    it as flattened params (passwords in URLs masked) and its ``data`` section names the trials' input data set.
    """

    def __init__(self, tracking_uri: str, experiment: str, study_name: str, flush_interval_s: float = 0.0,
                 run_config: Mapping[str, Any] | None = None) -> None:
        self.tracking_uri, self.experiment, self.study_name = tracking_uri, experiment, study_name
        self.flush_interval_s, self.run_config = flush_interval_s, dict(run_config or {})
        self._client_instance: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._parent_run_id: str | None = None
        self._calls = StoreCalls()

    @property
    def given_up(self) -> list[str]:
        """The store calls this tracker gave up on so far, oldest first (see :class:`StoreCalls`)."""
        return list(self._calls.given_up)

    @property
    def _client(self) -> MlflowClient:
        if self._client_instance is None:
            self._client_instance = open_client(self.tracking_uri)
        return self._client_instance

    @property
    def experiment_id(self) -> str:
        """The experiment's id, creating the experiment (with a local artifact root) on first use."""
        if self._experiment_id is None:
            self._experiment_id = get_or_create_experiment(self._client, self.tracking_uri, self.experiment)
        return self._experiment_id

    def ensure_parent_run(self, study: optuna.Study, tags: dict[str, str], artifacts: dict[str, str],
                          params: Mapping[str, Any] | None = None) -> str:
        """Return the study's parent run, creating it (with its artifacts) only if the study has none yet.

        A resumed study or another worker re-attaches to the run named in ``study.user_attrs`` and sets it
        RUNNING again; its tags are refreshed, its artifacts left as logged. Call it once in the launching
        process before workers start, or under ``setup_lock`` (:mod:`kfac_tune.search.study`): two processes that both
        find no parent would each create one.
        ``params`` (e.g. ``{"space": ..., "budget": ...}``) are logged flattened beside the configuration. MLflow
        params are write-once: a resumed study adds the keys the run lacks and keeps the first values of the
        others (logging a changed value would be refused and stop the search).
        """
        from mlflow.entities import RunTag

        all_tags = self._parent_tags(study, tags)
        flat = flatten({**self.run_config, **(params or {})})
        run_id = self._existing_parent(study)
        if run_id is None:
            run_id = self._client.create_run(self.experiment_id, run_name=self.study_name, tags=all_tags).info.run_id
            for name, text in artifacts.items():
                self._client.log_text(run_id, text, name)
            self._log_params(run_id, flat)
            record.set_parent_run_id(study, run_id)
        else:
            self._client.log_batch(run_id, tags=[RunTag(key, value) for key, value in all_tags.items()])
            logged = self._client.get_run(run_id).data.params
            self._log_params(run_id, {key: value for key, value in flat.items() if key not in logged})
        self._parent_run_id = run_id
        return run_id

    def _log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        """Params in batches of the REST limit, each retried (a batch given up on is logged by ``StoreCalls``)."""
        from mlflow.entities import Param

        param_list = [Param(key, value[:MAX_PARAM_CHARS]) for key, value in params.items()]
        for start in range(0, len(param_list), MAX_PARAMS_TAGS_PER_BATCH):
            chunk = param_list[start : start + MAX_PARAMS_TAGS_PER_BATCH]
            self._calls(lambda: self._client.log_batch(run_id, params=chunk), f"logging params of run {run_id}")

    def _existing_parent(self, study: optuna.Study) -> str | None:
        """The parent run recorded on the study, reopened; ``None`` if absent or gone from the store."""
        from mlflow.exceptions import MlflowException

        run_id = record.parent_run_id(study)
        if not run_id:
            return None
        try:
            run = self._client.get_run(run_id)
        except MlflowException:
            run = None
        if run is None or run.info.lifecycle_stage == "deleted":
            log.warning("MLflow: parent run %s of study %s is gone; creating a new one", run_id, study.study_name)
            return None
        if run.info.status != "RUNNING":
            self._client.update_run(run_id, status="RUNNING")
        return run_id

    def _parent_tags(self, study: optuna.Study, tags: dict[str, str]) -> dict[str, str]:
        directions = ",".join(d.name for d in study.directions)
        merged = {record.TAG_STUDY_NAME: self.study_name, record.TAG_DIRECTION: directions, **tags}
        return {key: str(value)[:MAX_TAG_CHARS] for key, value in merged.items()}

    def _parent_of(self, study: optuna.Study) -> str:
        """The parent run id known to this process, else the one recorded on the study."""
        run_id = self._parent_run_id or record.parent_run_id(study)
        if not run_id:
            raise RuntimeError(f"study {study.study_name!r} has no MLflow parent run: call ensure_parent_run first")
        return run_id

    def trial_run(self, trial: optuna.Trial, params: dict[str, object]) -> TrialRun:
        """Create the child run ``trial-<n>`` with the resolved configuration and the sampled ``params``, and the
        data set as its input; use the result as a context manager.

        Every call makes a new run, so a retried trial (a new Optuna trial) never overwrites the run of the
        attempt that died. If the store cannot be reached the trial still runs, untracked (``run_id == ""``).
        """
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        tags = {MLFLOW_PARENT_RUN_ID: self._parent_of(trial.study), record.TAG_STUDY_NAME: self.study_name,
                record.TAG_TRIAL_NUMBER: str(trial.number)}
        run_name = f"trial-{trial.number}"
        created, run = self._calls(lambda: self._client.create_run(self.experiment_id, run_name=run_name, tags=tags),
                                   f"creating the run of trial {trial.number}")
        if not created:
            return TrialRun(None, "", calls=self._calls)
        run_id = run.info.run_id
        # on the trial at once: a worker killed while the params are logged leaves its run findable from its trial
        record.set_trial_run_id(trial, run_id)
        self._log_params(run_id, {**flatten(self.run_config), **{key: str(value) for key, value in params.items()}})
        data = self.run_config.get("data")
        if isinstance(data, Mapping):
            dataset = dataset_input(data, context="train")
            self._calls(lambda: self._client.log_inputs(run_id, datasets=[dataset]), f"logging the data set of {run_id}")
        return TrialRun(self._client, run_id, self.flush_interval_s, run_name=run_name, calls=self._calls,
                        tracking_uri=self.tracking_uri)

    def refresh_plots(self, study: optuna.Study) -> None:
        """Re-render the study plots and the best-so-far summary onto the parent run (same paths each time)."""
        run_id = self._parent_of(study)
        with tempfile.TemporaryDirectory(prefix="kfac-tune-plots-") as tmp:
            if render_plots(study, self._client, Path(tmp)):
                self._calls(lambda: self._client.log_artifacts(run_id, tmp, "plots"), f"uploading plots to {run_id}")
        self._calls(lambda: self._log_summary(run_id, study), f"logging the study summary to {run_id}")

    def finish_study(self, study: optuna.Study, recipe_path: str | None = None) -> None:
        """Final plots, the exported recipe, and the parent run ended FINISHED."""
        run_id = self._parent_of(study)
        self.refresh_plots(study)
        if recipe_path is not None:
            self._calls(lambda: self._client.log_artifact(run_id, recipe_path), f"uploading {recipe_path}")
        self._calls(lambda: self._client.set_terminated(run_id, "FINISHED"), f"ending parent run {run_id}")

    def _log_summary(self, run_id: str, study: optuna.Study) -> None:
        """Trial counts as ``trials.<state>`` tags, the best params as ``best.<name>`` tags, the best value as the
        ``best_value`` metric (stepped by the number of trials: the best-so-far curve).

        Counts are tags, not metrics: a metric makes a chart per counter, of little use next to the table.
        Tags rather than params because MLflow params are write-once and the counts and the best trial change.
        """
        from mlflow.entities import RunTag
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        counts = {state: sum(t.state == state for t in trials) for state in TrialState}
        tags = [RunTag(f"{record.TAG_TRIALS_PREFIX}{state.name.lower()}", str(counts[state])) for state in TrialState]
        metrics = []
        best = best_trial(study)
        if best is not None:
            metrics.append(_metric(record.METRIC_BEST_VALUE, best.value, len(trials)))
            tags += [RunTag(record.TAG_BEST_TRIAL, str(best.number))]
            tags += [RunTag(f"{record.TAG_BEST_PREFIX}{key}", str(value)[:MAX_TAG_CHARS]) for key, value in best.params.items()]
        self._client.log_batch(run_id, metrics=metrics, tags=tags[:MAX_PARAMS_TAGS_PER_BATCH])
