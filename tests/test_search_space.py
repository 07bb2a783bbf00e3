"""The conditional K-FAC search space: what is sampled in each mode, overrides, the published-defaults point, and
recipes of the automatic mode and of a searched batch size reproduced by ``train`` and ``optimizer_from_recipe``.

Studies are real (SQLite storage, Optuna's TPE with the sampler settings the search uses); the round trip trains
real digits models. The one-trial search of every shipped example checks that its published-defaults trial (the
first one, enqueued) completes under the default protocol (validation split).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from kfac_tune.config import ConfigError, load_config
from kfac_tune import optimizer_from_recipe
from kfac_tune.optim import KFAC
from kfac_tune.recipes import load_recipe
from kfac_tune.catalog import OPTIMIZERS
from kfac_tune.search.space import build_space, published_defaults, suggest, warm_starts
from kfac_tune.search.storage import make_sampler
from kfac_tune.zoo.data import DEBIAN_FASHION_MNIST
from tests.search_support import REPO, invoke, load_study, write_config

FIXED_ONLY = {"lr", "momentum", "kl_clip"}
SHARED = {"mode", "damping", "factor_decay", "inv_update_freq", "cov_update_freq", "stat_fraction"}


def kfac_config(tmp_path: Path, **search: object):
    return load_config(write_config(tmp_path, optimizer="kfac", search=search))


def sample_study(cfg, tmp_path: Path, trials: int) -> optuna.Study:
    """A real study over the space with a cheap objective (no training): the space is what is tested."""
    space = build_space(cfg)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'space.db'}", sampler=make_sampler(cfg, 0))

    def objective(trial: optuna.Trial) -> float:
        point = suggest(trial, space)
        return math.log(point["damping"]) ** 2 + (point.get("lr", 0.01) - 0.01) ** 2

    study.optimize(objective, n_trials=trials)
    return study


def test_conditional_space_samples_only_the_active_parameters(tmp_path: Path) -> None:
    cfg = kfac_config(tmp_path, sampler={"name": "tpe", "seed": 0, "args": {"n_startup_trials": 4}})
    study = sample_study(cfg, tmp_path, trials=16)  # 12 trials from TPE's grouped multivariate model
    modes = {trial.params["mode"] for trial in study.trials}
    assert modes == {"fixed", "automatic"}
    for trial in study.trials:
        names = set(trial.params)
        if trial.params["mode"] == "fixed":
            assert names == SHARED | FIXED_ONLY, trial.params
        else:  # automatic: the optimizer chooses lr and momentum, KL-clipping applies to a fixed lr only
            assert names == SHARED, trial.params
    sampler = study.sampler
    assert isinstance(sampler, optuna.samplers.TPESampler) and sampler._multivariate and sampler._group


def test_pinned_mode_and_overrides(tmp_path: Path) -> None:
    cfg = kfac_config(tmp_path, space={"mode": "automatic", "damping": {"low": 1.0, "high": 100.0, "log": True}})
    study = sample_study(cfg, tmp_path, trials=5)
    for trial in study.trials:  # a pinned mode is not an Optuna parameter; the fixed-mode entries are inactive
        assert set(trial.params) == SHARED - {"mode"} and 1.0 <= trial.params["damping"] <= 100.0

    space = build_space(kfac_config(tmp_path, space={"lr": [0.01, 0.1], "momentum": {"value": 0.5, "when": {}},
                                                     "kl_clip": None}))
    assert space["lr"].choices == [0.01, 0.1] and space["lr"].when == {"mode": "fixed"}  # the condition is kept
    assert space["momentum"].when == {} and "kl_clip" not in space
    assert suggest(optuna.trial.FixedTrial({"mode": "automatic", "damping": 1.0, "factor_decay": 0.95,
                                            "inv_update_freq": 10, "cov_update_freq": 1, "stat_fraction": 1.0}),
                   space)["momentum"] == 0.5

    with pytest.raises(ConfigError, match=r"search\.space\.lr\.when: expected conditions on unconditioned"):
        build_space(kfac_config(tmp_path, space={"lr": {"low": 0.01, "high": 0.1, "when": {"optimizer": "x"}}}))
    with pytest.raises(ConfigError, match=r"search\.space\.mode: expected a hyperparameter of adam"):
        build_space(load_config(write_config(tmp_path, optimizer="adam", search={"space": {"mode": "fixed"}})))
    adam = load_config(write_config(tmp_path, optimizer="adam", search={"space": {"batch_size": [32, 64]}}))
    assert build_space(adam)["batch_size"].choices == [32, 64]  # every optimizer may search the batch size


def test_published_defaults_come_from_the_kfac_constructor(tmp_path: Path) -> None:
    """The first enqueued point is KFAC's own defaults (one source of truth), in the mode they run in."""
    cfg = kfac_config(tmp_path)
    constructor = KFAC.complete_arguments({})
    point = warm_starts(cfg, build_space(cfg))[0]
    expected_mode = "automatic" if constructor["adaptive_lr"] and constructor["adaptive_momentum"] else "fixed"
    assert point["mode"] == expected_mode
    space = build_space(cfg)
    for name, value in point.items():
        if name != "mode":
            assert value == pytest.approx(min(max(constructor[name], space[name].low), space[name].high)), name
    # options change the defaults point the same way they change the constructor
    automatic = load_config(write_config(tmp_path, optimizer={"name": "kfac", "options": {
        "adaptive_lr": True, "adaptive_momentum": True, "damping": 5.0}}))
    point = warm_starts(automatic, build_space(automatic))[0]
    assert point["mode"] == "automatic" and point["damping"] == 5.0 and not FIXED_ONLY & set(point)
    assert published_defaults(automatic)["batch_size"] == automatic.data.batch_size


def test_automatic_mode_and_batch_size_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """search (mode pinned automatic, batch size searched) -> export -> train --recipe -> optimizer_from_recipe."""
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, optimizer="kfac", training={"steps": 30, "eval_every": 10}, search={
        "trials": 2, "pruner": "none", "enqueue_defaults": False,
        "space": {"mode": "automatic", "batch_size": [32, 96]},
        "enqueue": [{"damping": 100.0, "batch_size": 96}, {"damping": 30.0, "batch_size": 32}]})
    invoke("search", str(config), "--no-tracking", "-o", str(tmp_path / "unused.yaml"))
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = load_study(storage, "model")
    assert all(t.state.name == "COMPLETE" for t in study.trials), [t.user_attrs for t in study.trials]
    invoke("export", "--storage", storage, "-o", str(tmp_path / "auto.yaml"))
    recipe = load_recipe(tmp_path / "auto.yaml")
    best = study.best_trial
    assert recipe.searched == best.params and recipe.training.batch_size == best.params["batch_size"]
    assert all(recipe.hyperparameters[flag] is value for flag, value in OPTIMIZERS["kfac"].modes["automatic"].items())
    assert recipe.hyperparameters["damping"] == best.params["damping"]

    result = json.loads(invoke("train", str(config), "--recipe", str(tmp_path / "auto.yaml"), "-f", "json"))
    assert math.isclose(result["value"], recipe.result.value, rel_tol=1e-5), (result["value"], recipe.result.value)
    assert result["test"]["test_loss"] == pytest.approx(recipe.result.test_value, rel=1e-5)

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    optimizer = optimizer_from_recipe(model, tmp_path / "auto.yaml")
    assert (optimizer.adaptive_damping, optimizer.adaptive_lr, optimizer.adaptive_momentum) == (True, True, True)
    assert optimizer.param_groups[0]["damping"] == best.params["damping"]


# ------------------------------------------------------------------------------------------------ the examples

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
SHRINK = {  # a few steps on small subsets: what is checked is that the defaults trial completes
    "training.steps": 20, "training.eval_every": 10, "training.eval_seconds": None, "search.trials": 1,
    "tracking.enabled": False,
    "data.validation": 0.1,
}


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_one_trial_search_of_each_example_completes_its_defaults_trial(example: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from kfac_tune.search import prepare_search

    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load(example.read_text())
    if raw["data"].get("name") == "fashion_mnist" and not DEBIAN_FASHION_MNIST.exists():
        pytest.skip("needs Debian's dataset-fashion-mnist files")
    sizes = {"data.train_size": min(raw["data"].get("train_size") or 1024, 1024),
             "data.test_size": min(raw["data"].get("test_size") or 256, 256)}
    overrides = {**SHRINK, **sizes, "storage": f"sqlite:///{tmp_path / 'study.db'}", "optimizer.name": "kfac"}
    if raw["data"].get("name") == "digits":
        overrides.pop("data.train_size"), overrides.pop("data.test_size")  # digits takes no sizes below its own
    cfg = load_config(example, overrides)
    outcome = prepare_search(cfg, recipe_path=tmp_path / "recipe.yaml").run()
    first = outcome.study.trials[0]
    assert first.user_attrs.get("warm_start") is True  # the published-defaults trial
    assert first.state.name == "COMPLETE", first.user_attrs.get("prune_reason") or first.user_attrs.get("fail_reason")
