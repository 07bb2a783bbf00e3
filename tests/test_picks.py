"""Picks and listings that mean what they say: a ``--pick`` that does not apply to a study's budget is refused,
``show`` ranks pruned trials by their value when cut among the completed ones, and ``train`` under a seconds
budget speaks in seconds. Real SQLite studies of a digits MLP, real (tiny) training."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.search_support import cli, invoke, load_study, write_config

pytestmark = pytest.mark.slow

SECONDS = {"steps": None, "budget": {"seconds": 0.3}}


def test_fastest_within_is_refused_under_a_seconds_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, training=SECONDS, search={"trials": 2})
    assert cli("search", str(config), "--no-tracking", cwd=tmp_path).returncode == 0
    refused = cli("export", str(config), "--pick", "fastest-within=5%", "-o", str(tmp_path / "fast.yaml"),
                  cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr
    assert "training.budget.seconds" in refused.stderr and "--pick best" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "fast.yaml").exists()

    # the recipe speaks in the budget's unit, and train does not compare its steps with the internal step cap
    recipe = tmp_path / "recipes" / "model.yaml"
    trained = cli("train", str(config), "--recipe", str(recipe), "--no-tracking", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert "note" not in trained.stdout + trained.stderr, trained.stdout  # was: tuned with steps N, uses 1000000000
    longer = cli("train", str(config), "--recipe", str(recipe), "--no-tracking", "--set",
                 "training.budget.seconds=0.4", cwd=tmp_path)
    assert "note: the recipe was tuned with seconds 0.3, " in longer.stdout and "uses 0.4" in longer.stdout, \
        longer.stdout


def test_show_ranks_a_pruned_trial_by_its_value_when_cut(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A trial cut while it stood better than every completed one is listed above them (and shows that value); one
    that diverged is listed last, whatever it reported before."""
    import optuna

    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, search={"trials": 2})
    assert cli("search", str(config), "--no-tracking", cwd=tmp_path).returncode == 0
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = load_study(storage, "model")
    best = min(t.value for t in study.trials if t.state.name == "COMPLETE")
    worst = max(t.value for t in study.trials if t.state.name == "COMPLETE")
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED,
                                              intermediate_values={20: best / 2}))  # cut while leading
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED,
                                              intermediate_values={20: worst * 2}))
    study.add_trial(optuna.trial.create_trial(  # good at step 20, then diverged: not a lead, whatever it reported
        state=optuna.trial.TrialState.PRUNED, intermediate_values={20: best / 4},
        user_attrs={"prune_reason": "diverged: train_loss = nan at step 40"}))

    rows = json.loads(invoke("show", "--storage", storage, "-f", "json"))
    ranked = [row.get("value_when_cut") if row["state"] == "PRUNED" else row["value"] for row in rows]
    assert [row["state"] for row in rows] == ["PRUNED", "COMPLETE", "COMPLETE", "PRUNED", "PRUNED"]
    assert ranked[:4] == sorted(ranked[:4]) and ranked[0] == best / 2 and ranked[4] is None
