"""``kfac-tune compare``: the common target, the table, the plot and the MLflow run, on a tiny digits MLP."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from kfac_tune.cli import cli
from kfac_tune.compare import RecipeRuns, common_target
from kfac_tune.recipes import load_recipe
from kfac_tune.training import TrainResult
from tests.search_support import recipe_for, write_config

KFAC_POINT = {"lr": 0.02, "damping": 1e-2, "momentum": 0.5, "inv_update_freq": 5}
ADAM_POINT = {"lr": 3e-3}


def run_of(values: list[float], metric: str = "eval_loss") -> TrainResult:
    curves = [{"step": 10 * (i + 1), metric: v, "train_seconds": 0.1 * (i + 1)} for i, v in enumerate(values)]
    best = min(values) if metric != "eval_accuracy" else max(values)
    return TrainResult(metric, values[-1], best, curves, 10 * len(values), 1.0, 0.1 * len(values), "cpu")


def test_target_is_the_worst_best_and_steps_count_to_it(tmp_path: Path) -> None:
    recipe = load_recipe(recipe_for(write_config(tmp_path), "adam", ADAM_POINT, tmp_path / "r.yaml"))
    fast = RecipeRuns("fast", tmp_path, recipe, [run_of([1.0, 0.2, 0.1]), run_of([0.9, 0.3, 0.15])])
    slow = RecipeRuns("slow", tmp_path, recipe, [run_of([2.0, 1.0, 0.5]), run_of([2.0, 0.4, 0.3])])
    target = common_target([fast, slow], maximize=False)
    assert target == 0.5  # slow's worse seed bottoms out at 0.5: everyone reaches it, not fast's own 0.1
    assert fast.to_target(target, maximize=False) == [(20, 0.2), (20, 0.2)]
    assert slow.to_target(target, maximize=False) == [(30, pytest.approx(0.3)), (20, 0.2)]
    accuracy = RecipeRuns("acc", tmp_path, recipe, [run_of([0.5, 0.9], "eval_accuracy"),
                                                    run_of([0.6, 0.8], "eval_accuracy")])
    assert common_target([accuracy], maximize=True) == 0.8


def test_compare_cli_table_plot_and_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, training={"steps": 30, "eval_every": 10}, tracking={"enabled": True})
    kfac = recipe_for(config, "kfac", KFAC_POINT, tmp_path / "tiny-kfac.yaml")
    adam = recipe_for(config, "adam", ADAM_POINT, tmp_path / "tiny-adam.yaml")
    result = CliRunner(env={"COLUMNS": "200"}).invoke(
        cli, ["compare", str(config), "--recipes", str(kfac), str(adam), "--seeds", "2", "-o", str(tmp_path / "out")],
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "tiny-kfac" in result.stdout and "steps to target" in result.stdout
    data = json.loads((tmp_path / "out" / "compare-model.json").read_text())
    rows = {row["recipe"]: row for row in data["recipes"]}
    assert set(rows) == {"tiny-kfac", "tiny-adam"} and data["seeds"] == [0, 1]
    assert data["target"] >= max(row["best"]["mean"] for row in rows.values())  # no better than anyone's best
    for row in rows.values():
        assert row["seeds"] == 2 and row["steps_to_target"]["mean"] <= 30 and row["step_time_ms"]["mean"] > 0
        assert row["test"]["test_loss"] == row["final_test"]  # every test metric, the ranked one included
        assert 0.1 < row["test"]["test_accuracy"]["mean"] <= 1  # digits: chance is 0.1
    assert (tmp_path / "out" / "compare-model.png").read_bytes()[:4] == b"\x89PNG"

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("model").experiment_id])
    assert run.data.tags["kfac_tune.kind"] == "compare" and run.data.metrics["target"] == data["target"]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"compare-model.png", "compare-model.json"}


def test_compare_refuses_a_recipe_for_another_network(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    other = write_config(tmp_path, "other.yaml", model={"name": "mlp", "kwargs": {"hidden": [16]}})
    foreign = recipe_for(other, "adam", ADAM_POINT, tmp_path / "foreign.yaml")
    result = CliRunner().invoke(cli, ["compare", str(config), "--recipes", str(foreign), "--no-tracking"])
    assert result.exit_code == 2 and "signature" in result.output


def test_compare_does_not_print_kfacs_safety_warnings(tmp_path: Path) -> None:
    """A recipe whose updates K-FAC's guards skip (lr 1e6 without the trust region, a tight update-size guard)
    raises KFACWarning in plain training; compare, like a search, shows what the guards did in its curves and
    counts, not as warning lines that name no recipe or seed and point into the training loop."""
    import warnings

    from kfac_tune.compare import compare
    from kfac_tune.optim import KFACWarning

    config = write_config(tmp_path, training={"steps": 10, "eval_every": 5},
                          optimizer={"name": "kfac", "options": {"max_update_ratio": 1.0}})
    wild = recipe_for(config, "kfac", {**KFAC_POINT, "lr": 1e6, "kl_clip": None}, tmp_path / "wild.yaml")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compare(config, [wild], seeds=1)
    assert not [str(w.message) for w in caught if issubclass(w.category, KFACWarning)]
