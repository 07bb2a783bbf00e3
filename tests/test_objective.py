"""``search.objective``: the value of its validation curve a trial reports and is pruned on (final, best, auc).

Real SQLite studies of a digits MLP. The reported values are checked against the curve of the same setting
trained again in this process (one CPU thread, same seed: the same numbers), not against a formula applied to
what the trial itself stored.
"""
from __future__ import annotations

import numpy as np
import pytest

from kfac_tune import record
from kfac_tune.config import load_config
from kfac_tune.recipes import load_recipe
from kfac_tune.search.selection import trial_arguments
from kfac_tune.search.space import with_training
from kfac_tune.training import train
from tests.search_support import cli, invoke, load_study, write_config

pytestmark = pytest.mark.slow

TRAINING = {"steps": 60, "eval_every": 10}


def _search(tmp_path, objective: str):
    config = write_config(tmp_path, training=TRAINING, search={"trials": 2, "objective": objective,
                                                               "pruner": {"name": "none"}})
    result = cli("search", str(config), "--no-tracking", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    study = load_study(f"sqlite:///{tmp_path / 'study.db'}", "model")
    return load_config(config), study, [t for t in study.trials if t.state.name == "COMPLETE"]


def _curve(cfg, trial, **training):
    rerun = with_training(cfg, trial.params)
    if training:
        rerun = rerun.model_copy(update={"training": rerun.training.model_copy(update=training)})
    return train(rerun, trial_arguments(trial, cfg.optimizer.name), test=bool(training))


def test_best_reports_the_best_value_and_the_recipe_stops_where_it_was_reached(tmp_path) -> None:
    cfg, study, complete = _search(tmp_path, "best")
    for trial in complete:
        curve = [point["eval_loss"] for point in _curve(cfg, trial).curves]
        assert trial.value == pytest.approx(min(curve), rel=1e-6)
        steps = sorted(trial.intermediate_values)
        assert [trial.intermediate_values[s] for s in steps] == pytest.approx(np.minimum.accumulate(curve))
        assert record.result(trial)["best_step"] == 10 * (int(np.argmin(curve)) + 1)

    recipe = load_recipe(tmp_path / "recipes" / "model.yaml")
    chosen = study.trials[recipe.provenance.trial]
    best_step = record.result(chosen)["best_step"]
    assert recipe.result.objective == "best" and recipe.training.steps == best_step
    # the test value is the early-stopped model's: trained to best_step, not to the end of the budget
    stopped = _curve(cfg, chosen, steps=best_step)
    assert recipe.result.test_value == pytest.approx(stopped.test["test_loss"], rel=1e-6)
    # show says which quantity its value column holds
    assert "best eval_loss" in invoke("show", "--storage", f"sqlite:///{tmp_path / 'study.db'}")


def test_auc_reports_the_mean_of_the_curve_over_the_budget(tmp_path) -> None:
    cfg, study, complete = _search(tmp_path, "auc")
    for trial in complete:
        points = _curve(cfg, trial).curves
        steps = np.array([p["step"] for p in points], dtype=float)
        values = np.array([p["eval_loss"] for p in points])
        area = np.sum((steps[1:] - steps[:-1]) * (values[1:] + values[:-1]) / 2)
        assert trial.value == pytest.approx(area / (steps[-1] - steps[0]), rel=1e-6)
        assert trial.value != pytest.approx(values[-1], rel=1e-3)  # not the final value
    recipe = load_recipe(tmp_path / "recipes" / "model.yaml")
    assert recipe.result.objective == "auc" and recipe.training.steps == TRAINING["steps"]


def test_the_objective_is_part_of_the_studys_identity(tmp_path) -> None:
    """A study of final values resumed with objective best would rank incomparable numbers: refused, exit 2."""
    _search(tmp_path, "final")
    config = write_config(tmp_path, training=TRAINING, search={"trials": 3, "objective": "best"})
    resumed = cli("search", str(config), "--no-tracking", cwd=tmp_path)
    assert resumed.returncode == 2 and "config hash" in resumed.stderr, resumed.stderr
