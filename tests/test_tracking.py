"""kfac_tune.tracking against a real MLflow SQLite store, real Optuna studies, a real server and Chromium.

The store is migrated once per session (several seconds) and copied per test; the tracked study is run once
per module and shared by the assertions and the browser test.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import optuna
import pytest

from kfac_tune import tracking
from kfac_tune.tracking import StudyTracker, TrackingUnavailable

sys.path.insert(0, str(Path(__file__).parent))
from tracking_worker import EVAL_STEPS, FAILING_TRIAL, PRUNE_STEP, make_objective  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "model-yaml-test"
N_TRIALS = 7
PLOTS = ("optimization_history", "param_importances", "intermediate_values", "best_loss_curves", "lr_damping_contour")
ARTIFACTS = {"model.yaml": "model: {arch: mlp}\n", "space.yaml": "lr: {low: 1.0e-4, high: 1.0, log: true}\n"}

optuna.logging.set_verbosity(optuna.logging.WARNING)


def sqlite_uri(path: Path) -> str:
    return f"sqlite:///{path}"


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One freshly migrated MLflow database; tests copy it instead of paying the migration again."""
    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    tracking.prepare_store(sqlite_uri(db))
    return db


def copy_store(template: Path, directory: Path) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(template, directory / "mlflow.db")
    return sqlite_uri(directory / "mlflow.db")


def new_study(directory: Path, name: str) -> tuple[optuna.Study, str]:
    storage = sqlite_uri(directory / "optuna.db")
    study = optuna.create_study(study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler(seed=0))
    return study, storage


def child_runs(tracking_uri: str, experiment_id: str, parent_id: str) -> list:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri).search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )


@dataclass
class TrackedStudy:
    tracking_uri: str
    study: optuna.Study
    tracker: StudyTracker
    parent_id: str


@pytest.fixture(scope="module")
def tracked_study(migrated_db: Path, tmp_path_factory: pytest.TempPathFactory) -> TrackedStudy:
    """A finished 7-trial study: pruned trials 2 and 5, trial 3 failing, the others complete."""
    directory = tmp_path_factory.mktemp("tracked")
    uri = copy_store(migrated_db, directory)
    study, _ = new_study(directory, "quadratic")
    tracker = StudyTracker(uri, EXPERIMENT, study.study_name)
    parent_id = tracker.ensure_parent_run(study, {"kfac_tune.config_sha256": "abc123"}, ARTIFACTS)
    study.optimize(make_objective(tracker), n_trials=N_TRIALS, catch=(RuntimeError,))
    recipe = directory / "recipe.yaml"
    recipe.write_text("optimizer: kfac\nlr: 0.01\n")
    tracker.finish_study(study, str(recipe))
    return TrackedStudy(uri, study, tracker, parent_id)


def test_parent_run_has_tags_artifacts_plots_and_is_finished(tracked_study: TrackedStudy) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracked_study.tracking_uri)
    parent = client.get_run(tracked_study.parent_id)
    assert tracked_study.study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    assert parent.info.run_name == "quadratic" and parent.info.status == "FINISHED"
    assert parent.data.tags["kfac_tune.config_sha256"] == "abc123"
    assert parent.data.tags["optuna.study_name"] == "quadratic"
    assert parent.data.tags["best.trial"] == str(tracked_study.study.best_trial.number)
    counts = {name: parent.data.metrics[f"n_{name.lower()}"] for name in ("COMPLETE", "PRUNED", "FAIL")}
    assert counts == {"COMPLETE": 4, "PRUNED": 2, "FAIL": 1}  # trials 2 and 5 pruned, 3 failed
    files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"model.yaml", "space.yaml", "recipe.yaml", "plots"} <= files
    plots = {a.path: a.file_size for a in client.list_artifacts(parent.info.run_id, "plots")}
    expected = {f"plots/{name}.{ext}" for name in PLOTS for ext in ("html", "png")}
    assert expected <= set(plots), sorted(expected - set(plots))
    assert all(plots[path] > 1000 for path in expected)
    artifact_dir = Path(tracked_study.tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts"
    assert parent.info.artifact_uri == f"{artifact_dir.as_uri()}/{parent.info.run_id}/artifacts"


def test_every_trial_is_a_child_run_with_params_curves_and_outcome(tracked_study: TrackedStudy) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracked_study.tracking_uri)
    runs = child_runs(tracked_study.tracking_uri, tracked_study.tracker.experiment_id, tracked_study.parent_id)
    by_name = {run.info.run_name: run for run in runs}
    assert sorted(by_name) == [f"trial-{n}" for n in range(N_TRIALS)]
    for trial in tracked_study.study.trials:
        run = by_name[f"trial-{trial.number}"]
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.data.tags["optuna.trial_number"] == str(trial.number)
        assert set(run.data.params) == {"lr", "damping"}
        assert float(run.data.params["lr"]) == pytest.approx(trial.params["lr"])
        state = run.data.tags["optuna.state"]
        assert state == trial.state.name
        if state == "FAIL":
            assert trial.number == FAILING_TRIAL and run.info.status == "FAILED"
            assert run.data.tags["optuna.reason"] == "RuntimeError: boom: diverged on purpose"
            continue
        assert run.info.status == "FINISHED"
        curve = client.get_metric_history(run.info.run_id, "eval_loss")
        steps = EVAL_STEPS if state == "COMPLETE" else PRUNE_STEP
        assert [m.step for m in sorted(curve, key=lambda m: m.step)] == list(range(1, steps + 1))
        odd = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "grad_norm")}
        assert math.isnan(odd[3]) and odd[1] > 1e300 and odd[2] < -1e300  # NaN and ±inf survived
        if state == "PRUNED":
            assert run.data.tags["optuna.reason"] == f"pruned at step {PRUNE_STEP}"
        else:
            assert run.data.metrics["objective_value"] == pytest.approx(trial.value)


def test_resumed_study_reattaches_to_the_same_parent(tracked_study: TrackedStudy) -> None:
    from mlflow import MlflowClient

    study = optuna.load_study(study_name="quadratic", storage=tracked_study.study._storage)
    tracker = StudyTracker(tracked_study.tracking_uri, EXPERIMENT, "quadratic")
    assert tracker.ensure_parent_run(study, {}, {}) == tracked_study.parent_id
    assert MlflowClient(tracked_study.tracking_uri).get_run(tracked_study.parent_id).info.status == "RUNNING"
    tracker.finish_study(study)


def test_two_worker_processes_share_one_parent(migrated_db: Path, tmp_path: Path) -> None:
    uri = copy_store(migrated_db, tmp_path)
    study, storage = new_study(tmp_path, "workers")
    tracker = StudyTracker(uri, EXPERIMENT, study.study_name)
    parent_id = tracker.ensure_parent_run(study, {}, ARTIFACTS)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(Path(__file__).parent / "tracking_worker.py"), storage, uri, EXPERIMENT,
               study.study_name, "3"]  # fmt: skip
    workers = [subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=180)
        assert worker.returncode == 0, err[-3000:]

    runs = child_runs(uri, tracker.experiment_id, parent_id)
    assert len(runs) == len(study.trials) == 6
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    for run in runs:
        if run.data.tags["optuna.state"] != "FAIL":
            assert len(client.get_metric_history(run.info.run_id, "eval_loss")) >= PRUNE_STEP
    all_runs = client.search_runs([tracker.experiment_id])
    assert [r.info.run_id for r in all_runs if "mlflow.parentRunId" not in r.data.tags] == [parent_id]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_ui(tracking_uri: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """``serve_ui`` on a free port; the server is stopped (SIGTERM, children included) on the way out."""
    port = free_port()
    process = tracking.serve_ui(tracking_uri, port=port)
    try:
        yield f"http://127.0.0.1:{port}", process
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        process.wait(timeout=30)


def chromium(url: str, *mode: str) -> str:
    """Run headless Chromium on ``url`` with one mode flag (--dump-dom / --screenshot=...); returns stdout."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        result = subprocess.run(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--window-size=1600,1000", "--virtual-time-budget=15000", *mode, url],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def visible_text(dom: str) -> str:
    """The page's text, without scripts, styles and markup."""
    import html
    import re

    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom)))


def test_ui_shows_the_study_its_trials_and_their_params(tracked_study: TrackedStudy) -> None:
    """The runs table lists the parent; its page lists the trial-N children; a child page shows lr and damping."""
    if shutil.which("chromium") is None and shutil.which("chromium-browser") is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    experiment_id = tracked_study.tracker.experiment_id
    best = tracked_study.study.best_trial
    with running_ui(tracked_study.tracking_uri) as (base_url, _):
        runs_page = tracking.experiment_url(base_url, experiment_id)
        screenshot = REPO / "artifacts" / "mlflow-training-runs.png"
        screenshot.parent.mkdir(exist_ok=True)
        chromium(runs_page, f"--screenshot={screenshot}")
        runs_text = visible_text(chromium(runs_page, "--dump-dom"))
        parent_text = visible_text(chromium(f"{runs_page}/{tracked_study.parent_id}", "--dump-dom"))
        child_text = visible_text(chromium(f"{runs_page}/{best.user_attrs['mlflow_run_id']}", "--dump-dom"))
    print(f"screenshot of {runs_page}: {screenshot}")
    assert screenshot.stat().st_size > 10_000
    assert "Training runs" in runs_text and "quadratic" in runs_text
    assert all(f"trial-{n}" in parent_text for n in range(N_TRIALS)), parent_text[:3000]
    assert "Parameters (2)" in child_text
    for name, value in best.params.items():
        assert f"{name} {value!r}" in child_text, (name, child_text[:3000])


def test_check_reachable_fails_fast_on_a_closed_port() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=url):
        tracking.check_reachable(url, timeout_s=5)
    assert time.monotonic() - start < 3
    tracking.check_reachable("sqlite:///nowhere/mlflow.db")  # databases are not probed


def test_trial_survives_the_server_dying_mid_trial(
    migrated_db: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from mlflow import MlflowClient

    uri = copy_store(migrated_db, tmp_path)
    study = optuna.create_study(study_name="http-study")
    with running_ui(uri) as (base_url, server):
        tracker = StudyTracker(base_url, EXPERIMENT, study.study_name)
        tracker.ensure_parent_run(study, {}, {})
        trial = study.ask()
        with caplog.at_level(logging.WARNING, logger="kfac_tune.tracking"):
            with tracker.trial_run(trial, {"lr": 0.1}) as run:
                run.log_eval(1, {"eval_loss": 1.0, "train_loss": 1.2})
                stop(server)
                start = time.monotonic()
                for step in range(2, 6):
                    run.log_eval(step, {"eval_loss": 1.0 / step, "train_loss": math.nan})
                run.set_outcome("COMPLETE", 0.2)
            elapsed = time.monotonic() - start
    assert "giving up" in caplog.text
    assert elapsed < 20, f"a dead server cost the trial {elapsed:.1f} s"
    history = MlflowClient(uri).get_metric_history(run.run_id, "eval_loss")
    assert [m.step for m in history] == [1]  # what was logged before the server died is kept
