"""A search killed with SIGKILL mid-trial resumes: budget met, completed trials kept, nothing duplicated, the
killed trial failed by the heartbeat and retried with the same parameters.

Heartbeat 1 s, grace 2 s (from the YAML), so the test only waits seconds for the zombie trial to be noticed.
"""
from __future__ import annotations

import signal
import time
from pathlib import Path

import optuna
import pytest

from tests.search_support import cli, cli_popen, load_study, stop, write_config

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]
BUDGET = 4


def test_sigkill_mid_study_then_resume(tmp_path: Path) -> None:
    config = write_config(tmp_path, training={"steps": 200, "eval_every": 50},
                          search={"trials": BUDGET, "heartbeat_interval": 1, "grace_period": 2, "pruner": "none"})
    storage = f"sqlite:///{tmp_path / 'study.db'}"

    process = cli_popen("search", str(config), "--no-tracking", cwd=tmp_path)
    try:
        study = _wait_for_completed_and_running(process, storage, timeout_s=300)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        stop(process)
    before = {t.number: (t.state, t.value, t.params) for t in study.get_trials() if t.state.name == "COMPLETE"}
    killed = [t.number for t in study.get_trials() if t.state.name == "RUNNING"]
    assert before and len(killed) == 1

    time.sleep(3)  # past the grace period: the next run's first trial start fails the zombie
    result = cli("search", str(config), "--no-tracking", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr

    trials = load_study(storage, "model").get_trials()
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == BUDGET
    for number, (state, value, params) in before.items():  # kept, untouched
        assert (trials[number].state, trials[number].value, trials[number].params) == (state, value, params)
    zombie = trials[killed[0]]
    assert zombie.state.name == "FAIL"
    retries = [t for t in trials if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t)
               == zombie.number]
    # The retry re-runs the zombie's point: every parameter the zombie had sampled before it was killed (a kill
    # can land between two suggestions) is carried over unchanged.
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE"
    assert zombie.params and all(retries[0].params[k] == v for k, v in zombie.params.items())
    complete_points = [tuple(sorted(t.params.items())) for t in trials if t.state.name == "COMPLETE"]
    assert len(complete_points) == len(set(complete_points)), "a completed point was run twice"
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]

    again = cli("search", str(config), "--no-tracking", cwd=tmp_path)  # budget met: nothing more runs
    assert again.returncode == 0 and len(load_study(storage, "model").get_trials()) == len(trials)


def _wait_for_completed_and_running(process, storage: str, timeout_s: float) -> optuna.Study:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"search ended early:\n{process.stdout.read()}"
        try:
            study = load_study(storage, "model")
            states = [t.state.name for t in study.get_trials()]
        except Exception:  # storage or study not created yet
            states = []
        if "COMPLETE" in states and "RUNNING" in states:
            return study
        time.sleep(0.2)
    raise AssertionError("no trial completed in time")


# Ctrl-C (exit 130, resume message, the MLflow child run KILLED): tests/faults/test_fault_tracking.py


def test_a_trial_whose_worker_died_before_its_first_heartbeat_is_failed_and_retried(tmp_path: Path) -> None:
    """A worker killed between taking a trial and its heartbeat thread's first write leaves a RUNNING trial that
    never beat, which Optuna's own check skips (it looks only at trials with a heartbeat). ``fail_stale_trials``
    fails and retries it once it is older than the grace period, and leaves alone a trial whose heartbeat is fresh
    and one as young as a trial a live worker has just taken."""
    from optuna.trial import TrialState

    from kfac_tune.config import parse_config
    from kfac_tune.search.storage import make_storage
    from kfac_tune.search.study import fail_stale_trials
    from tests.search_support import tiny_config

    config = tiny_config(tmp_path, search={"heartbeat_interval": 1, "grace_period": 2})
    study = optuna.create_study(storage=make_storage(config["storage"], parse_config(config)), study_name="s")
    never_beat, beating = study.ask(), study.ask()  # study.ask() starts no heartbeat thread: a worker killed at once
    time.sleep(2.5)  # past the 2 s grace period (a configured period, not a speed expectation)
    study._storage.record_heartbeat(beating._trial_id)
    young = study.ask()
    fail_stale_trials(study)

    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert states[never_beat.number] == TrialState.FAIL
    assert states[beating.number] == states[young.number] == TrialState.RUNNING
    retries = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert [t.system_attrs["failed_trial"] for t in retries] == [never_beat.number]
