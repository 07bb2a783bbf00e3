"""The MLflow store and its server: a client per URI, the store created or migrated once, ``/health`` probed,
experiments created, and ``kfac-tune ui``'s ``mlflow server`` run under kfac-tune's process supervisor.

mlflow is imported inside functions because importing it costs ~3 s, which the CLI's ``--help`` and the
non-tracking commands should not pay.
"""
from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from kfac_tune.filelock import sqlite_file, sqlite_setup_lock
from kfac_tune.stores import check_database_file
from kfac_tune.tracking.logs import without_messages

if TYPE_CHECKING:
    from mlflow import MlflowClient

ARTIFACT_DIR_NAME = "mlartifacts"
# log_batch limits of the MLflow REST API; keys and tags beyond them are rejected, not truncated.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_TAG_CHARS = 5000
MAX_PARAM_CHARS = 6000


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server named by the URI does not answer."""


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

    - Cap its built-in retries (default 7, minutes of backoff per call): our own loop (:class:`kfac_tune.tracking.runs.StoreCalls`)
      decides how long a trial may wait for a dead server.
    - Stop it printing two "View run" links (after an extra ``get_run`` round trip) every time a run ends,
      which would interleave with the CLI's output once per trial.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def client_uri(tracking_uri: str) -> str:
    """The URI to give MLflow's client: an HTTP URI's ``user:password@`` moved into MLflow's basic-auth variables
    (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``, read per request). MLflow parses the URI itself and cuts a raw
    ``#``, ``/`` or ``?`` of the password, sending the rest as the host; the URL given explicitly wins over the
    environment."""
    if not _is_http(tracking_uri):
        return tracking_uri
    from kfac_tune.secrets import url_credentials

    bare, credentials = url_credentials(tracking_uri)
    if credentials is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = credentials
    return bare


def open_client(tracking_uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    if _is_http(tracking_uri):
        _configure_http_client()
    return MlflowClient(tracking_uri=client_uri(tracking_uri))


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
    check_database_file(tracking_uri, "MLflow tracking store")
    # two searches started together on a fresh store; the lock creates the database's directory (or says why not)
    with sqlite_setup_lock(tracking_uri), without_messages(  # MLflow's INFO lines about building its schema
            "mlflow.store.db.utils", "Creating initial MLflow database tables", "Updating database tables"):
        open_client(tracking_uri).search_experiments(max_results=1)


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
        f"(kfac-tune ui / mlflow server) or pass a sqlite:/// tracking URI.")


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
    command = [sys.executable, "-m", "mlflow", "server", "--artifacts-destination", artifact_root.as_uri(),
               "--host", host, "--port", str(port), "--workers", str(workers)]  # fmt: skip
    # The store's URL may carry a password: any local user reads a command line (ps), only its owner reads the
    # environment, so the server (and the supervisor, which has the same argv) gets it there.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ, "MLFLOW_BACKEND_STORE_URI": tracking_uri}
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
