"""What the CLI prints: the live display ends on its own line, apart from what follows; piped tables keep their
natural width instead of rich's 80 columns; ``search -f json`` gives scripts the result."""
from __future__ import annotations

import io
import json
from pathlib import Path

import optuna
import pytest
from rich.console import Console

from kfac_tune.display import PIPED_WIDTH, SearchDisplay, fmt
from tests.search_support import cli, write_config


def test_search_display_ends_with_a_blank_line_when_piped() -> None:
    """Rich leaves a live display's last line open when not on a terminal: the table or ``Error:`` was glued to it."""
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(params={"lr": 0.5}, value=0.25,
                                              distributions={"lr": optuna.distributions.FloatDistribution(0, 1)}))
    out = io.StringIO()
    with SearchDisplay(Console(file=out, width=80), budget=1, metric="eval_loss") as display:
        display.update(study)
    print("Error: something", file=out)
    lines = out.getvalue().splitlines()
    assert lines[-1] == "Error: something" and lines[-2] == ""
    assert lines[-3].strip() == "best so far: trial 0  eval_loss = 0.25  (lr=0.5)"


def test_piped_search_prints_full_width_tables_and_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    config = write_config(tmp_path, search={"trials": 2})
    result = cli("search", str(config), "--no-tracking", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.endswith("\n\n"), result.stderr  # the display is closed, apart, before the table

    data = json.loads(cli("search", str(config), "--no-tracking", "-f", "json", cwd=tmp_path).stdout)
    assert data["recipe"] == "recipes/model.yaml" and len(data["trials"]) == 2
    table_lines = result.stdout.splitlines()
    assert 80 < max(map(len, table_lines)) < PIPED_WIDTH
    for trial in data["trials"]:  # each trial's parameters on one row, unfolded and uncut
        params = " ".join(f"{name}={fmt(value)}" for name, value in trial["params"].items())
        assert any(params in line for line in table_lines), (params, result.stdout)
