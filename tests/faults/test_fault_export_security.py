"""Exporting into a full or read-only filesystem, and secrets in storage URLs.

One small tracked study serves every scenario here. Its YAML names a PostgreSQL storage with a password (as a
team's shared file would) that the command line overrides with a local SQLite file, so the password passes
through every place it could leak from: the config the study records, the MLflow parent run's tags and
artifacts, the trial runs, the recipe, the CLI's output.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from kfac_tune.secrets import display_url
from tests.faults.conftest import fault_config, fill, invoke, mlflow_store_of, remount_read_only, small_tmpfs, storage_of
from tests.search_support import load_study
from tests.test_recipes import private_device

pytestmark = pytest.mark.slow
PASSWORD = "s3cr3t-pw"
SECRET_STORAGE = f"postgresql+psycopg2://tuner:{PASSWORD}@127.0.0.1:1/kfac"


@dataclass(frozen=True)
class Study:
    directory: Path
    storage: str
    output: str  # what `kfac-tune search` printed


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Study]:
    directory = tmp_path_factory.mktemp("secret-study")
    config = fault_config(directory, trials=1, tracking=True)
    text = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**text, "storage": SECRET_STORAGE}, sort_keys=False))
    cwd = Path.cwd()
    os.chdir(directory)
    try:
        result = invoke("search", str(config), "--storage", storage_of(directory))
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    yield Study(directory, storage_of(directory), result.output)


# ------------------------------------------------------------------------------------------------ export


def _export(study: Study, target: Path) -> tuple[int, str]:
    result = invoke("export", "--storage", study.storage, "-o", str(target))
    return result.exit_code, result.output


@pytest.mark.parametrize("fault", ["disk full", "read-only"])
def test_export_into_a_broken_filesystem_keeps_the_previous_recipe(study: Study, tmp_path: Path, fault: str) -> None:
    with small_tmpfs(tmp_path / "mnt") as mount:
        target = mount / "recipes" / "mlp.yaml"
        code, output = _export(study, target)
        assert code == 0, output
        previous = target.read_bytes()
        if fault == "disk full":
            fill(mount)
        else:
            remount_read_only(mount)
        code, output = _export(study, target)
        assert code == 2, output
        assert output.startswith(f"Error: cannot write recipe {target} (")
        assert ("No space left on device" if fault == "disk full" else "Read-only file system") in output
        assert "previous file there is unchanged" in output and "Traceback" not in output
        assert target.read_bytes() == previous
        assert sorted(p.name for p in target.parent.iterdir()) == ["mlp.yaml"], "a temporary file was left"


# ------------------------------------------------------------------------------------------------ secrets


def test_the_storage_password_is_written_nowhere(study: Study) -> None:
    from mlflow import MlflowClient

    assert PASSWORD not in study.output
    recorded = load_study(study.storage, "model")
    assert PASSWORD not in json.dumps(recorded.user_attrs, default=str)
    assert all(PASSWORD not in json.dumps(t.user_attrs, default=str) for t in recorded.trials)
    recipe = study.directory / "recipes" / "model.yaml"
    assert PASSWORD not in recipe.read_text()

    client = MlflowClient(mlflow_store_of(study.directory))
    experiment = client.get_experiment_by_name("model")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2  # the study's parent run and its trial's run
    for run in runs:
        assert PASSWORD not in json.dumps([run.data.tags, run.data.params])
        for artifact in client.list_artifacts(run.info.run_id):
            if artifact.path.endswith(".yaml"):
                text = client.download_artifacts(run.info.run_id, artifact.path, str(study.directory / "dl"))
                assert PASSWORD not in Path(text).read_text(), artifact.path


def test_an_unreachable_password_storage_fails_without_showing_the_password(tmp_path: Path) -> None:
    config = fault_config(tmp_path)
    for command in (["search", str(config), "--storage", SECRET_STORAGE], ["show", "--storage", SECRET_STORAGE]):
        result = invoke(*command)
        assert result.exit_code == 1, result.output
        assert PASSWORD not in result.output and "Traceback" not in result.output


def test_display_url_masks_passwords_only() -> None:
    assert display_url(SECRET_STORAGE) == "postgresql+psycopg2://tuner:***@127.0.0.1:1/kfac"
    assert display_url("sqlite:///runs/study.db") == "sqlite:///runs/study.db"
    assert display_url("not a url") == "not a url"


def test_the_ui_binds_loopback_unless_asked() -> None:
    """The `ui` command's default; tests/faults/test_fault_tracking.py shows the server it starts listening on
    127.0.0.1 only."""
    import inspect

    from kfac_tune.cli import ui
    from kfac_tune.tracking import serve_ui

    assert next(p for p in ui.params if p.name == "host").default == "127.0.0.1"
    assert inspect.signature(serve_ui).parameters["host"].default == "127.0.0.1"


# ------------------------------------------------------------------------------------------------ export targets


def _special_target(kind: str, directory: Path) -> Path:
    import socket

    path = directory / "mlp.yaml"
    if kind == "device":
        return private_device(path, "null")
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(path))
    elif kind == "directory":
        path.mkdir()
    elif kind == "link to device":
        path.symlink_to(private_device(directory / "null", "null"))
    return path


@pytest.mark.parametrize("kind", ["device", "fifo", "socket", "directory", "link to device"])
def test_export_refuses_special_files(study: Study, tmp_path: Path, kind: str) -> None:
    """``-o /dev/null`` as root used to turn /dev/null into a regular 0600 file (a private node stands in for it,
    so that a regression cannot break the machine's /dev/null)."""
    import stat

    target = _special_target(kind, tmp_path)
    before = target.lstat().st_mode, os.stat(target).st_mode
    code, output = _export(study, target)
    assert code == 2, output
    assert ("not a regular file" in output or "is a directory" in output) and "Traceback" not in output
    assert (target.lstat().st_mode, os.stat(target).st_mode) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temp file was left"
    assert stat.S_ISCHR(os.stat(target).st_mode) or kind != "device"


def test_export_with_force_writes_through_a_symlink_and_keeps_the_mode(study: Study, tmp_path: Path) -> None:
    (tmp_path / "v1.yaml").write_text("old\n")
    (tmp_path / "v1.yaml").chmod(0o644)
    link = tmp_path / "cur.yaml"
    link.symlink_to("v1.yaml")
    result = invoke("export", "--storage", study.storage, "-o", str(link), "--force")
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and "writing through to" in result.output
    assert (tmp_path / "v1.yaml").read_text().startswith("# kfac-tune recipe")
    assert (tmp_path / "v1.yaml").stat().st_mode & 0o777 == 0o644


def _tampered_copy(study: Study, tmp_path: Path, **attrs: object) -> str:
    """A copy of the study's storage whose study attributes were rewritten, as anyone with write access to a
    shared storage could."""
    import shutil

    copy = tmp_path / "shared.db"
    shutil.copy(study.storage.removeprefix("sqlite:///"), copy)
    storage = f"sqlite:///{copy}"
    tampered = load_study(storage, "model")
    for key, value in attrs.items():
        tampered.set_user_attr(key, value)
    return storage


@pytest.mark.parametrize("name", ["../../outside/x", "/tmp/kfac-absolute-x", "a/b", ".hidden", ".."])
def test_export_never_writes_where_the_storage_says(study: Study, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    name: str) -> None:
    """The default recipe path is recipes/<study>.yaml, and a shared storage can hold a study of any name."""
    import optuna

    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    storage = _tampered_copy(study, tmp_path)
    optuna.copy_study(from_study_name="model", from_storage=storage, to_storage=storage, to_study_name=name)
    optuna.delete_study(study_name="model", storage=storage)  # the storage's only study: export picks it
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    result = invoke("export", "--storage", storage)
    assert result.exit_code == 2, result.output
    assert "cannot name a recipe file" in result.output and "Traceback" not in result.output
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before, "a file or directory was created"
    assert not Path("/tmp/kfac-absolute-x.yaml").exists()


def test_export_never_imports_what_the_storage_names(study: Study, tmp_path: Path) -> None:
    """The stored config is data: a callable named there is checked for form, never imported."""
    marker = tmp_path / "imported"
    module = tmp_path / "planted_module.py"
    module.write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\ndef make(**kw): pass\n")
    recorded = load_study(study.storage, "model").user_attrs["config"]
    config = {**recorded, "model": {"callable": "planted_module:make", "kwargs": {}}}
    storage = _tampered_copy(study, tmp_path, config=config)
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        result = invoke("export", "--storage", storage, "-o", str(tmp_path / "out.yaml"))
    finally:
        sys.path.remove(str(tmp_path))
    assert result.exit_code == 0, result.output
    assert not marker.exists(), "the stored config's callable was imported"
    bad = _tampered_copy(study, tmp_path, config={**recorded, "model": {"callable": "not a reference"}})
    result = invoke("export", "--storage", bad, "-o", str(tmp_path / "out2.yaml"))
    assert result.exit_code == 2, result.output
    assert "model.callable" in result.output and "Traceback" not in result.output


def _raw_edit(storage: str, sql: str) -> None:
    """Rewrite stored JSON behind Optuna's back, as a hand edit of a shared storage could."""
    import sqlite3

    with sqlite3.connect(storage.removeprefix("sqlite:///")) as connection:
        assert connection.execute(sql).rowcount == 1


@pytest.mark.parametrize("tampering", ["config not JSON", "hyperparameter not a number", "result not numbers",
                                       "steps not a number", "test metrics not numbers"])
def test_a_tampered_study_attribute_is_named_not_a_traceback(study: Study, tmp_path: Path, tampering: str) -> None:
    """Every attribute show/export read back is checked: exit 2, one paragraph naming the study and attribute."""
    storage = _tampered_copy(study, tmp_path)
    edits = {
        "config not JSON": ("UPDATE study_user_attributes SET value_json = '{not json' WHERE key = 'config'",
                            "the stored study attribute 'config' is '{not json'; expected JSON"),
        "hyperparameter not a number": ("UPDATE trial_user_attributes SET value_json = json_set(value_json, '$.lr', "
                                        "'abc') WHERE key = 'hyperparameters'",
                                        "trial 0's stored attribute 'hyperparameters' does not make a recipe"),
        "result not numbers": ("UPDATE trial_user_attributes SET value_json = json_set(value_json, '$.best', "
                               "'abc') WHERE key = 'result'", "trial 0's stored attribute 'result' is"),
        "steps not a number": ("UPDATE study_user_attributes SET value_json = '\"many\"' WHERE key = 'steps'",
                               "the stored study attribute 'steps' is 'many'; expected a whole number > 0"),
        "test metrics not numbers": ("UPDATE study_user_attributes SET value_json = '{\"test_loss\": \"low\"}' "
                                     "WHERE key = 'test.0'", "the stored study attribute 'test.0' is"),
    }
    sql, named = edits[tampering]
    _raw_edit(storage, sql)
    commands = [["export", "--storage", storage, "-o", str(tmp_path / "r.yaml")]]
    if tampering != "hyperparameter not a number":  # show lists the searched parameters, which stay intact
        commands.append(["show", "--storage", storage])
    for command in commands:
        result = invoke(*command)
        assert result.exit_code == 2, result.output
        message = result.output.strip()
        assert message.startswith("Error: study 'model': ") and named in message, message
        assert "\n" not in message and "Traceback" not in message
    assert not (tmp_path / "r.yaml").exists()


def test_export_refuses_a_planted_symlink_and_the_config_itself_without_force(study: Study, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A symlink planted at recipes/<study>.yaml made the export replace the file it points to, and `-o CONFIG`
    replaced the model YAML with a recipe; both need --force now, and nothing is written without it."""
    monkeypatch.chdir(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("someone's file\n")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "model.yaml").symlink_to(victim)
    planted = invoke("export", "--storage", study.storage)
    assert planted.exit_code == 2, planted.output
    assert "is a symbolic link to" in planted.output and "--force" in planted.output
    assert victim.read_text() == "someone's file\n"
    (tmp_path / "own").mkdir()
    config = fault_config(tmp_path / "own", trials=1)
    original = config.read_text()
    for command in (["export", str(config), "--storage", study.storage, "-o", str(config)],
                    ["search", str(config), "-o", str(config)]):
        result = invoke(*command)
        assert result.exit_code == 2, result.output
        assert f"is the model YAML {config} itself" in " ".join(result.output.split())
        assert config.read_text() == original
    assert not (tmp_path / "own" / "study.db").exists(), "the search started"
