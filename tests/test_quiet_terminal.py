"""A stranger's first commands print no noise from the libraries underneath, and their numpy data is accepted.

Run as a user runs them: ``python cli.py`` in a subprocess with Python's default warning filters (the other CLI
tests set ``PYTHONWARNINGS=ignore``, which would hide exactly what is checked here), real SQLite study and MLflow
stores, a data callable returning scikit-learn's numpy arrays (int32 labels, as pandas and Windows give them).
What must not appear, each silenced where it starts and nowhere else:

* ``FutureWarning: torch.jit.script is deprecated``: torch's forward-mode decompositions, loaded by the first
  ``jvp`` of K-FAC's automatic mode (``optim.quadratic._load_forward_decompositions``: in the optimizer, so
  one's own training loop is quiet too);
* Optuna's ``Param lr unique value length is less than 2``: the lr x damping contour of a study with one fixed-mode
  trial (``tracking.plots._contour_drawable``);
* MLflow's pickle caution and its requirements "mismatch" (``torch==2.14.1+cu130`` against the installed
  ``2.14.1``) when ``train`` logs the model (``tracking.runs.log_model``);
* MLflow's INFO lines ``Creating initial MLflow database tables...`` / ``Updating database tables`` when the
  first command builds the tracking store (``tracking.server.prepare_store``).

MLflow's params of those runs name the data callable, not the schema's default ``data.name: digits``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.search_support import REPO

pytestmark = pytest.mark.slow

NOISE = ("torch.jit.script", "unique value length", "Pickle", "mismatches", "database tables", "DataBundle")

DATA = '''
from sklearn.datasets import load_breast_cancer


def load(seed=0):
    """Numpy arrays, as scikit-learn gives them: standardised features, int32 labels."""
    x, y = load_breast_cancer(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype("float32")
    y = y.astype("int32")
    return x[:400], y[:400], x[400:], y[400:]
'''


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONWARNINGS", "MLFLOW_TRACKING_URI", "KFAC_TUNE_STORAGE")}
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{cwd}"
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_a_strangers_numpy_data_trains_through_search_and_train_without_library_noise(tmp_path: Path) -> None:
    (tmp_path / "tabular.py").write_text(DATA)
    config = tmp_path / "tabular.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": "mlp", "kwargs": {"hidden": [16]}},
        "data": {"callable": "tabular:load", "batch_size": 64},
        "training": {"steps": 20, "eval_every": 10, "device": "cpu", "threads": 1},
        "optimizer": "kfac",
        # a fixed-mode trial, then an automatic-mode one: a jvp, and a single lr for the lr x damping contour
        "search": {"trials": 2, "sampler": {"name": "tpe", "seed": 0}, "enqueue_defaults": False,
                   "enqueue": [{"mode": "fixed"}, {"mode": "automatic"}]},
        "tracking": {"enabled": True, "uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "storage": f"sqlite:///{tmp_path / 'study.db'}"}))

    searched = _run("search", str(config), cwd=tmp_path)
    assert searched.returncode == 0, searched.stderr[-3000:]
    trained = _run("train", str(config), "--recipe", "recipes/tabular.yaml", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "logged to MLflow run" in trained.stdout  # the model was logged, where MLflow's warnings came from

    import optuna

    study = optuna.load_study(study_name="tabular", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert {t.params["mode"] for t in study.trials} == {"fixed", "automatic"}  # both paths were exercised
    for result in (searched, trained):
        terminal = result.stdout + result.stderr
        assert not [word for word in NOISE if word in terminal], terminal[-3000:]

    # MLflow records what the runs used: the callable, not the schema's default data set beside it
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tabular").experiment_id])
    logged = [run for run in runs if "data.callable" in run.data.params]
    assert len(logged) == 4  # the study's parent run, two trials, one train run
    for run in logged:
        assert run.data.params["data.callable"] == "tabular:load" and "data.name" not in run.data.params
        assert run.data.params["model.name"] == "mlp"  # a built-in model is what the run used
