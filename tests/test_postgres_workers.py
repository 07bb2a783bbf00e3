"""Three ``kfac-tune search`` workers on one PostgreSQL study, logging to one MLflow tracking server.

What a cluster user relies on (README "Scaling out", docker/README.md), with the real pieces: a PostgreSQL server
(tests/postgres_support.py), an ``mlflow server`` whose backend is a second database of that server, and each
worker a separate ``kfac-tune search CONFIG --storage URL`` process, password only in ``PGPASSWORD``.

The scenario is sequenced by a gate file instead of timing (tests/faults/fault_models.py ``gated_mlp``): every
worker's second trial waits for the gate, so once three trials are RUNNING each worker is known to be mid-trial.
One is then killed with SIGKILL; after the heartbeat grace period (1 s heartbeat, 2 s grace, from the YAML) the
gate opens, and the survivors' next trial start fails the zombie and re-enqueues it, so one of them retries it.

All workers start at the same moment on a fresh study, as a cluster's do (docker compose starts them together):
setting the study up is check-then-create, so this also checks that ``setup_lock`` leaves one study and one MLflow
parent run.
"""
from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import IO

import optuna
import pytest

from kfac_tune import record
from tests.faults.conftest import FAULT_MODELS, mlflow_server, stop, wait_for
from tests.postgres_support import PostgresServer, postgres  # noqa: F401  (the fixture)
from tests.search_support import cli_popen, load_study, write_config

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]
WORKERS, BUDGET, GRACE_S = 3, 7, 2
STUDY = "model"
FINISHED = ("COMPLETE", "PRUNED")
# What a storage or tracking store under contention says when it is not coping.
CONTENTION = re.compile(r"database is locked|deadlock detected|could not serialize|could not connect|"
                        r"connection refused|server closed the connection|too many (clients|connections)|"
                        r"OperationalError|InterfaceError|QueuePool limit", re.IGNORECASE)


def test_workers_share_budget_survive_sigkill_and_log_to_one_parent(
    postgres: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    monkeypatch.chdir(tmp_path)  # the MLflow server's artifact directory lands here
    storage, gate = postgres.url(), tmp_path / "gate"
    with mlflow_server(postgres.create_database("mlflow")) as (tracking_uri, _, _):
        config = write_config(
            tmp_path,
            model={"callable": f"{FAULT_MODELS}:gated_mlp", "kwargs": {"gate": str(gate), "wait_s": 600}},
            search={"trials": BUDGET, "heartbeat_interval": 1, "grace_period": GRACE_S},
            tracking={"enabled": True, "uri": tracking_uri},
        )
        with contextlib.ExitStack() as files:
            logs = [files.enter_context(open(tmp_path / f"worker-{i}.log", "w+")) for i in range(WORKERS)]
            workers = [cli_popen("search", str(config), "--storage", storage, cwd=tmp_path, output=log)
                       for log in logs]
            running_at_kill = _kill_one_mid_trial(workers, storage, gate)
            outputs = [_read(log) for log in logs]
        assert [workers[0].returncode, workers[2].returncode] == [0, 0], "\n---\n".join(outputs)
        for output in outputs:
            assert not CONTENTION.search(output), output

        trials = load_study(storage, STUDY).get_trials()
        _assert_budget(trials)
        _assert_zombie_retried(trials, running_at_kill)
        _assert_one_parent_run(tracking_uri, load_study(storage, STUDY), trials)


def _kill_one_mid_trial(workers: list[subprocess.Popen[str]], storage: str, gate: Path) -> set[int]:
    """Once every worker waits at the gate, SIGKILL worker 1, let its heartbeat go stale, open the gate and wait
    for the survivors to finish the study. Returns the trials that were running at the kill."""
    try:
        # every worker waits at the gate (each says so with a file): the victim is mid-trial for certain, not
        # between two trials or between Optuna handing out its trial and its MLflow run (CI once hit each)
        wait_for(lambda: len(list(gate.parent.glob(f"{gate.name}.waiting.*"))) == WORKERS,
                 "every worker mid-trial (at the gate)")
        running = {t.number for t in load_study(storage, STUDY).get_trials() if t.state.name == "RUNNING"}
        workers[1].send_signal(signal.SIGKILL)
        workers[1].wait(timeout=60)
        time.sleep(GRACE_S + 1)  # the victim's last heartbeat is now older than the grace period
        gate.touch()
        for survivor in (workers[0], workers[2]):
            survivor.wait(timeout=600)
        return running
    finally:
        for process in workers:
            stop(process)


def _assert_budget(trials: list[optuna.trial.FrozenTrial]) -> None:
    """The budget is global and a worker starts no trial once it is met, but trials already running then still
    finish: with W workers the study ends with between N and N + W - 1 finished trials (README "Scaling out").
    Nothing is left RUNNING or WAITING."""
    finished = [t for t in trials if t.state.name in FINISHED]
    assert BUDGET <= len(finished) <= BUDGET + WORKERS - 1, [t.state.name for t in trials]
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]


def _assert_zombie_retried(trials: list[optuna.trial.FrozenTrial], running_at_kill: set[int]) -> None:
    """Exactly one trial failed, one of those running when the worker was killed (so the heartbeat failed it: no
    other trial fails in this scenario), retried once with the same parameters by
    a surviving worker, and the retry finished."""
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert len(failed) == 1, [(t.number, t.state.name) for t in trials]
    zombie = failed[0]
    assert zombie.number in running_at_kill
    retries = [t for t in trials if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t)
               == zombie.number]
    assert len(retries) == 1 and retries[0].params == zombie.params and retries[0].state.name in FINISHED


def _assert_one_parent_run(tracking_uri: str, study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> None:
    """The experiment holds one parent run (the study's) and every trial of every worker, the killed attempt
    included, is a child run of it."""
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(STUDY)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags]
    assert [r.info.run_id for r in parents] == [study.user_attrs[record.PARENT_RUN]]
    children = {r.info.run_id: r for r in runs if MLFLOW_PARENT_RUN_ID in r.data.tags}
    assert {r.data.tags[MLFLOW_PARENT_RUN_ID] for r in children.values()} == {parents[0].info.run_id}
    assert sorted(t.user_attrs[record.TRIAL_RUN] for t in trials) == sorted(children)
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children.values()) == [t.number for t in trials]


def _read(log: IO[str]) -> str:
    log.flush()
    log.seek(0)
    return log.read()


def test_setup_lock_serialises_study_setup(postgres: PostgresServer) -> None:  # noqa: F811
    """Two processes setting the same study up at once take turns (the second enters after the first leaves);
    another study is not held up. Threads stand for processes: each lock holds its own database session."""
    import threading

    from kfac_tune.search.study import setup_lock

    events: list[str] = []
    holding = threading.Event()

    def first() -> None:
        with setup_lock(postgres.url(), STUDY):
            events.append("first in")
            holding.set()
            with setup_lock(postgres.url(), "another-study"):
                events.append("other study in")
            time.sleep(1.0)
            events.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    assert holding.wait(timeout=60)
    with setup_lock(postgres.url(), STUDY):
        events.append("second in")
    thread.join(timeout=60)
    assert events == ["first in", "other study in", "first out", "second in"]
