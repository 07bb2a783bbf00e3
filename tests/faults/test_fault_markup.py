"""Stored strings reach the terminal as text, never as rich markup (issue 23).

A study name, a fail reason, a recipe's dataset are data that anyone with write access to a shared storage or
recipes directory chooses. Read as markup, ``[/x]`` ended ``show``, ``recipe find`` and ``search --warm-start``
in a MarkupError (the warm start left its trial WAITING) and ``[link=...]`` made a clickable link. Each scenario
plants such strings in a real study or recipe and checks the command prints them as written.
"""
from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml

from tests.faults.conftest import fault_config, invoke, storage_of

pytestmark = pytest.mark.slow
MARKUP = "[/x][link=https://evil.example]click[/link][bold]"


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A one-trial study and its recipe, in a directory of their own."""
    directory = tmp_path_factory.mktemp("markup")
    config = fault_config(directory, trials=1)
    result = invoke("search", str(config), "-o", str(directory / "recipes" / "model.yaml"))
    assert result.exit_code == 0, result.output
    yield directory


def test_show_prints_a_stored_study_name_and_fail_reason_as_written(searched: Path, tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    optuna.copy_study(from_study_name="model", from_storage=storage_of(searched), to_storage=storage,
                      to_study_name=MARKUP)
    with sqlite3.connect(tmp_path / "shared.db") as connection:  # a fail reason as a shared storage may hold it
        connection.execute("INSERT INTO trial_user_attributes (trial_id, key, value_json) VALUES (1, 'fail_reason', ?)",
                           (f'"{MARKUP}"',))
    optuna.load_study(study_name=MARKUP, storage=storage).enqueue_trial({})
    result = invoke("show", "--storage", storage)
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert f"study {MARKUP}: 2 trials" in output  # the title, as written: no markup read, no link made
    assert "[/x][link=https://evil.exa" in output  # the reason column (cut to its width)
    assert "WAITING" in output and "[]WAITING" not in output  # an enqueued trial's state, without a stray style


def _planted_recipe(searched: Path, directory: Path) -> Path:
    recipe = yaml.safe_load((searched / "recipes" / "model.yaml").read_text())
    recipe["training"]["dataset"] = MARKUP
    directory.mkdir()
    path = directory / "planted.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_recipe_find_prints_a_recipes_dataset_as_written(searched: Path, tmp_path: Path) -> None:
    _planted_recipe(searched, tmp_path / "shared")
    config = fault_config(tmp_path, trials=1)
    result = invoke("recipe", "find", str(config), "--recipes-dir", str(tmp_path / "shared"), "-n", "3")
    assert result.exit_code == 0, result.output
    assert "[/x][link" in result.output.replace("\n", "")


def test_a_warm_start_from_such_a_recipe_runs_and_leaves_no_waiting_trial(searched: Path, tmp_path: Path) -> None:
    planted = _planted_recipe(searched, tmp_path / "shared")
    config = fault_config(tmp_path, trials=1, search={"enqueue_defaults": False})
    result = invoke("search", str(config), "--warm-start", "--recipes-dir", str(tmp_path / "shared"), "-o",
                    str(tmp_path / "out.yaml"))
    assert result.exit_code == 0, result.output
    joined = result.output.replace("\n", "")  # rich wraps the line at the console's width
    assert "warm start: " in joined and planted.name in joined and MARKUP in joined
    states = [t.state.name for t in optuna.load_study(study_name="model", storage=storage_of(tmp_path)).trials]
    assert states == ["COMPLETE"]
