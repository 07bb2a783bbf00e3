"""Seed-robust selection (``search.race``): real SQLite studies of a digits MLP, real training on more seeds.

What is checked: the race's runs are part of the trial budget and stored on the study run by run; the recipe is
the best mean over the seeds, with its spread and seeds recorded; ``export`` reads the race instead of training it
again; a race stopped part-way loses only the run it was in; ``show`` and ``compare`` show the spread.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from kfac_tune import record
from kfac_tune.recipes import load_recipe
from tests.search_support import cli, invoke, load_study, write_config

pytestmark = pytest.mark.slow


def _raced_search(tmp_path: Path, **search: object) -> tuple[Path, str]:
    config = write_config(tmp_path, search={"trials": 6, "race": {"top": 2, "seeds": 2}, **search})
    return config, f"sqlite:///{tmp_path / 'study.db'}"


def test_the_recipe_is_the_best_mean_over_the_raced_seeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config, storage = _raced_search(tmp_path)
    result = cli("search", str(config), "-f", "json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    study = load_study(storage, "model")
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 6 - 2 * 1  # the race's 2 runs come out of the 6-trial budget

    race = json.loads(result.stdout)["race"]
    assert race["runs"] == 2 and len(race["candidates"]) == 2
    complete = sorted((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert [c["trial"] for c in race["candidates"]] == [t.number for t in complete[:2]]
    means = {}
    for trial in complete[:2]:  # each candidate ran seed 1, stored on the study; seed 0 is its own trial
        stored = record.race_runs(study, trial.number)
        assert list(stored) == [1] and stored[1] is not None
        means[trial.number] = statistics.fmean([trial.value, stored[1]])
    chosen = min(means, key=lambda n: (means[n], n))
    assert race["chosen"] == chosen
    assert "race: 2 candidates, 2 extra runs" in result.stderr

    recipe = load_recipe(tmp_path / "recipes" / "model.yaml")
    values = [study.trials[chosen].value, record.race_runs(study, chosen)[1]]
    assert recipe.provenance.trial == chosen and recipe.result.seeds == [0, 1]
    assert recipe.result.value == pytest.approx(statistics.fmean(values))
    assert recipe.result.spread == pytest.approx(statistics.stdev(values))
    assert recipe.result.test_value is not None  # measured once, for the chosen trial

    rows = json.loads(invoke("show", "--storage", storage, "-f", "json"))
    raced = {row["number"]: row["seeds"] for row in rows if row.get("seeds")}
    assert set(raced) == set(means)
    assert raced[chosen]["mean"] == pytest.approx(recipe.result.value)
    assert "seeds: mean ± std" in invoke("show", "--storage", storage)

    # export reads the race from the study: the same recipe, without training any race run again
    from kfac_tune.search.race import planned_race
    from kfac_tune.search.selection import study_config

    runs: list[tuple[int, int]] = []
    again = planned_race(study, study_config(study), "best", on_run=lambda trial, seed: runs.append((trial, seed)))
    assert runs == [] and again is not None and again.chosen.trial.number == chosen
    invoke("export", "--storage", storage, "-o", str(tmp_path / "exported.yaml"))
    exported = load_recipe(tmp_path / "exported.yaml")
    assert (exported.provenance.trial, exported.result.value, exported.result.spread) == (
        chosen, recipe.result.value, recipe.result.spread)

    # compare shows what the recipe recorded (its mean, spread and seeds) beside fresh runs
    table = json.loads(invoke("compare", str(config), "--recipes", str(tmp_path / "exported.yaml"), "--seeds", "1",
                              "--no-tracking", "-o", str(tmp_path / "cmp"), "-f", "json"))
    assert table["recipes"][0]["recorded"] == {"mean": recipe.result.value, "spread": recipe.result.spread,
                                               "seeds": 2, "objective": "final", "split": "validation"}


def test_a_race_stopped_part_way_loses_only_the_run_it_was_in(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config, storage = _raced_search(tmp_path, race={"top": 2, "seeds": 1})  # no race during the search
    assert cli("search", str(config), "--trials", "3", cwd=tmp_path).returncode == 0
    study = load_study(storage, "model")
    assert not any(key.startswith(record.RACE_PREFIX) for key in study.user_attrs)

    from kfac_tune.search.race import run_race
    from kfac_tune.search.selection import study_config

    cfg = study_config(study)
    started: list[tuple[int, int]] = []

    def killed_at_the_third_run(trial: int, seed: int) -> None:
        started.append((trial, seed))
        if len(started) == 3:
            raise KeyboardInterrupt  # as a worker killed during its third run

    with pytest.raises(KeyboardInterrupt):
        run_race(study, cfg, top=2, seeds=3, on_run=killed_at_the_third_run)
    study = load_study(storage, "model")
    kept = {n: record.race_runs(study, n) for n, _ in started}
    assert sum(len(runs) for runs in kept.values()) == 2  # the two finished runs are stored, the third is not

    resumed: list[tuple[int, int]] = []
    outcome = run_race(study, cfg, top=2, seeds=3, on_run=lambda trial, seed: resumed.append((trial, seed)))
    assert resumed[0] == started[2] and not set(resumed) & set(started[:2])  # nothing finished is trained again
    assert outcome.runs == len(resumed) and len(outcome.seeds) == 3


def test_the_race_runs_only_when_the_trial_budget_holds_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default race (3 trials x 3 seeds: 6 runs) would eat a 3-trial budget: the search keeps its 3 trials
    and writes the best trial, as without a race."""
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, search={"trials": 3})
    result = cli("search", str(config), "-f", "json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["race"] is None
    study = load_study(f"sqlite:///{tmp_path / 'study.db'}", "model")
    assert len([t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]) == 3
    assert load_recipe(tmp_path / "recipes" / "model.yaml").result.seeds is None


def test_a_clearly_worse_candidate_is_dropped_and_a_close_one_kept() -> None:
    """The intensification rule on stored values: after two seeds a candidate whose mean is worse than the
    leader's by more than the combined standard errors is dropped; one within them, or one that diverged, is
    judged as the rule says."""
    import optuna

    from kfac_tune.search.race import Candidate, _survivors

    def candidate(number: int, *values: float) -> Candidate:
        trial = optuna.trial.create_trial(value=values[0])
        trial.number = number
        return Candidate(trial, dict(enumerate(values)))

    leader, close, far, diverged = (candidate(0, 0.10, 0.12), candidate(1, 0.11, 0.14), candidate(2, 0.30, 0.32),
                                    candidate(3, 0.09, float("inf")))
    dropped: list[Candidate] = []
    kept = _survivors([leader, close, far, diverged], 1.0, 2, dropped)
    assert kept == [leader, close] and dropped == [far, diverged]
    assert far.dropped_after == 2


def test_workers_leave_room_for_the_race_before_a_deadline(tmp_path: Path) -> None:
    """Under search.timeout the race is budgeted in seconds: a worker stops taking trials once the time left would
    not hold the race's runs at the study's average trial duration. Two trials recorded as taking 1000 s each, a
    deadline 250 s away and a race of 2 runs: after one more (fast) trial the average is ~667 s, 2 runs will not
    fit, and the worker stops instead of running to its trial budget."""
    import datetime as dt
    import time

    import optuna

    from kfac_tune.search.workers import _RoomForRace

    ended = dt.datetime.now()
    earlier = [optuna.trial.create_trial(value=value) for value in (0.3, 0.2)]
    for trial in earlier:
        trial.datetime_start, trial.datetime_complete = ended - dt.timedelta(seconds=1000), ended
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'room.db'}")
    study.add_trials(earlier)

    study.optimize(lambda trial: 0.1, n_trials=10, callbacks=[_RoomForRace(time.time() + 250, race_runs=2)])
    assert len(study.trials) == 3
