"""One route for every setting (issue 14) and the path after a search (issue 15): --set, the recipe path rule,
show/export/ui reading the config's stores, export of a model.callable study, train --save with MLflow, and the
Python API. Real SQLite storage, real MLflow stores, real training on digits."""
from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.search_support import REPO, USER_DATASET, cli, cli_popen, load_study, stop, tiny_config, write_config

MODULE = "kfac_user_nets"  # a package that exists only in the test's temporary directory


def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``cli`` with chosen environment variables (``cli`` clears the two that settings read)."""
    base = {k: v for k, v in os.environ.items() if k not in ("KFAC_TUNE_STORAGE", "MLFLOW_TRACKING_URI")}
    full = {**base, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=600)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def bad_input(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return " ".join(result.stderr.split())


# ------------------------------------------------------------------------------------------------ resolution


def test_each_setting_resolves_flag_then_environment_then_file_then_default(tmp_path: Path) -> None:
    from kfac_tune.config import ConfigError, load_config
    from kfac_tune.settings import DEFAULT_STORAGE, DEFAULT_TRACKING_URI, resolve

    cfg = load_config(write_config(tmp_path, tracking={"enabled": True, "experiment": "exp"}))
    env = {"KFAC_TUNE_STORAGE": "sqlite:///env.db", "MLFLOW_TRACKING_URI": "sqlite:///env-mlflow.db"}
    flags = resolve(cfg, storage="sqlite:///flag.db", tracking_uri="sqlite:///flag-mlflow.db", study="s",
                    environ=env)
    assert (flags.storage, flags.tracking_uri, flags.study, flags.experiment) == (
        "sqlite:///flag.db", "sqlite:///flag-mlflow.db", "s", "exp")
    assert resolve(cfg, environ=env).storage == "sqlite:///env.db"
    from_file = resolve(cfg, environ={})
    assert (from_file.storage, from_file.tracking_uri, from_file.study) == (cfg.storage, cfg.tracking.uri, "model")
    assert from_file.origin["storage"] == str(tmp_path / "model.yaml")
    bare = resolve(None, environ={})
    assert (bare.storage, bare.tracking_uri, bare.study, bare.tracking) == (DEFAULT_STORAGE, DEFAULT_TRACKING_URI,
                                                                            None, True)
    assert resolve(cfg, no_tracking=True, environ={}).tracking is False
    applied = from_file.apply(cfg)
    assert applied.source == cfg.source and applied.tracking.uri == cfg.tracking.uri
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI: tracking.uri: expected an MLflow tracking URI"):
        resolve(cfg, environ={"MLFLOW_TRACKING_URI": "/plain/path"})


# ------------------------------------------------------------------------------------------------ --set


def test_set_overrides_entries_and_is_validated_like_the_file(tmp_path: Path) -> None:
    config = write_config(tmp_path, search={"trials": 5})
    ok(cli("search", str(config), "--no-tracking", "--set", "search.trials=2", "--set", "training.steps=20",
           "--set", "model.kwargs.hidden=[16]", cwd=tmp_path))
    study = load_study(f"sqlite:///{tmp_path / 'study.db'}", "model")
    assert len(study.trials) == 2 and study.user_attrs["steps"] == 20
    assert study.user_attrs["config"]["model"]["kwargs"]["hidden"] == [16]

    unknown = bad_input(cli("search", str(config), "--set", "search.trails=2", cwd=tmp_path))
    assert "--set search.trails=2" in unknown and "did you mean 'trials'" in unknown
    wrong = bad_input(cli("search", str(config), "--set", "training.steps=many", cwd=tmp_path))
    assert "--set training.steps=many: training.steps: expected an integer" in wrong
    malformed = bad_input(cli("search", str(config), "--set", "training.steps", cwd=tmp_path))
    assert "--set training.steps: expected dotted.key=value" in malformed


def alias_bomb(levels: int, width: int = 10) -> str:
    """A one-line YAML value of ``width ** levels`` leaves through ``levels`` anchors: a few hundred bytes."""
    layers = ["&l0 [" + ", ".join(["0"] * width) + "]"]
    layers += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "[" + ", ".join(layers) + "]"


def test_a_set_value_goes_through_the_file_readers_guards(tmp_path: Path) -> None:
    """A plain yaml.load of a --set value skipped the alias-bomb and size guards: 441 bytes reached 4 GB."""
    from kfac_tune.config import ConfigError
    from kfac_tune.settings import parse_sets

    bomb = r"expected a config of at most 100,000 values once YAML aliases are expanded; found .* \(an alias bomb\?\)"
    with pytest.raises(ConfigError, match=r"^--set model.kwargs.hidden=\[&l0 .*\.\.\.: " + bomb):
        parse_sets([f"model.kwargs.hidden={alias_bomb(9)}"])  # a billion values
    with pytest.raises(ConfigError, match="key 'a' is given twice"):
        parse_sets(["model.kwargs={a: 1, a: 2}"])
    with pytest.raises(ConfigError, match="expected a YAML value of at most 1,048,576 bytes"):
        parse_sets(["training.steps=" + "9" * (2 << 20)])
    config = write_config(tmp_path)
    bomb = bad_input(cli("search", str(config), "--set", f"model.kwargs.hidden={alias_bomb(6)}", cwd=tmp_path))
    assert "an alias bomb?" in bomb and bomb.startswith("Error: --set model.kwargs.hidden=") and len(bomb) < 400
    assert not (tmp_path / "study.db").exists()


# ------------------------------------------------------------------------------------------------ stores


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One study searched with a config whose storage and tracking store are its own files (not the defaults),
    run from another directory, with tracking on."""
    root = tmp_path_factory.mktemp("stores")
    (root / "work").mkdir()
    config = root / "other.yaml"
    config.write_text(yaml.safe_dump(tiny_config(root, search={"trials": 2}, tracking={"enabled": True}),
                                     sort_keys=False))
    ok(cli("search", str(config), cwd=root / "work"))
    return root


def test_show_and_export_with_config_use_its_stores(searched: Path) -> None:
    work, config = searched / "work", str(searched / "other.yaml")
    rows = json.loads(ok(cli("show", config, "-f", "json", cwd=work)))
    assert len(rows) == 2
    assert "recipes/other.yaml" in ok(cli("export", config, cwd=work))
    assert yaml.safe_load((work / "recipes" / "other.yaml").read_text())["provenance"]["study"] == "other"


def test_show_without_config_takes_the_environment_then_the_flag(searched: Path) -> None:
    work, storage = searched / "work", f"sqlite:///{searched / 'study.db'}"
    missing = bad_input(run("show", "--study", "other", cwd=work))
    assert "sqlite:///kfac_tune.db" in missing  # the default, since neither a flag nor the environment names one
    assert len(json.loads(ok(run("show", "-f", "json", cwd=work, env={"KFAC_TUNE_STORAGE": storage})))) == 2
    assert len(json.loads(ok(run("show", "--storage", storage, "-f", "json", cwd=work,
                                 env={"KFAC_TUNE_STORAGE": "sqlite:///nowhere.db"})))) == 2


def test_ui_serves_the_config_tracking_store(searched: Path) -> None:
    from tests.browser_support import free_port

    process = cli_popen("ui", str(searched / "other.yaml"), "--port", str(free_port()), cwd=searched / "work")
    try:
        lines = []
        while process.poll() is None:
            line = process.stdout.readline()
            lines.append(line)
            if line.startswith("MLflow UI for"):
                break
        assert lines and lines[-1].startswith(f"MLflow UI for sqlite:///{searched / 'mlflow.db'} at"), lines
    finally:
        stop(process)


# ------------------------------------------------------------------------------------------------ recipe path


def test_recipe_of_another_study_is_kept_unless_forced(searched: Path, tmp_path: Path) -> None:
    work, config = searched / "work", str(searched / "other.yaml")
    target = tmp_path / "mine.yaml"
    ok(cli("export", config, "-o", str(target), cwd=work))
    theirs = yaml.safe_load(target.read_text())
    theirs["provenance"]["study"] = "someone-else"
    target.write_text(yaml.safe_dump(theirs, sort_keys=False))
    refused = bad_input(cli("export", config, "-o", str(target), cwd=work))
    assert "'someone-else'" in refused and "'other'" in refused and "--force" in refused
    assert yaml.safe_load(target.read_text())["provenance"]["study"] == "someone-else"
    ok(cli("export", config, "-o", str(target), "--force", cwd=work))
    assert yaml.safe_load(target.read_text())["provenance"]["study"] == "other"
    named = bad_input(cli("search", config, "--study", "../escape", cwd=work))
    assert "cannot name a recipe file" in named


# ------------------------------------------------------------------------------------------------ your model


PACKAGE = USER_DATASET + """
import torch.nn as nn
from sklearn.datasets import load_digits


def bn_cnn(input_shape, num_classes, channels=4):
    depth, height, width = input_shape
    return nn.Sequential(nn.Conv2d(depth, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                         nn.Flatten(), nn.Linear(channels * height * width, num_classes))


def digits(train_size=None, seed=0):
    raw = load_digits()
    images = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16
    labels = torch.tensor(raw.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test, train = order[:300], order[300:][:train_size]
    return Images(images[train], labels[train], noise), Images(images[test], labels[test])
"""


@pytest.fixture(scope="module")
def user_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A stranger's project: a package outside the repository and outside the config's directory with a BatchNorm
    CNN (``model.callable``) and a data callable returning Datasets with a random transform, ``train_size`` set in
    the YAML; searched with tracking on, then ``show CONFIG``."""
    root = tmp_path_factory.mktemp("user")
    (root / "packages" / MODULE).mkdir(parents=True)
    (root / "packages" / MODULE / "__init__.py").write_text(textwrap.dedent(PACKAGE))
    (root / "project").mkdir()
    config = tiny_config(root, model={"callable": f"{MODULE}:bn_cnn", "kwargs": {"channels": 4}},
                         search={"trials": 2}, tracking={"enabled": True})
    config["data"] = {"callable": f"{MODULE}:digits", "train_size": 600, "batch_size": 64}
    (root / "project" / "model.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    importable = {"PYTHONPATH": f"{REPO}{os.pathsep}{root / 'packages'}"}
    ok(run("search", str(root / "project" / "model.yaml"), cwd=root / "project", env=importable))
    rows = json.loads(ok(run("show", str(root / "project" / "model.yaml"), "-f", "json", cwd=root / "project",
                             env=importable)))
    assert len(rows) == 2 and {row["state"] for row in rows} == {"COMPLETE"}, rows
    return root, importable


def test_export_of_a_callable_study(user_study: tuple[Path, dict[str, str]]) -> None:
    root, importable = user_study
    config, work = str(root / "project" / "model.yaml"), root / "project"
    # measured on the test split by the search already: no code needed, none imported
    storage = f"sqlite:///{root / 'study.db'}"
    ok(run("export", "--storage", storage, "-o", str(root / "stored.yaml"), cwd=work))
    assert yaml.safe_load((root / "stored.yaml").read_text())["result"]["test_value"] is not None

    with sqlite3.connect(root / "study.db") as db:  # the study as it is before any test measurement
        db.execute("DELETE FROM study_user_attributes WHERE key LIKE 'test.%'")
    stored = bad_input(run("export", "--storage", storage, "-o", str(root / "x.yaml"), cwd=work, env=importable))
    assert f"model.callable '{MODULE}:bn_cnn'" in stored and f"module '{MODULE}'" in stored
    assert "kfac-tune export model.yaml" in stored
    missing = bad_input(run("export", config, "-o", str(root / "x.yaml"), cwd=work))
    assert f"importing '{MODULE}' failed" in missing
    ok(run("export", config, "-o", str(root / "best.yaml"), cwd=work, env=importable))
    assert yaml.safe_load((root / "best.yaml").read_text())["result"]["test_value"] is not None


def test_train_saves_a_model_plain_pytorch_loads_and_mlflow_records(
        user_study: tuple[Path, dict[str, str]]) -> None:
    import torch
    from mlflow import MlflowClient

    root, importable = user_study
    config, work = root / "project" / "model.yaml", root / "project"
    tracking = f"sqlite:///{root / 'train-mlflow.db'}"
    summary = json.loads(ok(run("train", str(config), "--recipe", str(work / "recipes" / "model.yaml"), "--save",
                                str(root / "saved"), "--tracking-uri", tracking, "-f", "json", cwd=work,
                                env=importable)))
    saved = root / "saved"
    assert sorted(p.name for p in saved.iterdir()) == ["model.pt", "optimizer.pt", "recipe.yaml", "result.json"]

    sys.path.insert(0, str(root / "packages"))  # plain PyTorch from here: the user's own code, no kfac_tune
    try:
        user = __import__(MODULE)
        _, test = user.digits(train_size=600, seed=0)
        net = user.bn_cnn((1, 8, 8), 10, channels=4)
    finally:
        sys.path.remove(str(root / "packages"))
        sys.modules.pop(MODULE, None)
    net.load_state_dict(torch.load(saved / "model.pt"))
    net.eval()
    images = torch.stack([test[i][0] for i in range(len(test))])
    labels = torch.tensor([test[i][1] for i in range(len(test))])
    with torch.no_grad():
        accuracy = (net(images).argmax(-1) == labels).float().mean().item()
    assert math.isclose(accuracy, summary["test"]["test_accuracy"], abs_tol=1e-6)
    assert accuracy > 0.5  # chance is 0.1: the saved weights are the trained ones
    assert json.loads((saved / "result.json").read_text())["test"] == summary["test"]

    client = MlflowClient(tracking)
    (run_info,) = client.search_runs([client.get_experiment_by_name("model").experiment_id])
    assert run_info.info.run_id == summary["mlflow_run_id"]
    params = run_info.data.params
    assert params["model.callable"] == f"{MODULE}:bn_cnn" and params["data.train_size"] == "600"
    assert params["training.steps"] == "60"
    assert set(yaml.safe_load((saved / "recipe.yaml").read_text())["hyperparameters"]) <= {
        key.removeprefix("hyperparameters.") for key in params}
    assert math.isclose(run_info.data.metrics["final_test_accuracy"], accuracy, abs_tol=1e-6)
    assert len(client.get_metric_history(run_info.info.run_id, "eval_loss")) == 3  # the curve, every 20 steps
    (dataset,) = [d.dataset for d in run_info.inputs.dataset_inputs]
    assert f"{MODULE}:digits" in dataset.source or f"{MODULE}:digits" in dataset.name, dataset
    models = client.search_logged_models(experiment_ids=[run_info.info.experiment_id])
    assert [m.source_run_id for m in models] == [run_info.info.run_id]


# ------------------------------------------------------------------------------------------------ Python API


def test_python_api_searches_a_dict_and_trains_its_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kfac_tune

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KFAC_TUNE_STORAGE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = tiny_config(tmp_path)
    study = kfac_tune.search(config, study="api", tracking=False, overrides={"search.trials": 2})
    assert study.study_name == "api" and len(study.trials) == 2
    assert config["search"]["trials"] == 3, "the caller's dict is not edited"
    recipe = tmp_path / "recipes" / "api.yaml"
    assert recipe.is_file()

    outcome = kfac_tune.train(config, recipe, tracking=False, save=tmp_path / "saved",
                              overrides={"training.steps": 40})
    assert outcome.result.steps == 40 and outcome.result.test["test_accuracy"] > 0.5
    assert outcome.saved == tmp_path / "saved"
    assert set(outcome.model.state_dict()) == set(__import__("torch").load(tmp_path / "saved" / "model.pt"))
