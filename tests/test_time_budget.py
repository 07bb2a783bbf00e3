"""``training.budget.seconds``: every run trains for the same wall-clock, K-FAC and Adam alike.

Tolerance, from how the budget is enforced rather than from a machine's speed: the training clock is read after
every step, and the reads tile the training time (each step's duration is the difference of consecutive reads,
evaluations excluded), so a run stops at the first step that brings the clock to the budget ``S``. Its recorded
training seconds therefore lie in ``[S, S + d)``, ``d`` the duration of that last step, which is at most the run's
longest step (``max_step_seconds``, recorded), plus the timer's resolution for the reads themselves.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from kfac_tune.cli import cli
from kfac_tune.config import load_config
from kfac_tune.training import train
from tests.search_support import load_study, write_config

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


def test_time_objective_needs_a_step_budget(tmp_path: Path) -> None:
    config = write_config(tmp_path, training={"steps": None, "budget": {"seconds": 1}},
                          search={"objectives": ["eval_loss", "train_seconds"]})
    result = CliRunner().invoke(cli, ["search", str(config), "--no-tracking"])
    assert result.exit_code == 2 and "train_seconds objective" in result.output and "Traceback" not in result.output
