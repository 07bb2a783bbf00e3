"""Multi-objective studies: the Pareto front, ``show``, ``export --pick``, and the Pareto plot in MLflow.

The constructed study has trials with known (eval_loss, train_seconds) values, added with ``study.add_trial`` to
a study opened by the search's own ``open_study`` (real SQLite storage), so the right answers are known:

    trial  eval_loss  seconds
      0      0.300      40     best metric                       Pareto
      1      0.305      15                                       Pareto
      2      0.3059     12     fastest within 2 % (<= 0.306)     Pareto
      3      0.310       5     fastest overall, 3.3 % off        Pareto
      4      0.500      50     dominated by all
      5      0.320      14     dominated by trial 2
"""
from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from optuna.distributions import FloatDistribution
from optuna.trial import create_trial

from kfac_tune.cli import cli
from kfac_tune.config import load_config
from kfac_tune.recipes import load_recipe
from kfac_tune.search.selection import Pick, choose, parse_pick, pareto_front
from kfac_tune.search.space import build_space
from kfac_tune.search.prepare import preflight_space
from kfac_tune.search.study import open_study
from tests.search_support import load_study, write_config

POINTS = [(0.300, 40.0), (0.305, 15.0), (0.3059, 12.0), (0.310, 5.0), (0.500, 50.0), (0.320, 14.0)]
LR = FloatDistribution(1e-5, 1e-1, log=True)


def constructed(tmp_path: Path, objectives: list[str] | None = ("eval_loss", "train_seconds")) -> optuna.Study:
    search = {"objectives": list(objectives)} if objectives else {}
    cfg = load_config(write_config(tmp_path, optimizer="adam", search=search))
    space = build_space(cfg)
    study = open_study(cfg, "constructed", cfg.storage, preflight_space(cfg, space), space)
    for i, (loss, seconds) in enumerate(POINTS):
        lr = 1e-3 * (1 + i)
        study.add_trial(create_trial(
            values=[loss, seconds] if objectives else [loss], params={"lr": lr}, distributions={"lr": LR},
            user_attrs={"hyperparameters": {"lr": lr}, "result": {"train_seconds": seconds, "steps": 60}}))
    return study


def test_pareto_front_and_picks(tmp_path: Path) -> None:
    study = constructed(tmp_path)
    assert [t.number for t in pareto_front(study)] == [0, 1, 2, 3]
    assert choose(study, parse_pick("best")).number == 0
    assert choose(study, parse_pick("fastest-within=2%")).number == 2
    assert choose(study, parse_pick("fastest-within=5%")).number == 3
    assert choose(study, parse_pick("fastest-within=0%")).number == 0
    with pytest.raises(ValueError, match="fastest-within=P%"):
        parse_pick("fastest")


def test_single_objective_study_picks_by_recorded_seconds(tmp_path: Path) -> None:
    study = constructed(tmp_path, objectives=None)
    assert len(study.directions) == 1
    assert choose(study, Pick()).number == 0 and [t.number for t in pareto_front(study)] == [0]
    assert choose(study, parse_pick("fastest-within=2%")).number == 2


def test_show_prints_the_front_and_export_picks_from_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    constructed(tmp_path)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    runner = CliRunner(env={"COLUMNS": "200"})
    rows = json.loads(runner.invoke(cli, ["show", "--storage", storage, "-f", "json"]).stdout)
    assert {row["number"] for row in rows if row["pareto"]} == {0, 1, 2, 3}
    assert rows[0]["values"] == {"eval_loss": 0.3, "train_seconds": 40.0}
    table = runner.invoke(cli, ["show", "--storage", storage]).stdout
    assert "Pareto front (eval_loss vs train_seconds)" in table

    result = runner.invoke(cli, ["export", "--storage", storage, "--pick", "fastest-within=2%", "-o", "fast.yaml"])
    assert result.exit_code == 0, result.output
    recipe = load_recipe(tmp_path / "fast.yaml")
    assert recipe.provenance.trial == 2 and recipe.hyperparameters == {"lr": 3e-3}
    assert recipe.result.value == 0.3059 and recipe.result.train_seconds == 12.0
    assert recipe.result.pick == "fastest-within=2%" and recipe.result.test_value is not None
    study = load_study(storage, "constructed")
    assert "test.2" in study.user_attrs  # measured once, kept on the study

    bad = runner.invoke(cli, ["export", "--storage", storage, "--pick", "quickest"])
    assert bad.exit_code == 2 and "fastest-within=P%" in bad.output and "Traceback" not in bad.output


def test_multi_objective_search_without_pruning_and_with_the_pareto_plot(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, optimizer="adam", tracking={"enabled": True},
                          search={"trials": 3, "objectives": ["eval_loss", "train_seconds"]})
    result = CliRunner().invoke(cli, ["search", str(config), "-o", str(tmp_path / "best.yaml")])
    assert result.exit_code == 0, result.output
    assert "the median pruner is off" in result.output
    study = load_study(f"sqlite:///{tmp_path / 'study.db'}", "model")
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    assert study.metric_names == ["eval_loss", "train_seconds"]
    assert all(t.state.name == "COMPLETE" and not t.intermediate_values for t in study.trials)  # never reported
    for trial in study.trials:
        assert trial.values[1] == trial.user_attrs["result"]["train_seconds"]
    recipe = load_recipe(tmp_path / "best.yaml")
    assert recipe.provenance.trial == min(study.trials, key=lambda t: t.values[0]).number

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    artifacts = [a.path for a in client.list_artifacts(study.user_attrs["mlflow_parent_run_id"], "plots")]
    assert {"plots/interactive.html", "plots/pareto_front.png"} <= set(artifacts)  # one page holds every HTML plot
    page = client.download_artifacts(study.user_attrs["mlflow_parent_run_id"], "plots/interactive.html", str(tmp_path))
    assert "pareto_front" in Path(page).read_text()
