"""kfac_tune.tracking against a real MLflow SQLite store, real Optuna studies, a real server and Chromium.

One store serves the whole session (its first migration takes seconds); each test works in its own experiment.
The tracked study is run once per module and shared by the assertions and the browser test.
"""
from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import optuna
import pytest

from kfac_tune import tracking
from kfac_tune.tracking import StudyTracker, TrackingUnavailable
from tests.search_support import stop

sys.path.insert(0, str(Path(__file__).parent))
from browser_support import chromium, free_port, has_chromium, visible_text  # noqa: E402
from tracking_worker import EVAL_STEPS, FAILING_TRIAL, PRUNE_STEP, make_objective, quadratic_loss  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "model-yaml-test"
N_TRIALS = 7
PLOTS = ("optimization_history", "intermediate_values", "best_loss_curves", "lr_damping_contour")
ARTIFACTS = {"model.yaml": "model: {arch: mlp}\n", "space.yaml": "lr: {low: 1.0e-4, high: 1.0, log: true}\n"}

optuna.logging.set_verbosity(optuna.logging.WARNING)


def sqlite_uri(path: Path) -> str:
    return f"sqlite:///{path}"


@pytest.fixture(scope="session")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One MLflow store for the whole session (its first migration takes seconds); tests use own experiments."""
    uri = sqlite_uri(tmp_path_factory.mktemp("store") / "mlflow.db")
    tracking.prepare_store(uri)
    return uri


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
def tracked_study(store_uri: str, tmp_path_factory: pytest.TempPathFactory) -> TrackedStudy:
    """A finished 7-trial study: pruned trials 2 and 5, trial 3 failing, the others complete."""
    directory = tmp_path_factory.mktemp("tracked")
    study, _ = new_study(directory, "quadratic")
    tracker = StudyTracker(store_uri, EXPERIMENT, study.study_name)
    parent_id = tracker.ensure_parent_run(study, {"kfac_tune.config_sha256": "abc123"}, ARTIFACTS)
    study.optimize(make_objective(tracker), n_trials=N_TRIALS, catch=(RuntimeError,))
    recipe = directory / "recipe.yaml"
    recipe.write_text("optimizer: kfac\nlr: 0.01\n")
    tracker.finish_study(study, str(recipe))
    return TrackedStudy(store_uri, study, tracker, parent_id)


def test_parent_run_has_tags_artifacts_plots_and_is_finished(tracked_study: TrackedStudy, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracked_study.tracking_uri)
    parent = client.get_run(tracked_study.parent_id)
    assert tracked_study.study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    assert parent.info.run_name == "quadratic" and parent.info.status == "FINISHED"
    assert parent.data.tags["kfac_tune.config_sha256"] == "abc123"
    assert parent.data.tags["optuna.study_name"] == "quadratic"
    assert parent.data.tags["best.trial"] == str(tracked_study.study.best_trial.number)
    counts = {name: parent.data.tags[f"trials.{name}"] for name in ("complete", "pruned", "fail")}
    assert counts == {"complete": "4", "pruned": "2", "fail": "1"}  # trials 2 and 5 pruned, 3 failed
    assert not any(key.startswith("n_") for key in parent.data.metrics)  # counters are no one-point charts
    files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"model.yaml", "space.yaml", "recipe.yaml", "plots"} <= files
    plots = {a.path: a.file_size for a in client.list_artifacts(parent.info.run_id, "plots")}
    expected = {f"plots/{name}.png" for name in PLOTS} | {f"plots/{tracking.INTERACTIVE_PAGE}"}
    assert expected <= set(plots), sorted(expected - set(plots))
    assert all(plots[path] > 1000 for path in expected)
    page = client.download_artifacts(parent.info.run_id, f"plots/{tracking.INTERACTIVE_PAGE}", str(tmp_path))
    page = Path(page).read_text()
    assert all(f'id="{name}"' in page for name in PLOTS)  # every interactive plot on the one page
    assert page.count("* plotly.js v") == 1  # with one copy of plotly.js (its licence header)
    assert "plots/param_importances.png" not in plots  # 4 complete trials: too few for PED-ANOVA
    artifact_dir = Path(tracked_study.tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts"
    assert parent.info.artifact_uri == f"{artifact_dir.as_uri()}/{parent.info.run_id}/artifacts"


def test_every_trial_is_a_child_run_with_params_curves_and_outcome(tracked_study: TrackedStudy) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracked_study.tracking_uri)
    runs = child_runs(tracked_study.tracking_uri, tracked_study.tracker.experiment_id, tracked_study.parent_id)
    by_name = {run.info.run_name: run for run in runs}
    suffix = {"COMPLETE": "", "PRUNED": " (pruned)", "FAIL": " (failed)"}
    names = {t.number: f"trial-{t.number}{suffix[t.state.name]}" for t in tracked_study.study.trials}
    assert sorted(by_name) == sorted(names.values())
    for trial in tracked_study.study.trials:
        run = by_name[names[trial.number]]
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
        assert run.info.status == ("FINISHED" if state == "COMPLETE" else "KILLED")
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


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C stand-in that pytest does not treat as the user aborting the session."""


@pytest.mark.parametrize(
    ("outcome", "error", "state", "reason", "status", "value"),
    [
        (None, None, "COMPLETE", None, "FINISHED", None),
        (("PRUNED", 0.5, "median pruner"), optuna.TrialPruned("step 4"), "PRUNED", "median pruner", "KILLED", 0.5),
        (None, optuna.TrialPruned(), "PRUNED", "pruned", "KILLED", None),
        (("COMPLETE", 1.0, None), ValueError("late"), "FAIL", "ValueError: late", "FAILED", None),
        (("FAIL", None, "diverged"), None, "FAIL", "diverged", "FAILED", None),
        (None, Interrupted(), "FAIL", "Interrupted", "KILLED", None),
    ],
)
def test_trial_outcome_combines_set_outcome_and_exit(
    store_uri: str, outcome: tuple | None, error: BaseException | None,
    state: str, reason: str | None, status: str, value: float | None,
) -> None:  # fmt: skip
    from mlflow import MlflowClient

    study = optuna.create_study(study_name="outcomes")
    tracker = StudyTracker(store_uri, "outcomes", study.study_name)
    tracker.ensure_parent_run(study, {}, {})
    with pytest.raises(type(error)) if error is not None else nullcontext():
        with tracker.trial_run(study.ask(), {"lr": 0.1}) as run:
            if outcome is not None:
                run.set_outcome(*outcome)
            if error is not None:
                raise error
    tracked = MlflowClient(store_uri).get_run(run.run_id)
    assert tracked.info.status == status
    assert tracked.data.tags["optuna.state"] == state
    assert tracked.data.tags.get("optuna.reason") == reason
    assert tracked.data.metrics.get("objective_value") == value


def test_plots_follow_the_study_size(store_uri: str) -> None:
    """No plot (and no error) without trials; importances from ten complete trials; curves without runs."""
    from mlflow import MlflowClient
    from optuna.distributions import FloatDistribution

    study = optuna.create_study(study_name="imported")
    tracker = StudyTracker(store_uri, "imported", study.study_name)
    parent_id = tracker.ensure_parent_run(study, {}, {})
    tracker.refresh_plots(study)
    assert MlflowClient(store_uri).list_artifacts(parent_id, "plots") == []

    space = {"lr": FloatDistribution(1e-4, 1.0, log=True), "damping": FloatDistribution(1e-5, 1e-1, log=True)}
    for i in range(10):  # imported results: Optuna reports, no MLflow runs behind them
        lr, damping = 10 ** (-3 + i / 5), 10 ** (-4 + i / 4)
        curve = {step: quadratic_loss(lr, damping, step) for step in range(1, EVAL_STEPS + 1)}
        study.add_trial(optuna.trial.create_trial(params={"lr": lr, "damping": damping}, distributions=space,
                                                  value=curve[EVAL_STEPS], intermediate_values=curve))  # fmt: skip
    tracker.refresh_plots(study)
    plots = {a.path for a in MlflowClient(store_uri).list_artifacts(parent_id, "plots")}
    assert {"plots/param_importances.png", "plots/best_loss_curves.png"} <= plots


def test_two_worker_processes_share_one_parent(store_uri: str, tmp_path: Path) -> None:
    study, storage = new_study(tmp_path, "workers")
    tracker = StudyTracker(store_uri, "workers", study.study_name)
    parent_id = tracker.ensure_parent_run(study, {}, ARTIFACTS)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(Path(__file__).parent / "tracking_worker.py"), storage, store_uri, "workers",
               study.study_name, "3"]  # fmt: skip
    workers = [subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=180)
        assert worker.returncode == 0, err[-3000:]

    runs = child_runs(store_uri, tracker.experiment_id, parent_id)
    assert len(runs) == len(study.trials) == 6
    from mlflow import MlflowClient

    client = MlflowClient(store_uri)
    for run in runs:
        if run.data.tags["optuna.state"] != "FAIL":
            assert len(client.get_metric_history(run.info.run_id, "eval_loss")) >= PRUNE_STEP
    all_runs = client.search_runs([tracker.experiment_id])
    assert [r.info.run_id for r in all_runs if "mlflow.parentRunId" not in r.data.tags] == [parent_id]


@contextmanager
def running_ui(tracking_uri: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """``serve_ui`` on a free port; the server is stopped (SIGTERM, children included) on the way out."""
    port = free_port()
    process = tracking.serve_ui(tracking_uri, port=port)
    try:
        yield f"http://127.0.0.1:{port}", process
    finally:
        stop(process)


def test_ui_shows_the_study_its_trials_and_their_params(tracked_study: TrackedStudy, tmp_path: Path) -> None:
    """The runs table lists the parent; its page lists the trial-N children; a child page shows lr and damping."""
    if not has_chromium():
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    experiment_id = tracked_study.tracker.experiment_id
    best = tracked_study.study.best_trial
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with running_ui(tracked_study.tracking_uri) as (base_url, _):
        runs_page = tracking.experiment_url(base_url, experiment_id)
        pages = {
            "training-runs": runs_page,
            "parent-run": f"{runs_page}/{tracked_study.parent_id}",
            "best-trial-run": f"{runs_page}/{best.user_attrs['mlflow_run_id']}",
        }
        runs_text, parent_text, child_text = (
            visible_text(chromium(url, shots / f"mlflow-{name}.png")) for name, url in pages.items()
        )
        plot_url = f"{base_url}/get-artifact?path=plots/best_loss_curves.png&run_uuid={tracked_study.parent_id}"
        with urllib.request.urlopen(plot_url, timeout=30) as response:
            assert response.read(8) == b"\x89PNG\r\n\x1a\n"  # the server serves the runs' local artifacts
    for name, url in pages.items():
        print(f"screenshot of {url}: {shots / f'mlflow-{name}.png'}")
        assert (shots / f"mlflow-{name}.png").stat().st_size > 10_000
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
    store_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    from mlflow import MlflowClient

    study = optuna.create_study(study_name="http-study")
    with running_ui(store_uri) as (base_url, server):
        tracker = StudyTracker(base_url, "http", study.study_name)
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
    history = MlflowClient(store_uri).get_metric_history(run.run_id, "eval_loss")
    assert [m.step for m in history] == [1]  # what was logged before the server died is kept


# A study's artifacts: one interactive page inlining plotly.js once (4.8 MB for plotly.js 4.1), its figures' data
# (tens of KB for a few trials), one PNG per plot (~20-80 KB each) and the YAML inputs. 6 MB leaves about 1 MB for
# all but plotly.js; one more copy of it (the old page per plot: ~4.8 MB each, ~19 MB a study) breaks the bound.
MAX_STUDY_ARTIFACT_BYTES = 6_000_000


def test_real_search_logs_config_data_set_budget_and_stays_small(store_uri: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A real 4-trial search (digits MLP, real training) tracked in a local SQLite MLflow store."""
    from mlflow import MlflowClient

    from kfac_tune.config import load_config
    from kfac_tune.search import prepare_search
    from tests.search_support import write_config

    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, tracking={"enabled": True, "uri": store_uri, "experiment": "real-search"},
                          search={"trials": 4})
    study = prepare_search(load_config(config), recipe_path=tmp_path / "recipe.yaml").run().study

    client = MlflowClient(store_uri)
    experiment_id = client.get_experiment_by_name("real-search").experiment_id
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    params = parent.data.params
    assert params["budget.trials"] == "4" and params["budget.timeout_s"] == "null"
    assert set(study.best_trial.params) <= {key.removeprefix("space.") for key in params}
    assert params["data.batch_size"] == "64" and params["training.steps"] == "60"
    assert sum(int(parent.data.tags[f"trials.{state}"]) for state in ("complete", "pruned")) == 4

    children = child_runs(store_uri, experiment_id, parent.info.run_id)
    assert len(children) == len(study.trials) == 4
    for run in children:
        trial = study.trials[int(run.data.tags["optuna.trial_number"])]
        logged = run.data.params
        assert {key: logged[key] for key in ("data.name", "data.batch_size", "training.steps", "training.seed")} == {
            "data.name": "digits", "data.batch_size": "64", "training.steps": "60", "training.seed": "0"}
        assert logged["optimizer.name"] == study.user_attrs["optimizer"]
        numbers = {key: value for key, value in trial.params.items() if not isinstance(value, str)}
        assert {key: float(logged[key]) for key in numbers} == pytest.approx(numbers)
        assert all(logged[key] == value for key, value in trial.params.items() if isinstance(value, str))  # mode
        (used,) = run.inputs.dataset_inputs
        assert used.dataset.name == "digits" and {t.key: t.value for t in used.tags} == {"mlflow.data.context": "train"}

    total = 0
    for run in client.search_runs([experiment_id]):
        root = Path(urllib.request.url2pathname(run.info.artifact_uri.removeprefix("file://")))
        total += sum(path.stat().st_size for path in root.rglob("*") if path.is_file())
    print(f"artifacts of the 4-trial study: {total / 1e6:.2f} MB")
    assert 1_000_000 < total <= MAX_STUDY_ARTIFACT_BYTES, total


def test_log_model_best_gives_every_leading_trial_and_the_best_its_model(store_uri: str, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """``tracking.log_model: best``: a trial logs its network iff no earlier complete trial beat it, so the best
    trial's run holds a model that ``mlflow.pytorch`` loads back as the configured network."""
    import mlflow.pytorch
    import optuna
    import torch
    from mlflow import MlflowClient

    from kfac_tune.config import ConfigError, load_config
    from kfac_tune.search import prepare_search
    from tests.search_support import write_config

    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, search={"trials": 4},
                          tracking={"enabled": True, "uri": store_uri, "experiment": "log-model", "log_model": "best"})
    study = prepare_search(load_config(config), recipe_path=tmp_path / "recipe.yaml").run().study

    leading, best_so_far = set(), float("inf")
    for trial in sorted(study.trials, key=lambda t: t.datetime_complete or t.datetime_start):
        if trial.state == optuna.trial.TrialState.COMPLETE and trial.value <= best_so_far:
            leading.add(trial.user_attrs["mlflow_run_id"])
            best_so_far = trial.value
    client = MlflowClient(store_uri)
    models = client.search_logged_models(experiment_ids=[client.get_experiment_by_name("log-model").experiment_id])
    assert {m.source_run_id for m in models} == leading and len(models) == len(leading)
    best_model = next(m for m in models if m.source_run_id == study.best_trial.user_attrs["mlflow_run_id"])
    net = mlflow.pytorch.load_model(best_model.artifact_location)
    assert [tuple(p.shape) for p in net.parameters()] == [(32, 64), (32,), (10, 32), (10,)]
    assert isinstance(net(torch.zeros(1, 64)), torch.Tensor)

    with pytest.raises(ConfigError, match="tracking.log_model"):
        load_config(config, overrides={"training.processes": 2})


def test_flattened_config_masks_passwords() -> None:
    flat = tracking.flatten({"storage": "postgresql+psycopg2://tuner:s3cret@db/kfac", "tracking": {"uri": "x"},
                             "data": {"kwargs": {}, "root": None, "sizes": [1, 2]}})
    assert flat == {"storage": "postgresql+psycopg2://tuner:***@db/kfac", "tracking.uri": "x", "data.kwargs": "{}",
                    "data.root": "null", "data.sizes": "[1, 2]"}
