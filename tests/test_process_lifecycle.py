"""Nothing kfac-tune starts outlives it, and concurrent starts do not trip over each other.

Each test marks the processes it starts with a variable of its own (every child inherits the environment), so
after a signal it finds *every* process that command started, the MLflow server's uvicorn worker, search
workers and orphans re-parented to PID 1 included, and waits until none is left. Waits are liveness bounds (a
minute), never speed targets: on an idle machine everything is gone within a second or two.
"""
from __future__ import annotations

import http.server
import signal
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.browser_support import free_port
from tests.process_support import HAS_PROC, HOLD_VARIABLE, cmdline, marked, wait_gone
from tests.search_support import cli, cli_popen, load_study, stop, write_config

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HAS_PROC, reason="reads the process table from /proc")]

MARK = "KFAC_TUNE_TEST_MARK"
SIGNALS = [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL]
START_S = 600.0  # liveness bound for a CLI to start or stop on a loaded 2-core machine


@pytest.fixture
def mark(monkeypatch: pytest.MonkeyPatch) -> str:
    """A value of ``KFAC_TUNE_TEST_MARK`` unique to this test, inherited by everything it starts."""
    value = uuid.uuid4().hex
    monkeypatch.setenv(MARK, value)
    return value


def _started(value: str) -> list[int]:
    return marked(MARK, value)


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_for(condition, what: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_S
    while not condition():
        assert process.poll() is None, f"exited with {process.returncode} while waiting for {what}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no {what} within {START_S} s:\n{log.read_text()}"
        time.sleep(0.5)


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def _assert_all_gone(value: str, process: subprocess.Popen) -> None:
    process.wait(timeout=START_S)
    left = wait_gone(lambda: _started(value), deadline_s=START_S)
    assert not left, "still running: " + "; ".join(f"{pid} {cmdline(pid)[:150]}" for pid in left)


@pytest.mark.parametrize("signum", SIGNALS, ids=[s.name for s in SIGNALS])
def test_ui_and_its_server_stop_on_a_signal(tmp_path: Path, mark: str, signum: signal.Signals) -> None:
    """SIGTERM and SIGHUP stop ``kfac-tune ui`` as Ctrl-C does; after SIGKILL its supervisor notices. Either
    way the mlflow server and its uvicorn worker are gone and the port is free again."""
    port = free_port()
    log = tmp_path / "ui.log"
    with log.open("w") as output:
        ui = cli_popen("ui", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--port", str(port),
                       cwd=tmp_path, output=output)
    try:
        # ready when ui says so (it is serving then), not merely when the port answers: a signal before that
        # interrupts the start-up, a different path (exit 130)
        _wait_for(lambda: "MLflow UI for" in log.read_text() and _healthy(port), "the UI", ui, log)
        started = _started(mark)
        assert any("uvicorn" in cmdline(pid) for pid in started), [cmdline(pid) for pid in started]
        ui.send_signal(signum)
        _assert_all_gone(mark, ui)
        assert wait_gone(lambda: [] if _port_free(port) else [port]) == [], f"port {port} still taken"
        if signum != signal.SIGKILL:
            assert ui.returncode == 0, log.read_text()
    finally:
        stop(ui)


class _AnotherServer(http.server.BaseHTTPRequestHandler):
    """Answers every GET with 200, as another MLflow server's ``/health`` would."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args: object) -> None:
        pass


def test_ui_on_a_port_in_use_says_so_in_one_line(tmp_path: Path, mark: str) -> None:
    """Another server answers on the port: one line naming the port, exit 1, no links (they would open that
    server's store), nothing left running."""
    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AnotherServer)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    port = other.server_address[1]
    try:
        result = cli("ui", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--port", str(port), cwd=tmp_path,
                     timeout=START_S)
    finally:
        other.shutdown()
        other.server_close()
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port {port}" in lines[0] and "in use" in lines[0], result.stderr
    assert not _started(mark)


def _running_trials(storage: str) -> int:
    from optuna.trial import TrialState

    try:
        study = load_study(storage, "model")
    except Exception:  # the study is not created yet
        return 0
    return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


@pytest.mark.parametrize("signum", SIGNALS, ids=[s.name for s in SIGNALS])
def test_search_workers_stop_with_the_search(tmp_path: Path, mark: str, signum: signal.Signals) -> None:
    """``search --jobs 2`` signalled (or killed) mid-trial: both workers are interrupted and exit; nothing keeps
    training to the budget. (Whether a worker interrupted as it starts a trial marks it FAIL itself, or leaves it
    to the heartbeat, depends on where the signal lands, so it is not asserted here; see the stale-trial test.)"""
    config = write_config(tmp_path, training={"steps": 1_000_000, "eval_every": 50}, search={"trials": 4})
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    log = tmp_path / "search.log"
    with log.open("w") as output:
        search = cli_popen("search", str(config), "--jobs", "2", "--no-tracking", cwd=tmp_path, output=output)
    try:
        _wait_for(lambda: _running_trials(storage) == 2, "two running trials", search, log)
        search.send_signal(signum)
        _assert_all_gone(mark, search)
        if signum != signal.SIGKILL:
            assert search.returncode == 130, log.read_text()
    finally:
        stop(search)


def test_searches_started_together_on_fresh_sqlite_stores_all_succeed(tmp_path: Path) -> None:
    """Three ``search`` processes at the same moment on new study and MLflow SQLite files, twice: all exit
    0, with one study and one MLflow parent run (the set-up is serialised by a lock beside each database)."""
    from mlflow import MlflowClient

    for attempt in range(2):
        where = tmp_path / f"attempt{attempt}"
        where.mkdir()
        config = write_config(where, training={"steps": 20, "eval_every": 10}, search={"trials": 3},
                              tracking={"enabled": True})
        logs = [(where / f"search{i}.log").open("w") for i in range(3)]
        searches = [cli_popen("search", str(config), cwd=where, output=log) for log in logs]
        try:
            codes = [s.wait(timeout=600) for s in searches]
        finally:
            for search, log in zip(searches, logs):
                stop(search)
                log.close()
        assert codes == [0, 0, 0], "\n\n".join((where / f"search{i}.log").read_text() for i in range(3))
        study = load_study(f"sqlite:///{where / 'study.db'}", "model")
        assert sum(t.state.name == "COMPLETE" for t in study.trials) >= 3
        client = MlflowClient(f"sqlite:///{where / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("model").experiment_id])
        assert sum("mlflow.parentRunId" not in r.data.tags for r in runs) == 1, "one parent run per study"


def test_a_killed_trial_is_failed_by_the_next_search_even_when_the_budget_is_met(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A search killed mid-trial leaves it RUNNING; once its heartbeat is older than the grace period, the
    next ``search`` fails it and re-enqueues it, although that search has no trial left to run."""
    from optuna.trial import TrialState

    config = write_config(tmp_path, model={"callable": "tests.process_support:held_mlp"}, optimizer="adam",
                          search={"trials": 2, "heartbeat_interval": 1, "grace_period": 2, "pruner": "none"})
    first = cli("search", str(config), "--no-tracking", cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    storage = f"sqlite:///{tmp_path / 'study.db'}"

    log = tmp_path / "killed.log"
    monkeypatch.setenv(HOLD_VARIABLE, "1")  # the third trial waits in its first forward pass
    with log.open("w") as output:
        killed = cli_popen("search", str(config), "--trials", "3", "--no-tracking", cwd=tmp_path, output=output)
    monkeypatch.delenv(HOLD_VARIABLE)
    try:
        _wait_for(lambda: _running_trials(storage) == 1, "a running trial", killed, log)
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=60)
    finally:
        stop(killed)
    assert _running_trials(storage) == 1
    time.sleep(3)  # past the 2 s grace period (a configured period, not a speed expectation)

    again = cli("search", str(config), "--no-tracking", cwd=tmp_path)  # budget 2: met, no trial to run
    assert again.returncode == 0, again.stdout + again.stderr
    trials = load_study(storage, "model").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "FAIL", "WAITING"]
    assert trials[3].params == trials[2].params and trials[3].system_attrs["failed_trial"] == 2  # the retry
