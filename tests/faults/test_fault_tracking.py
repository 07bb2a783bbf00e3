"""The MLflow tracking server failing: unreachable at start, dying mid-study, and the run of a Ctrl-C'd trial.

Real ``mlflow server`` processes and real SQLite stores; the search runs as a user runs it (a ``kfac-tune``
process) where a signal or a second process is part of the scenario.
"""
from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.faults.conftest import (
    WAIT_S, fault_config, free_port, invoke, listening_addresses, mlflow_server, mlflow_store_of, states_seen,
    storage_of, trials_of, wait_for,
)
from tests.search_support import cli_popen, stop

pytestmark = pytest.mark.slow


def test_unreachable_server_at_start_fails_fast_before_any_trial(in_tmp: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    config = fault_config(in_tmp, tracking=True)
    result = invoke("search", str(config), "--tracking-uri", url)
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"Error: MLflow tracking server {url} is not reachable")
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (in_tmp / "study.db").exists(), "a study was created although tracking could not work"


def test_server_dying_mid_study_costs_tracking_only(in_tmp: Path) -> None:
    """The server dies after the first trial, while the second is starting: every trial still runs, the study
    reaches its budget, the CLI exits 0 and warns; what reached the store before is kept. The server is
    kfac-tune's own (``serve_ui`` with its default host), so it also shows that it listens on loopback only."""
    gate = in_tmp / "server-killed"
    config = fault_config(in_tmp, "gated_mlp", trials=3, tracking=True, model_kwargs={"gate": str(gate)})
    with mlflow_server(mlflow_store_of(in_tmp / "server")) as (url, port, server):
        assert listening_addresses(port) == {"127.0.0.1"}
        process = cli_popen("search", str(config), "--tracking-uri", url, cwd=in_tmp)
        try:
            wait_for(lambda: states_seen(in_tmp, "COMPLETE"), "the first trial", alive=process)
            server.terminate()
            server.wait(timeout=60)
            gate.touch()
            output, _ = process.communicate(timeout=WAIT_S)
        finally:
            stop(process)
    assert process.returncode == 0, output
    assert "Traceback" not in output
    assert "Warning: MLflow" in output, output
    trials = trials_of(in_tmp)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    from mlflow import MlflowClient

    first = MlflowClient(mlflow_store_of(in_tmp / "server")).get_run(trials[0].user_attrs["mlflow_run_id"])
    assert first.info.status == "FINISHED" and first.data.tags["optuna.state"] == "COMPLETE"
    assert first.data.metrics["objective_value"] == pytest.approx(trials[0].value)


def test_ctrl_c_ends_the_trial_run_as_killed_and_says_how_to_resume(in_tmp: Path) -> None:
    """SIGINT during the second trial: exit 130 with the resume command, the trial FAILed as interrupted, its
    MLflow child run KILLED with the Optuna state and reason as tags, the first trial kept."""
    config = fault_config(in_tmp, trials=20, tracking=True, training={"steps": 400, "eval_every": 50})
    process = cli_popen("search", str(config), cwd=in_tmp)
    try:
        # Interrupt once the second trial is training: RUNNING in the study and its MLflow child run created.
        wait_for(lambda: states_seen(in_tmp, "COMPLETE") and any(
            t.state.name == "RUNNING" and "mlflow_run_id" in t.user_attrs for t in trials_of(in_tmp)),
            "a running second trial", alive=process)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=WAIT_S)
    finally:
        stop(process)
    assert process.returncode == 130, output
    assert "Resume with: kfac-tune search" in output and "Traceback" not in output
    trials = trials_of(in_tmp)
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    interrupted = [t for t in trials if t.state.name == "FAIL"]
    assert len(interrupted) == 1 and "interrupted" in interrupted[0].user_attrs["fail_reason"]
    assert any(t.state.name == "COMPLETE" for t in trials)
    from mlflow import MlflowClient

    run = MlflowClient(mlflow_store_of(in_tmp)).get_run(interrupted[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED"
    assert run.data.tags["optuna.state"] == "FAIL" and "interrupted" in run.data.tags["optuna.reason"]
    assert storage_of(in_tmp) in output or "study.db" in output
