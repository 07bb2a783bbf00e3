"""MLflow tracking for kfac-tune studies: one parent run per study, one child run per trial.

Layout (design.md): the experiment holds a parent run named after the Optuna study, carrying the study's tags,
the resolved configuration, search space and budget as params, the trial counters as ``trials.<state>`` tags, its
input files (model YAML, search space), the plots and the exported recipe. Each trial is a child run
``trial-<n>`` (tag ``mlflow.parentRunId``; renamed ``trial-<n> (pruned)``/``(failed)`` when it did not complete)
with the whole resolved configuration and its sampled hyperparameters as params, the data set as an input, and
its evaluation curves as metrics. The link lives in Optuna user attributes (``mlflow_parent_run_id`` on the
study, ``mlflow_run_id`` on each trial), so a resumed study and every worker process find the same parent.

Everything talks to the store through :class:`mlflow.MlflowClient` rather than the fluent ``mlflow.start_run``:
the client keeps no process-global "active run", so threads (``n_jobs > 1``) and worker processes cannot trip
over each other's run stacks. mlflow is imported inside functions because importing it costs ~3 s, which the
CLI's ``--help`` and the non-tracking commands should not pay.

Tracking must never kill a trial: store calls made while a trial trains are retried with backoff and then
turned into a logged warning.
"""
from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, TypeVar

from kfac_tune import record
from kfac_tune.filelock import sqlite_file, sqlite_setup_lock

if TYPE_CHECKING:
    import optuna
    from matplotlib.figure import Figure as MplFigure
    from mlflow import MlflowClient
    from plotly.graph_objects import Figure as PlotlyFigure

__all__ = [
    "StudyTracker",
    "PortInUse",
    "TrackingUnavailable",
    "TrialRun",
    "check_reachable",
    "experiment_url",
    "flatten",
    "get_or_create_experiment",
    "log_comparison",
    "prepare_store",
    "serve_ui",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

PARENT_RUN_ATTR = record.PARENT_RUN
TRIAL_RUN_ATTR = record.TRIAL_RUN
ARTIFACT_DIR_NAME = "mlartifacts"
OUTCOME_METRIC = record.METRIC_OUTCOME
OUTCOME_STATES = ("COMPLETE", "PRUNED", "FAIL")
BEST_CURVES = 5
CURVE_METRIC = "eval_loss"
CONTOUR_PARAMS = ("lr", "damping")
# The one page holding every interactive plot of a study: plotly.js (~4.6 MB) is inlined once for all of them.
# Not one page per plot: each would carry its own copy (~19 MB a study). Not a shared plotly.min.js artifact
# either: the MLflow UI shows an HTML artifact from a blob: URL in a sandboxed iframe, where a relative script
# path does not resolve, and its server sends .js artifacts as text/plain with nosniff, which browsers refuse
# to execute. A CDN link would leave the plots blank on machines without internet access.
INTERACTIVE_PAGE = "interactive.html"
# Name suffix of the run of a trial that did not complete, so the runs table tells them apart at a glance.
RUN_NAME_SUFFIX = {"PRUNED": " (pruned)", "FAIL": " (failed)"}
# PED-ANOVA (Optuna 5's default importance) contrasts the top 10 % of complete trials with the rest; below ten
# trials that top set is empty or a single trial and Optuna reports all importances as equal.
MIN_TRIALS_FOR_IMPORTANCE = 10

# log_batch limits of the MLflow REST API; keys and tags beyond them are rejected, not truncated.
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAMS_TAGS_PER_BATCH = 100
_MAX_TAG_CHARS = 5000
_MAX_PARAM_CHARS = 6000

# Retries of our own around every store call made while a trial trains (see _retrying).
_RETRY_DELAYS_S = (0.25, 0.5, 1.0)
# After a flush gave up, wait this long before talking to the store again, so a dead server costs the trial
# one round of retries per interval instead of one per evaluation.
_COOL_DOWN_S = 30.0


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server named by the URI does not answer."""


# --------------------------------------------------------------------------------------------------------------
# Store and server
# --------------------------------------------------------------------------------------------------------------


def _is_http(tracking_uri: str) -> bool:
    return urllib.parse.urlparse(tracking_uri).scheme in ("http", "https")


def local_artifact_root(tracking_uri: str) -> Path | None:
    """Where runs of a local SQLite store keep their artifacts: ``<db dir>/mlartifacts``.

    MLflow's own default for a SQL store is ``./mlruns`` relative to whichever directory the process happened
    to start in; pinning the root next to the database keeps the store self-contained and lets
    :func:`serve_ui` serve the same files. ``None`` for stores whose artifact location the server decides.
    """
    db = sqlite_file(tracking_uri)
    return db.parent / ARTIFACT_DIR_NAME if db is not None else None


def _configure_http_client() -> None:
    """Adjust MLflow's HTTP client for tracking from training processes; user settings in the environment win.

    - Cap its built-in retries (default 7, minutes of backoff per call): our own loop (:func:`_retrying`)
      decides how long a trial may wait for a dead server.
    - Stop it printing two "View run" links (after an extra ``get_run`` round trip) every time a run ends,
      which would interleave with the CLI's output once per trial.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def _client(tracking_uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    if _is_http(tracking_uri):
        _configure_http_client()
    return MlflowClient(tracking_uri=tracking_uri)


def prepare_store(tracking_uri: str) -> None:
    """Create or migrate the tracking store once, before worker processes start.

    Several processes migrating a fresh SQLite database at once crash (``duplicate column name: step``,
    ``table experiments already exists``); the first query through a client builds the schema, so doing it
    here, in the parent, leaves the workers an up-to-date store, and a lock beside the database
    (:mod:`kfac_tune.filelock`) keeps two ``search`` processes started together from both building it. For an
    HTTP server it only checks that the server answers.
    """
    if _is_http(tracking_uri):
        check_reachable(tracking_uri)
        return
    db = sqlite_file(tracking_uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    with sqlite_setup_lock(tracking_uri):  # two searches started together on a fresh store
        _client(tracking_uri).search_experiments(max_results=1)


def check_reachable(tracking_uri: str, timeout_s: float = 10) -> None:
    """Raise :class:`TrackingUnavailable` if an HTTP tracking server does not answer ``/health``.

    Fails fast (one request, ``timeout_s``) instead of letting the first logging call sit in MLflow's retry
    loop. Database URIs are not checked: opening them is the store's job.
    """
    if not _is_http(tracking_uri):
        return
    from kfac_tune.secrets import display_url, url_credentials

    base, credentials = url_credentials(tracking_uri)  # urllib cannot take user:pw@ in the URL; MLflow's client
    request = urllib.request.Request(base.rstrip("/") + "/health")  # sends it as basic auth, and so do we
    if credentials is not None:
        token = base64.b64encode(":".join(credentials).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except urllib.error.HTTPError as err:
        problem = f"HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        problem = str(getattr(err, "reason", err))
    raise TrackingUnavailable(
        f"MLflow tracking server {display_url(tracking_uri)} is not reachable ({problem}); start it "
        f"(kfac-tune ui / mlflow server) or pass a sqlite:/// tracking URI."
    )


class PortInUse(TrackingUnavailable):
    """The port ``kfac-tune ui`` was asked to serve on is taken (most likely by another server)."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(f"port {port} on {host} is already in use (another MLflow UI?); stop that server or pass "
                         f"--port with a free port")


def serve_ui(tracking_uri: str, host: str = "127.0.0.1", port: int = 5000, workers: int = 1) -> subprocess.Popen:
    """Start ``mlflow server`` on a local store and return once ``/health`` answers.

    Runs logged straight to the SQLite store name their files by path (``<db dir>/mlartifacts``), which the
    server reads; experiments created through the server get ``mlflow-artifacts:/`` locations, proxied by it
    into the same directory (``--artifacts-destination``), so clients on other hosts can upload too.
    It binds 127.0.0.1 unless told otherwise: the server has no authentication. Output goes to
    ``mlflow-server.log`` beside the store.
    MLflow's job runner (GenAI evaluation jobs) is off unless the environment asks for it: this UI only shows
    training runs, and the runner is one more process importing mlflow on a machine that is training.

    The server and its uvicorn worker run in their own process group under kfac-tune's supervisor
    (:mod:`kfac_tune.processes`): stop the returned process with ``processes.stop([process])`` and the whole
    group goes; if this process dies, the group goes too. A port already in use raises :class:`PortInUse`
    before anything starts: otherwise ``/health`` would be answered by the server already there, and the
    links printed for this store would open that server's.
    """
    from kfac_tune import processes

    if not _port_free(host, port):
        raise PortInUse(host, port)
    prepare_store(tracking_uri)
    artifact_root = local_artifact_root(tracking_uri) or Path.cwd() / ARTIFACT_DIR_NAME
    artifact_root.mkdir(parents=True, exist_ok=True)
    log_path = artifact_root.parent / "mlflow-server.log"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", tracking_uri,
        "--artifacts-destination", artifact_root.as_uri(),
        "--host", host, "--port", str(port), "--workers", str(workers),
    ]  # fmt: skip
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    with open(log_path, "ab") as log_file:
        process = processes.start(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_until_healthy(process, f"http://{_url_host(host)}:{port}", log_path, host, port)
    except BaseException:  # Ctrl-C, SIGTERM or a server that never came up: nothing of it may stay behind
        processes.stop([process])
        raise
    return process


def _port_free(host: str, port: int) -> bool:
    """Whether a server could bind ``host:port`` now (as uvicorn binds: ``SO_REUSEADDR``, so a port left in
    TIME_WAIT by a server that just stopped counts as free)."""
    import socket

    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return True  # let the server report the bad host
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError:
            return False
    return True


def _url_host(host: str) -> str:
    """The address a client on this machine uses to reach a server bound to ``host``."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _wait_until_healthy(process: subprocess.Popen, base_url: str, log_path: Path, host: str, port: int,
                        timeout_s: float = 120) -> None:
    """Poll ``/health``; raise with the server's log tail if it exits or never comes up (the caller stops it).

    A server that exits because another one took the port in the meantime raises :class:`PortInUse`.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            check_reachable(base_url, timeout_s=2)
        except TrackingUnavailable:
            time.sleep(0.5)
            continue
        if process.poll() is None:
            return
        break
    tail = log_path.read_text(errors="replace")[-2000:]
    if "address already in use" in tail.lower():
        raise PortInUse(host, port)
    raise TrackingUnavailable(f"mlflow server at {base_url} did not come up; its log ({log_path}) ends:\n{tail}")


def experiment_url(base_url: str, experiment_id: str) -> str:
    """The experiment's "Training runs" table (MLflow 3's bare experiment page is the GenAI overview)."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs"


# --------------------------------------------------------------------------------------------------------------
# Retries
# --------------------------------------------------------------------------------------------------------------


# What this process gave up on (see _retrying), for the summary the CLI prints when a study ends.
_GIVEN_UP: list[str] = []


def given_up() -> list[str]:
    """The store calls this process gave up on so far, oldest first (``what`` of each :func:`_retrying`).

    A study whose server died still completes; this is how the caller learns that its tracking is incomplete.
    Worker processes (``--jobs N``) keep their own lists and report through their log warnings.
    """
    return list(_GIVEN_UP)


def _retrying(action: Callable[[], T], what: str) -> tuple[bool, T | None]:
    """Run a store call, retrying with backoff; on final failure log a warning and return ``(False, None)``.

    Used for every call made while a trial trains, so a flaky or dead tracking server (or a briefly locked
    SQLite file) degrades tracking instead of failing the trial. The warning carries the first line of the
    error only: HTTP client errors repeat the URL and the connection pool's state over several hundred characters.
    """
    attempts = len(_RETRY_DELAYS_S) + 1
    for attempt in range(attempts):
        try:
            return True, action()
        except Exception as err:  # the store raises MlflowException, requests/SQLAlchemy errors, OSError
            if attempt == attempts - 1:
                _GIVEN_UP.append(what)
                log.warning("MLflow: %s failed after %d attempts, giving up: %s", what, attempts, _short(err))
            else:
                log.debug("MLflow: %s failed (%s); retrying", what, err)
                time.sleep(_RETRY_DELAYS_S[attempt])
    return False, None


def _short(error: Exception, limit: int = 240) -> str:
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------------------------
# Trial runs
# --------------------------------------------------------------------------------------------------------------


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
                 run_name: str = "") -> None:
        self.run_id = run_id
        self.run_name = run_name
        self._client = client
        self._flush_interval_s = flush_interval_s
        self._metrics: list[Any] = []
        self._last_step = 0
        self._last_flush = -math.inf
        self._resume_at = -math.inf
        self._outcome: _Outcome | None = None

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        """Buffer one evaluation's metrics; flush if the last flush is ``flush_interval_s`` old."""
        if not self.run_id:
            return
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        self._last_step = int(step)
        self._metrics.extend(Metric(key, _as_float(v), timestamp, self._last_step) for key, v in metrics.items())
        if time.monotonic() - self._last_flush >= self._flush_interval_s:
            self.flush()

    def flush(self) -> None:
        """Send the buffered metrics in batches of the REST limit; keep them if the store is unreachable."""
        self._send(tags={})

    def set_outcome(self, state: str, value: float | None = None, reason: str | None = None) -> None:
        """Record how the trial ended; written as ``optuna.state``/``optuna.reason`` tags on exit."""
        if state not in OUTCOME_STATES:
            raise ValueError(f"state must be one of {OUTCOME_STATES}, got {state!r}")
        self._outcome = _Outcome(state, value, reason, _RUN_STATUS[state])

    def __enter__(self) -> TrialRun:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Write the outcome with the last metrics in one batch, then end the run; never raise."""
        if not self.run_id:
            return
        outcome = self._resolve_outcome(exc)
        if outcome.value is not None:
            from mlflow.entities import Metric

            timestamp = int(time.time() * 1000)
            self._metrics.append(Metric(OUTCOME_METRIC, _as_float(outcome.value), timestamp, self._last_step))
        tags = {record.TAG_STATE: outcome.state}
        if self.run_name and outcome.state in RUN_NAME_SUFFIX:
            from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

            tags[MLFLOW_RUN_NAME] = self.run_name + RUN_NAME_SUFFIX[outcome.state]
        if outcome.reason:
            tags[record.TAG_REASON] = outcome.reason[:_MAX_TAG_CHARS]
        self._resume_at = -math.inf  # the final write deserves one more round of retries
        self._send(tags)
        _retrying(lambda: self._client.set_terminated(self.run_id, outcome.run_status), f"ending run {self.run_id}")

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
            chunk = self._metrics[:_MAX_METRICS_PER_BATCH]
            sent, _ = _retrying(
                lambda: self._client.log_batch(self.run_id, metrics=chunk, tags=tag_list, synchronous=True),
                f"logging {len(chunk)} metrics to run {self.run_id}",
            )
            if not sent:
                self._resume_at = time.monotonic() + _COOL_DOWN_S
                return
            del self._metrics[: len(chunk)]
            tag_list = []
        self._last_flush = time.monotonic()


def _as_float(value: object) -> float:
    """A metric value the store accepts: NaN and ±inf are stored by MLflow; anything unconvertible is NaN."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


# --------------------------------------------------------------------------------------------------------------
# Configurations and data sets
# --------------------------------------------------------------------------------------------------------------


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested configuration as MLflow params: dotted keys (``data.batch_size``), scalars as JSON writes them
    (``null``, ``true``), strings as they are, lists and empty sections as JSON; passwords in URLs masked.

    Params are what the MLflow runs table can show as columns and compare, so every setting a run depends on
    goes there, not only the sampled hyperparameters.
    """
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, str):
            flat[name] = _mask_password(value)
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


def _mask_password(text: str) -> str:
    """``scheme://user:***@host/...`` for a URL carrying a password (database and tracking URLs); else ``text``."""
    if "://" not in text:
        return text
    try:
        password = urllib.parse.urlsplit(text).password
    except ValueError:
        return text
    return text.replace(f":{password}@", ":***@") if password else text


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


# --------------------------------------------------------------------------------------------------------------
# Studies
# --------------------------------------------------------------------------------------------------------------


class StudyTracker:
    """Tracks one Optuna study in one MLflow experiment; safe to construct in every worker process.

    ``flush_interval_s`` bounds how often a trial's metric buffer goes to the store; 0 sends every
    evaluation at once (one ``log_batch`` per evaluation), which is cheap next to an evaluation.
    ``run_config``: the resolved configuration as plain data (``Config.model_dump(mode="json")``); every run logs
    it as flattened params (passwords in URLs masked) and its ``data`` section names the trials' input data set.
    """

    def __init__(self, tracking_uri: str, experiment: str, study_name: str, flush_interval_s: float = 0.0,
                 run_config: Mapping[str, Any] | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.study_name = study_name
        self.flush_interval_s = flush_interval_s
        self.run_config = dict(run_config or {})
        self._client_instance: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._parent_run_id: str | None = None

    @property
    def _client(self) -> MlflowClient:
        if self._client_instance is None:
            self._client_instance = _client(self.tracking_uri)
        return self._client_instance

    @property
    def experiment_id(self) -> str:
        """The experiment's id, creating the experiment (with a local artifact root) on first use."""
        if self._experiment_id is None:
            self._experiment_id = self._get_or_create_experiment()
        return self._experiment_id

    def _get_or_create_experiment(self) -> str:
        return get_or_create_experiment(self._client, self.tracking_uri, self.experiment)

    def ensure_parent_run(self, study: optuna.Study, tags: dict[str, str], artifacts: dict[str, str],
                          params: Mapping[str, Any] | None = None) -> str:
        """Return the study's parent run, creating it (with its artifacts) only if the study has none yet.

        A resumed study or another worker re-attaches to the run named in ``study.user_attrs`` and sets it
        RUNNING again; its tags are refreshed, its artifacts left as logged. Call it once in the launching
        process before workers start, or under ``setup_lock`` (kfac_tune.search.study): two processes that both
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
        """Params in batches of the REST limit, each retried (a batch given up on is logged by ``_retrying``)."""
        from mlflow.entities import Param

        param_list = [Param(key, value[:_MAX_PARAM_CHARS]) for key, value in params.items()]
        for start in range(0, len(param_list), _MAX_PARAMS_TAGS_PER_BATCH):
            chunk = param_list[start : start + _MAX_PARAMS_TAGS_PER_BATCH]
            _retrying(lambda: self._client.log_batch(run_id, params=chunk), f"logging params of run {run_id}")

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
        return {key: str(value)[:_MAX_TAG_CHARS] for key, value in merged.items()}

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

        tags = {
            MLFLOW_PARENT_RUN_ID: self._parent_of(trial.study),
            record.TAG_STUDY_NAME: self.study_name,
            record.TAG_TRIAL_NUMBER: str(trial.number),
        }
        run_name = f"trial-{trial.number}"
        created, run = _retrying(
            lambda: self._client.create_run(self.experiment_id, run_name=run_name, tags=tags),
            f"creating the run of trial {trial.number}",
        )
        if not created:
            return TrialRun(None, "")
        run_id = run.info.run_id
        self._log_params(run_id, {**flatten(self.run_config), **{key: str(value) for key, value in params.items()}})
        data = self.run_config.get("data")
        if isinstance(data, Mapping):
            dataset = dataset_input(data, context="train")
            _retrying(lambda: self._client.log_inputs(run_id, datasets=[dataset]), f"logging the data set of {run_id}")
        record.set_trial_run_id(trial, run_id)
        return TrialRun(self._client, run_id, self.flush_interval_s, run_name=run_name)

    def refresh_plots(self, study: optuna.Study) -> None:
        """Re-render the study plots and the best-so-far summary onto the parent run (same paths each time)."""
        run_id = self._parent_of(study)
        with tempfile.TemporaryDirectory(prefix="kfac-tune-plots-") as tmp:
            if _render_plots(study, self._client, Path(tmp)):
                _retrying(lambda: self._client.log_artifacts(run_id, tmp, "plots"), f"uploading plots to {run_id}")
        _retrying(lambda: self._log_summary(run_id, study), f"logging the study summary to {run_id}")

    def finish_study(self, study: optuna.Study, recipe_path: str | None = None) -> None:
        """Final plots, the exported recipe, and the parent run ended FINISHED."""
        run_id = self._parent_of(study)
        self.refresh_plots(study)
        if recipe_path is not None:
            _retrying(lambda: self._client.log_artifact(run_id, recipe_path), f"uploading {recipe_path}")
        _retrying(lambda: self._client.set_terminated(run_id, "FINISHED"), f"ending parent run {run_id}")

    def _log_summary(self, run_id: str, study: optuna.Study) -> None:
        """Trial counts as ``trials.<state>`` tags, the best params as ``best.<name>`` tags, the best value as the
        ``best_value`` metric (stepped by the number of trials: the best-so-far curve).

        Counts are tags, not metrics: a metric makes a chart per counter, of little use next to the table.
        Tags rather than params because MLflow params are write-once and the counts and the best trial change.
        """
        from mlflow.entities import Metric, RunTag
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        counts = {state: sum(t.state == state for t in trials) for state in TrialState}
        tags = [RunTag(f"{record.TAG_TRIALS_PREFIX}{state.name.lower()}", str(counts[state])) for state in TrialState]
        metrics = []
        best = _best_trial(study)
        if best is not None:
            metrics.append(Metric(record.METRIC_BEST_VALUE, _as_float(best.value), int(time.time() * 1000), len(trials)))
            tags += [RunTag(record.TAG_BEST_TRIAL, str(best.number))]
            tags += [RunTag(f"{record.TAG_BEST_PREFIX}{key}", str(value)[:_MAX_TAG_CHARS]) for key, value in best.params.items()]
        self._client.log_batch(run_id, metrics=metrics, tags=tags[:_MAX_PARAMS_TAGS_PER_BATCH])


# --------------------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------------------

_FigurePair = tuple["PlotlyFigure", "MplFigure"]


def _best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best complete trial of a single-objective study, or ``None`` (no complete trial, or several objectives)."""
    try:
        return study.best_trial
    except (ValueError, RuntimeError):
        return None


def _render_plots(study: optuna.Study, client: MlflowClient, out_dir: Path) -> list[str]:
    """Write ``<name>.png`` (matplotlib) for every plot that applies, and all of them as interactive plotly figures
    on one page, ``INTERACTIVE_PAGE``, sharing a single inlined plotly.js.

    A plot that cannot be drawn yet (too few trials, a missing parameter) is skipped with a debug message:
    plots are a view on the study and must never stop it. Returns the names written.
    """
    import matplotlib.pyplot as plt

    written, interactive = [], []
    for name, build in _plot_builders(study, client).items():
        with _isolated_plotting():
            try:
                pair = build()
            except Exception as err:  # optuna raises ValueError/RuntimeError/ZeroDivisionError on thin studies
                log.debug("plot %s skipped: %s", name, err)
                continue
            if pair is None:
                continue
            plotly_fig, mpl_fig = pair
            interactive.append(plotly_fig.to_html(include_plotlyjs=not interactive, full_html=False, div_id=name))
            mpl_fig.savefig(out_dir / f"{name}.png", dpi=100, bbox_inches="tight")
            plt.close(mpl_fig)
        written.append(name)
    if interactive:
        title = f"kfac-tune study {study.study_name}"
        (out_dir / INTERACTIVE_PAGE).write_text(
            f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title></head>\n'
            f"<body><h2>{html.escape(title)}</h2>\n" + "\n".join(interactive) + "\n</body></html>\n",
            encoding="utf-8")
    return written


@contextmanager
def _isolated_plotting() -> Iterator[None]:
    """Keep optuna's matplotlib backend from leaking into the process.

    It calls ``plt.style.use("ggplot")`` (global rcParams) and warns (ExperimentalWarning, "no trials"); the
    rc context restores the style and the warnings stay inside.
    """
    import matplotlib

    with matplotlib.rc_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _plot_builders(study: optuna.Study, client: MlflowClient) -> dict[str, Callable[[], _FigurePair | None]]:
    """The plots of a study, by stable artifact name.

    Importances only from ``MIN_TRIALS_FOR_IMPORTANCE`` complete trials on, the lr x damping contour only when
    both are searched, the Pareto front only for several objectives.
    """
    from optuna.trial import TrialState

    builders: dict[str, Callable[[], _FigurePair | None]] = {
        "optimization_history": lambda: _optuna_pair("plot_optimization_history", study),
        "intermediate_values": lambda: _optuna_pair("plot_intermediate_values", study),
        "best_loss_curves": lambda: _curves_pair(_best_curves(study, client)),
    }
    if len(study.directions) > 1:  # (metric, train_seconds): the trade-off export --pick chooses from
        builders["pareto_front"] = lambda: _optuna_pair("plot_pareto_front", study,
                                                        target_names=study.metric_names or None)
    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= MIN_TRIALS_FOR_IMPORTANCE:
        builders["param_importances"] = lambda: _optuna_pair("plot_param_importances", study)
    searched = {name for trial in study.get_trials(deepcopy=False) for name in trial.distributions}
    if set(CONTOUR_PARAMS) <= searched:
        builders["lr_damping_contour"] = lambda: _optuna_pair("plot_contour", study, params=list(CONTOUR_PARAMS))
    return builders


def _optuna_pair(function: str, study: optuna.Study, **kwargs: Any) -> _FigurePair | None:
    """The same optuna plot from its plotly and its matplotlib backend; ``None`` before any trial finished."""
    import optuna.visualization as plotly_plots
    import optuna.visualization.matplotlib as mpl_plots
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        return None
    plotly_fig = getattr(plotly_plots, function)(study, **kwargs)
    axes = getattr(mpl_plots, function)(study, **kwargs)
    mpl_fig = axes.flat[0].figure if hasattr(axes, "flat") else axes.figure
    return plotly_fig, mpl_fig


Curves = dict[str, tuple[list[int], list[float]]]


def _best_curves(study: optuna.Study, client: MlflowClient, count: int = BEST_CURVES) -> Curves:
    """``eval_loss`` curves of the best complete trials, from their runs; Optuna's reports when a run has none."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    if len(study.directions) != 1:
        return {}
    reverse = study.direction == StudyDirection.MAXIMIZE
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = sorted((t for t in complete if t.value is not None), key=lambda t: t.value, reverse=reverse)[:count]
    curves: Curves = {}
    for trial in best:
        label = f"trial-{trial.number} ({trial.value:.4g})"
        run_id = record.trial_run_id(trial)
        history = client.get_metric_history(run_id, CURVE_METRIC) if run_id else []
        if history:
            points = sorted((m.step, m.value) for m in history)
        else:
            points = sorted(trial.intermediate_values.items())
        curves[label] = ([step for step, _ in points], [value for _, value in points])
    return curves


def _curves_pair(curves: Curves) -> _FigurePair | None:
    """Overlay of loss curves, log-scaled when every value is positive; ``None`` without curves."""
    if not curves:
        return None
    import plotly.graph_objects as go
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    values = [v for _, ys in curves.values() for v in ys if math.isfinite(v)]
    log_y = bool(values) and min(values) > 0
    title = f"{CURVE_METRIC} of the best {len(curves)} trials"

    plotly_fig = go.Figure([go.Scatter(x=xs, y=ys, mode="lines+markers", name=k) for k, (xs, ys) in curves.items()])
    plotly_fig.update_layout(title=title, xaxis_title="step", yaxis_title=CURVE_METRIC)
    if log_y:
        plotly_fig.update_yaxes(type="log")

    mpl_fig = Figure(figsize=(8, 5))
    axes = mpl_fig.add_subplot()
    for label, (xs, ys) in curves.items():
        axes.plot(xs, ys, marker=".", label=label)
    axes.set(title=title, xlabel="step", ylabel=CURVE_METRIC, yscale="log" if log_y else "linear")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend()
    return plotly_fig, mpl_fig


# --------------------------------------------------------------------------------------------------------------
# Experiments and comparisons
# --------------------------------------------------------------------------------------------------------------


def get_or_create_experiment(client: MlflowClient, tracking_uri: str, name: str) -> str:
    """Look the experiment up, create it if missing (artifacts next to a local store); a lost creation race falls
    back to the lookup."""
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    root = local_artifact_root(tracking_uri)
    try:
        # The kind tag makes the MLflow UI open the experiment as "Model training" (run tables, metrics), not as
        # the GenAI overview where training runs are not listed.
        return client.create_experiment(name, artifact_location=root and root.as_uri(),
                                        tags={"mlflow.experimentKind": "custom_model_development"})
    except Exception:
        existing = client.get_experiment_by_name(name)
        if existing is None:
            raise
        return existing.experiment_id


def log_comparison(tracking_uri: str, experiment: str, run_name: str, *, params: dict[str, str],
                   summary: dict[str, float], curves: dict[str, list[tuple[int, float]]], files: list[Path]) -> str:
    """One finished run holding a ``kfac-tune compare``: summary metrics, mean curves by step, the plot and table.

    Not retried like trial logging: a comparison is logged once at its end, and the CLI reports a failure.
    """
    from mlflow.entities import Metric, Param, RunTag

    prepare_store(tracking_uri)
    client = _client(tracking_uri)
    experiment_id = get_or_create_experiment(client, tracking_uri, experiment)
    run = client.create_run(experiment_id, run_name=run_name, tags={record.TAG_KIND: record.KIND_COMPARE})
    now = int(time.time() * 1000)
    metrics = [Metric(key, value, now, 0) for key, value in summary.items()]
    metrics += [Metric(key, value, now, step) for key, points in curves.items() for step, value in points]
    for start in range(0, len(metrics), _MAX_METRICS_PER_BATCH):
        client.log_batch(run.info.run_id, metrics=metrics[start : start + _MAX_METRICS_PER_BATCH])
    client.log_batch(run.info.run_id, params=[Param(k, v[:_MAX_PARAM_CHARS]) for k, v in params.items()],
                     tags=[RunTag("kfac_tune.recipes", params.get("recipes", ""))])
    for path in files:
        client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id)
    return run.info.run_id
