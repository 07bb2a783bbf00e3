"""End to end on real data: search (real SQLite storage, real MLflow store) -> show -> export -> train --recipe.

Reproduction tolerance: ``train --recipe`` re-runs the best trial's exact setting: same seed for the model
initialisation, the batch order and K-FAC's sampled Fisher targets, same data, one CPU thread, same process kind.
CPU kernels are deterministic for a fixed thread count, so the value should match to the last bits; the test
allows a relative 1e-5 for BLAS builds that reorder reductions between calls.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest

from kfac_tune.recipes import load_recipe
from tests.search_support import TEST_OPTIMIZER, invoke, load_study, write_config

pytestmark = pytest.mark.slow


def test_search_show_export_train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, tracking={"enabled": True}, search={"trials": 4})
    storage = f"sqlite:///{tmp_path / 'study.db'}"

    output = invoke("search", str(config))
    assert "best recipe written to recipes/model.yaml" in output  # recipes/<study>.yaml
    study = load_study(storage, "model")
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 4
    assert study.user_attrs["optimizer"] == TEST_OPTIMIZER and study.user_attrs["architecture"] == "mlp"

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("model")
    runs = client.search_runs([experiment.experiment_id])
    parent = study.user_attrs["mlflow_parent_run_id"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert {r.info.run_id for r in children} == {t.user_attrs["mlflow_run_id"] for t in study.trials}

    rows = json.loads(invoke("show", "--storage", storage, "-f", "json"))
    assert [r["number"] for r in rows][0] == study.best_trial.number
    values = [r["value"] for r in rows if r["state"] == "COMPLETE"]
    assert values == sorted(values)

    invoke("export", "--storage", storage, "-o", str(tmp_path / "best.yaml"))
    recipe = load_recipe(tmp_path / "best.yaml")
    best = study.best_trial
    assert recipe.result.value == best.value and recipe.provenance.trial == best.number
    assert recipe.provenance.mlflow_run_id == best.user_attrs["mlflow_run_id"]
    assert recipe.searched == best.params  # every sampled value, in the space's vocabulary (K-FAC's mode too)
    assert {k: v for k, v in recipe.hyperparameters.items() if k in best.params} == {
        k: v for k, v in best.params.items() if k != "mode"}
    assert recipe.result.split == "validation" and recipe.result.test_value is not None

    result = json.loads(invoke("train", str(config), "--recipe", str(tmp_path / "best.yaml"), "-f", "json"))
    assert math.isclose(result["value"], recipe.result.value, rel_tol=1e-5), (result["value"], recipe.result.value)


def test_diverging_trials_are_pruned_and_best_recipe_is_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # K-FAC in its fixed mode, where lr is sampled (automatic mode chooses lr itself), without the safety that
    # would tame lr = 1e6 (the KL-clip trust region, the update-size guard, step rejection): this tests the search
    kfac = TEST_OPTIMIZER == "kfac"
    unguarded = {"optimizer": {"name": "kfac", "options": {"kl_clip": None, "max_update_ratio": None,
                                                           "rejection_ratio": None}}}
    config = write_config(tmp_path, search={
        "trials": 3, "pruner": "none", "enqueue_defaults": False,
        "space": {"lr": [0.05, 1.0e6], **({"mode": "fixed", "kl_clip": None} if kfac else {})},  # null: not searched
        "enqueue": [{"lr": 1.0e6}, {"lr": 0.05}],
    }, **(unguarded if kfac else {}))
    invoke("search", str(config), "--no-tracking", "-o", str(tmp_path / "best.yaml"))
    study = load_study(f"sqlite:///{tmp_path / 'study.db'}", "model")
    diverged = [t for t in study.trials if t.params["lr"] == 1.0e6]
    assert diverged and all(t.state.name == "PRUNED" for t in diverged)
    assert all("diverged" in t.user_attrs["prune_reason"] for t in diverged)
    recipe = load_recipe(tmp_path / "best.yaml")
    assert recipe.hyperparameters["lr"] == 0.05 and math.isfinite(recipe.result.value)


def test_a_search_does_not_print_kfacs_safety_warnings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A trial whose updates K-FAC skips (lr 1e6 without the trust region, under a tight update-size guard: each
    update would explode the weights) raises KFACWarning in plain training, but a search, whose trials explore such settings on purpose, prints
    none of it: the lines would interleave with the progress bar without naming their trial."""
    from kfac_tune.config import load_config
    from kfac_tune.optim import KFACWarning
    from kfac_tune.training import train

    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, optimizer={"name": "kfac", "options": {"kl_clip": None, "max_update_ratio": 1.0}},
                          training={"steps": 20},
                          search={"trials": 1, "pruner": "none", "enqueue_defaults": False,
                                  "space": {"mode": "fixed", "kl_clip": None, "lr": [1.0e6, 1.0e7]},
                                  "enqueue": [{"lr": 1.0e6}]})
    with warnings.catch_warnings(record=True) as trained:
        warnings.simplefilter("always")
        train(load_config(config), {"lr": 1.0e6})
    assert any(issubclass(w.category, KFACWarning) and "skipped" in str(w.message) for w in trained)

    with warnings.catch_warnings(record=True) as searched:
        warnings.simplefilter("always")
        invoke("search", str(config), "--no-tracking", "-o", str(tmp_path / "best.yaml"))
    assert not [str(w.message) for w in searched if issubclass(w.category, KFACWarning)]
    assert load_study(f"sqlite:///{tmp_path / 'study.db'}", "model").trials[0].params["lr"] == 1.0e6


def test_failing_trial_records_the_reason_and_the_study_goes_on(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception inside a trial (a simulated out-of-memory while building the model) fails that trial only."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "oom_once_model.py").write_text(
        "import itertools, torch\n"
        "CALLS = itertools.count()\n"
        "def build(input_shape, num_classes):\n"
        "    if next(CALLS) == 1:  # call 0 is the preflight, call 1 the first trial\n"
        "        raise MemoryError('simulated out of memory')\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(),\n"
        "                               torch.nn.Linear(16, num_classes))\n"
    )
    config = write_config(tmp_path, model={"callable": "oom_once_model:build", "kwargs": {}},
                          search={"trials": 2})
    invoke("search", str(config), "--no-tracking")
    study = load_study(f"sqlite:///{tmp_path / 'study.db'}", "model")
    states = [t.state.name for t in study.trials]
    assert states == ["FAIL", "COMPLETE", "COMPLETE"]
    assert study.trials[0].user_attrs["fail_reason"] == "MemoryError: simulated out of memory"
