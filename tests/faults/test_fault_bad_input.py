"""Bad input found by the adversarial pass of issue 13: each ends with one paragraph and exit 2 (1 for an
unreachable store), never a traceback, and never after hours of work.

Real stores and real training throughout; the only stand-in is ``sys.modules[driver] = None`` to make a database
driver that is installed look missing (a real ``ImportError`` from the real import machinery).
"""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from tests.faults.conftest import fault_config, invoke, storage_of
from tests.search_support import REPO, cli, cli_popen, stop, write_config

EXAMPLE = REPO / "examples" / "digits_mlp.yaml"
ADAM_RECIPE = REPO / "recipes" / "digits_mlp-adam.yaml"


def assert_one_paragraph(result_output: str) -> None:
    assert "Traceback" not in result_output
    errors = [line for line in result_output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result_output


# ------------------------------------------------------------------------------------------------ train


@pytest.mark.slow
def test_train_with_a_recipe_that_diverges_exits_2(tmp_path: Path) -> None:
    raw = yaml.safe_load(ADAM_RECIPE.read_text())
    raw["hyperparameters"]["lr"] = 1e4
    recipe = tmp_path / "exploding.yaml"
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = cli("train", str(EXAMPLE), "--recipe", str(recipe), cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert_one_paragraph(result.stderr)
    assert f"recipe {recipe} does not train" in result.stderr and "diverged" in result.stderr


@pytest.mark.parametrize("edit, field", [
    ({"format": 99}, "format: expected format 1"),
    ({"hyperparameters": {"lr": float("nan")}}, "hyperparameters.lr"),
    ({"hyperparameters": {"lr": 0.01, "no_such_option": 1}}, "hyperparameters: expected arguments accepted by adam"),
])
def test_train_reports_recipe_errors_against_the_recipe(tmp_path: Path, edit: dict, field: str) -> None:
    raw = {**yaml.safe_load(ADAM_RECIPE.read_text()), **edit}
    recipe = tmp_path / "edited.yaml"
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = invoke("train", str(EXAMPLE), "--recipe", str(recipe))
    assert result.exit_code == 2, result.output
    assert_one_paragraph(result.output)
    assert field in result.output and str(recipe) in result.output
    assert "optimizer.options" not in result.output


def test_train_and_recipe_find_refuse_special_recipe_files(tmp_path: Path) -> None:
    """A FIFO (endless devices are read in a memory-limited child by tests/test_recipes.py)."""
    os.mkfifo(tmp_path / "pipe.yaml")
    result = invoke("train", str(EXAMPLE), "--recipe", str(tmp_path / "pipe.yaml"))
    assert result.exit_code == 2, result.output
    assert "not a regular file" in result.output
    assert_one_paragraph(result.output)
    listing = tmp_path / "dir"
    listing.mkdir()
    os.mkfifo(listing / "stuck.yaml")
    found = invoke("recipe", "find", str(EXAMPLE), "--recipes-dir", str(listing), "-f", "json")
    assert found.exit_code == 0, found.output  # the FIFO is skipped, not waited on


# ------------------------------------------------------------------------------------------------ stores


@pytest.mark.parametrize("url, words", [
    ("mysql+mysqldb://tuner:pw-in-url@db/kfac", ["'MySQLdb'", "pip install MySQLdb"]),
    ("postgresql+pg8000://tuner@db/kfac?password=pw-in-url", ["'pg8000'", "pip install pg8000"]),
    ("nosuchdb://db/kfac", ["unknown database kind 'nosuchdb'"]),
    ("not a url at all", ["is not a database URL"]),
])
@pytest.mark.parametrize("command", ["search", "show", "export"])
def test_a_storage_whose_driver_is_missing_exits_2_naming_the_install(tmp_path: Path, url: str, words: list[str],
                                                                     command: str) -> None:
    module = words[0].strip("'")
    if module in ("MySQLdb", "pg8000"):
        try:
            __import__(module)
            pytest.skip(f"{module} is installed here")
        except ImportError:
            pass
    args = [command, *([str(fault_config(tmp_path))] if command == "search" else []), "--storage", url]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert_one_paragraph(result.output)
    assert all(word in result.output for word in words), result.output
    assert "pw-in-url" not in result.output


def test_a_missing_psycopg2_names_the_postgres_extra(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['psycopg2'] = None; from kfac_tune.cli import main; "
            "sys.argv = ['kfac-tune', 'show', '--storage', 'postgresql+psycopg2://tuner:pw-in-url@db/kfac']; main()")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2, done.stderr
    assert "pip install 'kfac-tune[postgres]'" in done.stderr and "pw-in-url" not in done.stderr
    assert_one_paragraph(done.stderr)


@pytest.mark.parametrize("uri", ["/tmp/mlruns", "mlruns", "file:///tmp/mlruns", "gopher://example.org/x",
                                 "sqlite:relative.db"])
def test_unsupported_tracking_uris_exit_2(tmp_path: Path, uri: str) -> None:
    config = fault_config(tmp_path, tracking=True)
    for args in (["search", str(config), "--tracking-uri", uri],
                 ["compare", str(EXAMPLE), "--recipes", str(ADAM_RECIPE), "--tracking-uri", uri,
                  "-o", str(tmp_path / "out")]):
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        assert "tracking.uri: expected an MLflow tracking URI" in result.output
        assert_one_paragraph(result.output)
    assert not Path(storage_of(tmp_path).removeprefix("sqlite:///")).exists()


@pytest.mark.parametrize("spelling", ["same", "relative", "dotted"])
def test_one_sqlite_file_as_storage_and_tracking_store_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 spelling: str) -> None:
    monkeypatch.chdir(tmp_path)
    config = fault_config(tmp_path, tracking=True)
    storage = f"sqlite:///{tmp_path / 'both.db'}"
    tracking = {"same": storage, "relative": "sqlite:///both.db", "dotted": "sqlite:///./sub/../both.db"}[spelling]
    result = invoke("search", str(config), "--storage", storage, "--tracking-uri", tracking)
    assert result.exit_code == 2, result.output
    assert "are the same SQLite file" in result.output
    assert_one_paragraph(result.output)
    assert not (tmp_path / "both.db").exists()


# ------------------------------------------------------------------------------------------------ compare / CLI


@pytest.mark.parametrize("where", ["under a file", "a device", "a fifo output"])
def test_compare_into_an_unwritable_place_fails_before_training(tmp_path: Path, where: str) -> None:
    (tmp_path / "file").write_text("x")
    output = {"under a file": tmp_path / "file" / "sub", "a device": Path("/dev/null"), "a fifo output": tmp_path}[where]
    if where == "a fifo output":
        os.mkfifo(tmp_path / "compare-digits_mlp.json")
    started = time.monotonic()
    result = invoke("compare", str(EXAMPLE), "--recipes", str(ADAM_RECIPE), "-o", str(output), "--no-tracking")
    assert result.exit_code == 2, result.output
    assert_one_paragraph(result.output)
    assert "training" not in result.output.lower() or "Error" in result.output
    assert not list(tmp_path.glob("compare-*.png")), "nothing is trained or written"
    assert time.monotonic() - started < 600  # bounded: a hang would be the failure, not a slow machine


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "0", "NaN"])
def test_a_timeout_must_be_a_finite_positive_number(tmp_path: Path, value: str) -> None:
    result = invoke("search", str(fault_config(tmp_path)), f"--timeout={value}")
    assert result.exit_code == 2, result.output
    assert "--timeout" in result.output and "Traceback" not in result.output


@pytest.mark.slow
@pytest.mark.parametrize("gap_s", [0.0, 0.05, 0.2])
def test_a_double_ctrl_c_exits_130_with_a_quoted_resume_command(tmp_path: Path, gap_s: float) -> None:
    config = write_config(tmp_path, "my model; touch X.yaml", training={"steps": 100000, "eval_every": 50},
                          search={"trials": 2, "pruner": "none"})
    # --study: a study name must be a plain file name (it names recipes/<study>.yaml), so the file's stem cannot be
    # one; the config path, which the resume command repeats, still carries the shell metacharacters
    process = cli_popen("search", str(config), "--study", "model", cwd=tmp_path)
    try:
        deadline = time.monotonic() + 300
        while not _running(tmp_path) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        assert _running(tmp_path), "the trial never started"
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        time.sleep(gap_s)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=300)
    finally:
        stop(process)
    assert process.returncode == 130, output
    assert "Traceback" not in output
    assert f"Resume with: kfac-tune search '{config}' --study model" in output
    assert not (tmp_path / "X.yaml").exists()


@pytest.mark.slow
@pytest.mark.parametrize("delay_s", [0.0, 0.2])
def test_ctrl_c_right_after_the_search_finished_is_no_silent_kill(tmp_path: Path, delay_s: float) -> None:
    """Python spent about 2 s tearing torch and MLflow down after a search, with its signal handlers reset: a
    Ctrl-C then killed the process by the signal (status -2) without a word, although the recipe was written. Now
    the process ends once its atexit handlers ran, and a Ctrl-C before that says nothing was interrupted."""
    config = write_config(tmp_path, search={"trials": 1})
    process = cli_popen("search", str(config), "--no-tracking", "-o", str(tmp_path / "r.yaml"), cwd=tmp_path)
    try:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:  # the search's last line: every trial and the export are done
            lines.append(line)
            if line.startswith("best recipe written"):
                break
        time.sleep(delay_s)
        process.send_signal(signal.SIGINT)
        output = "".join(lines) + process.communicate(timeout=300)[0]
    finally:
        stop(process)
    assert process.returncode in (0, 130), output  # 130: the Ctrl-C landed before the command returned
    assert "Traceback" not in output and (tmp_path / "r.yaml").exists()
    if process.returncode == 130:
        assert "Error: interrupted" in output


def _running(directory: Path) -> bool:
    try:
        with sqlite3.connect(directory / "study.db") as db:
            return bool(db.execute("select count(*) from trials where state = 'RUNNING'").fetchone()[0])
    except sqlite3.Error:
        return False


# ------------------------------------------------------------------------------------------------ optimizer state


@pytest.mark.parametrize("other", ["wider", "deeper", "renamed"])
def test_kfac_state_of_another_architecture_fails_at_load(other: str) -> None:
    from kfac_tune.optim import KFAC

    torch.manual_seed(0)

    def trained(model: nn.Module) -> KFAC:
        optimizer = KFAC(model, inv_update_freq=1)
        x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        return optimizer

    saved = trained(nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 3))).state_dict()
    model = {"wider": nn.Sequential(nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3)),
             "deeper": nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 4), nn.Linear(4, 3)),
             "renamed": nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Identity(), nn.Linear(4, 3))}[other]
    optimizer = trained(model)
    before = {k: v.clone() for k, v in optimizer.state_dict()["kfac"]["blocks"]["0"].items()
              if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match="saved for another model"):
        optimizer.load_state_dict(saved)
    after = optimizer.state_dict()["kfac"]["blocks"]["0"]
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused state was partly loaded"
    same = trained(nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 3)))
    same.load_state_dict(saved)  # the same architecture still loads


# ------------------------------------------------------------------------------------------------ store directories


@pytest.mark.parametrize("store", ["storage", "tracking"])
@pytest.mark.parametrize("kind", ["read-only", "through a file"])
def test_a_store_in_an_unusable_directory_exits_2_in_one_paragraph(tmp_path: Path, kind: str, store: str) -> None:
    """A read-only filesystem, or a path through a regular file (what a non-root user also meets as a directory
    without write permission): the set-up lock beside the store cannot be created."""
    import contextlib

    from tests.faults.conftest import remount_read_only, small_tmpfs

    config = fault_config(tmp_path, trials=1, tracking=store == "tracking")
    option = "--storage" if store == "storage" else "--tracking-uri"
    with contextlib.ExitStack() as stack:
        if kind == "read-only":
            directory = stack.enter_context(small_tmpfs(tmp_path / "mnt"))
            remount_read_only(directory)
        else:
            (tmp_path / "a-file").write_text("not a directory\n")
            directory = tmp_path / "a-file" / "stores"
        result = invoke("search", str(config), option, f"sqlite:///{directory / 'store.db'}")
    assert result.exit_code == 2, result.output
    assert_one_paragraph(result.output)
    assert f"cannot set up a store in {directory}" in " ".join(result.output.split())


@pytest.mark.parametrize("store", ["storage", "tracking"])
def test_a_store_path_that_is_a_directory_fails_at_once(tmp_path: Path, store: str) -> None:
    """sqlite:///DIR: MLflow's store retried opening it for about 108 s before failing; now exit 2 up front."""
    (tmp_path / "a-directory").mkdir()
    config = fault_config(tmp_path, trials=1, tracking=store == "tracking")
    option = "--storage" if store == "storage" else "--tracking-uri"
    result = invoke("search", str(config), option, f"sqlite:///{tmp_path / 'a-directory'}")
    assert result.exit_code == 2, result.output
    assert_one_paragraph(result.output)
    assert f"{tmp_path / 'a-directory'} is a directory" in " ".join(result.output.split())
    assert not (tmp_path / "study.db").exists() or store == "tracking"


@pytest.mark.parametrize("kind", ["fifo", "socket"])
def test_a_recipes_dir_that_is_not_a_directory_is_refused(tmp_path: Path, kind: str) -> None:
    """Click's file_okay=False let anything that is not a regular file through, and it was searched as empty."""
    import socket

    special = tmp_path / "recipes-special"
    if kind == "fifo":
        os.mkfifo(special)
    else:
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(special))
    config = fault_config(tmp_path, trials=1)
    result = invoke("recipe", "find", str(config), "--recipes-dir", str(special))
    assert result.exit_code == 2, result.output
    assert f"{special} is not a directory" in " ".join(result.output.split())
