"""``training.budget.seconds``: every run trains for the same wall-clock, K-FAC and Adam alike.

Tolerance, from how the budget is enforced rather than from a machine's speed: the training clock is read after
every step, and the reads tile the training time (each step's duration is the difference of consecutive reads,
evaluations excluded), so a run stops at the first step that brings the clock to the budget ``S``. Its recorded
training seconds therefore lie in ``[S, S + d)``, ``d`` the duration of that last step, which is at most the run's
longest step (``max_step_seconds``, recorded), plus the timer's resolution for the reads themselves.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from kfac_tune.cli import cli
from kfac_tune.config import load_config, parse_config
from kfac_tune.search.objective import pruning_positions
from kfac_tune.training import train
from tests.search_support import load_study, tiny_config, write_config

BUDGET_S = 0.6
RESOLUTION_S = time.get_clock_info("perf_counter").resolution


@pytest.mark.parametrize("optimizer, hparams", [("kfac", {"damping": 0.1, "kl_clip": 1e-3}), ("adam", {"lr": 1e-3})])
def test_each_optimizer_trains_for_the_budget(optimizer: str, hparams: dict, tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, optimizer=optimizer, training={
        "steps": None, "budget": {"seconds": BUDGET_S}, "eval_every": 10}))
    result = train(cfg, hparams)
    longest = result.max_step_seconds
    assert longest is not None and longest > 0
    assert BUDGET_S <= result.train_seconds <= BUDGET_S + longest + RESOLUTION_S, (result.train_seconds, longest)
    assert result.steps == result.curves[-1]["step"] and result.steps > 1  # the steps reached are recorded
    steps = [point["step"] for point in result.curves]
    assert steps[:-1] == list(range(10, 10 * len(steps), 10))  # evaluations every eval_every steps, then the last
    assert result.curves[-1]["train_seconds"] == result.train_seconds


def test_kfac_and_adam_get_the_same_seconds(tmp_path: Path) -> None:
    """Both arms end within one (longest) step of the budget, so within that much of each other."""
    results = {}
    for optimizer, hparams in (("kfac", {"damping": 0.1, "kl_clip": 1e-3}), ("adam", {"lr": 1e-3})):
        cfg = load_config(write_config(tmp_path, optimizer=optimizer, training={
            "steps": None, "budget": {"seconds": BUDGET_S}, "eval_every": 25}))
        results[optimizer] = train(cfg, hparams)
    tolerance = max(r.max_step_seconds for r in results.values()) + RESOLUTION_S
    assert abs(results["kfac"].train_seconds - results["adam"].train_seconds) <= tolerance


def test_a_step_cap_ends_a_timed_run_first(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, optimizer="adam", training={
        "steps": 7, "budget": {"seconds": 3600}, "eval_every": 5}))
    result = train(cfg, {"lr": 1e-3})
    assert result.steps == 7 and [p["step"] for p in result.curves] == [5, 7] and result.train_seconds < 3600


def test_search_with_a_time_budget_prunes_at_evaluations(tmp_path: Path) -> None:
    """The pruner sees each evaluation at its step index; the recipe records the steps its trial reached."""
    config = write_config(tmp_path, optimizer="adam", training={
        "steps": None, "budget": {"seconds": 0.3}, "eval_every": 5}, search={
        "trials": 4, "pruner": {"name": "median", "args": {"n_startup_trials": 1}},
        "space": {"lr": {"low": 1e-5, "high": 1e-4, "log": True}}})
    result = CliRunner().invoke(cli, ["search", str(config), "--no-tracking", "-o", str(tmp_path / "r.yaml")])
    assert result.exit_code == 0, result.output
    study = load_study(f"sqlite:///{tmp_path / 'study.db'}", "model")
    for trial in study.trials:
        steps = sorted(trial.intermediate_values)
        assert steps and all(step % 5 == 0 for step in steps[:-1])
        if trial.state.name == "COMPLETE":
            assert steps[-1] == trial.user_attrs["result"]["steps"]
    from kfac_tune.recipes import load_recipe

    recipe = load_recipe(tmp_path / "r.yaml")
    assert recipe.training.steps == study.trials[recipe.provenance.trial].user_attrs["result"]["steps"]


def _on_a_clock(tmp_path: Path, optimizer: str, **sections: Any) -> dict[str, Any]:
    """The tiny config without a step budget, evaluated every ``eval_seconds`` instead of every ``eval_every``
    steps (``sections["training"]`` gives both the budget and ``eval_seconds``)."""
    config = tiny_config(tmp_path, optimizer=optimizer, **sections)
    config["training"]["steps"] = None
    del config["training"]["eval_every"]
    return config


@pytest.mark.parametrize("optimizer, hparams", [("kfac", {"damping": 0.1, "kl_clip": 1e-3}), ("adam", {"lr": 1e-3})])
def test_eval_seconds_puts_every_optimizer_on_one_clock_grid(optimizer: str, hparams: dict, tmp_path: Path) -> None:
    """Each evaluation comes at the first step whose end passes the next multiple of ``eval_seconds`` (the next
    one after the previous evaluation's clock): at or after that grid point, by less than one (longest) step."""
    every = 0.1
    cfg = parse_config(_on_a_clock(tmp_path, optimizer,
                                   training={"budget": {"seconds": BUDGET_S}, "eval_seconds": every}))
    result = train(cfg, hparams)
    clocks = [point["train_seconds"] for point in result.curves]
    assert len(clocks) >= 3
    grid_point = every
    for clock in clocks[:-1]:  # the last evaluation is the end of the budget, wherever it falls
        assert grid_point <= clock < grid_point + result.max_step_seconds + RESOLUTION_S, (clock, grid_point)
        grid_point = (math.floor(clock / every) + 1) * every
    assert BUDGET_S <= clocks[-1] <= BUDGET_S + result.max_step_seconds + RESOLUTION_S


def test_the_pruner_compares_trials_at_intervals_of_training_time(tmp_path: Path) -> None:
    """Under eval_seconds the pruner's position is the number of intervals passed, never repeated: a late step
    that passes two grid points skips a position, an evaluation off the grid (the budget's end) takes the next."""
    position = pruning_positions(parse_config(_on_a_clock(
        tmp_path, "adam", training={"budget": {"seconds": 0.55}, "eval_seconds": 0.1})))
    assert [position(s, {"train_seconds": t}) for s, t in [(3, 0.104), (6, 0.2), (8, 0.41), (9, 0.43), (11, 0.56)]] \
        == [1, 2, 4, 5, 6]
    by_step = pruning_positions(parse_config(tiny_config(tmp_path, training={"steps": 40, "eval_every": 10})))
    assert [by_step(s, {"train_seconds": 1.0}) for s in (10, 20, 40)] == [10, 20, 40]


def test_a_search_on_a_clock_reports_each_trial_at_its_intervals_of_training_time(tmp_path: Path) -> None:
    config = _on_a_clock(tmp_path, "adam", training={"budget": {"seconds": 0.3}, "eval_seconds": 0.1}, search={
        "trials": 4, "pruner": {"name": "median", "args": {"n_startup_trials": 1}},
        "space": {"lr": {"low": 1e-5, "high": 1e-4, "log": True}}})
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(cli, ["search", str(tmp_path / "model.yaml"), "--no-tracking",
                                      "-o", str(tmp_path / "recipe.yaml")])  # not recipes/ of the checkout
    assert result.exit_code == 0, result.output
    for trial in load_study(f"sqlite:///{tmp_path / 'study.db'}", "model").trials:
        positions = sorted(trial.intermediate_values)
        assert positions[0] >= 1 and len(set(positions)) == len(positions)
        if trial.state.name == "COMPLETE":  # 0.3 s of training passes the 0.1 s grid three times, then the end
            assert positions[-1] >= 3, positions


def test_eval_every_and_eval_seconds_are_exclusive(tmp_path: Path) -> None:
    config = write_config(tmp_path, training={"steps": 10, "eval_every": 5, "eval_seconds": 1})
    result = CliRunner().invoke(cli, ["search", str(config), "--no-tracking"])
    assert result.exit_code == 2 and "eval_every (steps) or eval_seconds" in result.output, result.output
    assert "Traceback" not in result.output


def test_time_objective_needs_a_step_budget(tmp_path: Path) -> None:
    config = write_config(tmp_path, training={"steps": None, "budget": {"seconds": 1}},
                          search={"objectives": ["eval_loss", "train_seconds"]})
    result = CliRunner().invoke(cli, ["search", str(config), "--no-tracking"])
    assert result.exit_code == 2 and "train_seconds objective" in result.output and "Traceback" not in result.output
