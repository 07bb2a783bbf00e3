"""Where a study lives and how it samples: the RDB storage (heartbeat, stale-trial retry), the sampler and the
pruner, each built from the config, with argument errors reported against the config's fields.

* Storage is ``RDBStorage`` with a heartbeat, so a killed worker's RUNNING trial is failed after the grace period
  and re-enqueued by ``RetryHeartbeatStaleTrialCallback`` (same parameters, new trial number), by the next worker
  to start a trial or, whatever the budget, by the next ``search`` to start or end.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import optuna

from kfac_tune.config import MAX_STEPS, Config


def make_storage(url: str, cfg: Config) -> optuna.storages.RDBStorage:
    """RDB storage with heartbeat and retry of stale trials; SQLite waits up to 30 s for a lock."""
    sqlite = url.startswith("sqlite")
    if sqlite and url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
    heartbeat = cfg.search.heartbeat_interval
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat is "experimental"
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=cfg.search.max_retry)
        return optuna.storages.RDBStorage(
            url, engine_kwargs={"connect_args": {"timeout": 30}} if sqlite else {"pool_pre_ping": True},
            heartbeat_interval=heartbeat, grace_period=cfg.search.grace_period or 2 * heartbeat,
            heartbeat_stale_trial_callback=retry)


def make_sampler(cfg: Config, seed: int) -> optuna.samplers.BaseSampler:
    name, args = cfg.search.sampler.name, dict(cfg.search.sampler.args)
    classes = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
               "gp": optuna.samplers.GPSampler, "qmc": optuna.samplers.QMCSampler,
               "cmaes": optuna.samplers.CmaEsSampler}
    if name == "qmc":
        args.setdefault("scramble", True)  # else every worker draws the same sequence
    if name == "tpe":  # one joint model per set of parameters that occur together: the conditional space's modes
        args.setdefault("multivariate", True)
        args.setdefault("group", True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return classes[name](seed=seed, **args)
    except ImportError as error:
        raise cfg.problem("search.sampler.name", f"expected a sampler whose dependencies are installed "
                          f"({error.name or error}: pip install {error.name or 'it'})", name) from None
    except (TypeError, ValueError) as error:
        raise cfg.problem("search.sampler.args", f"expected arguments accepted by optuna's {classes[name].__name__}",
                          args if not str(error) else _phrase(error)) from None


def make_pruner(cfg: Config, steps: int) -> optuna.pruners.BasePruner:
    """Median by default; Hyperband's resource is the training step, from one evaluation to the whole budget
    (under a time budget without a step cap: Optuna's ``auto``). Optuna prunes single-objective studies only, so
    with several ``search.objectives`` there is no pruner (diverged trials are still pruned by the objective)."""
    name, args = cfg.search.pruner.name, cfg.search.pruner.args
    if len(cfg.objectives) > 1:
        return optuna.pruners.NopPruner()
    try:
        if name == "median":
            return optuna.pruners.MedianPruner(**{"n_startup_trials": 5, **args})
        if name == "hyperband":
            if cfg.training.eval_seconds is not None:  # resource: intervals of training time (pruning_positions)
                defaults: dict[str, Any] = {"min_resource": 1, "max_resource": "auto"}
            else:
                defaults = {"min_resource": min(cfg.training.eval_every, steps),
                            "max_resource": "auto" if steps >= MAX_STEPS else steps}
            return optuna.pruners.HyperbandPruner(**{**defaults, **args})
        if args:
            raise TypeError("pruner 'none' takes no arguments")
        return optuna.pruners.NopPruner()
    except (TypeError, ValueError) as error:
        raise cfg.problem("search.pruner.args", f"expected arguments accepted by the {name} pruner",
                          _phrase(error)) from None


def _phrase(error: Exception) -> Any:
    from kfac_tune.config import Phrase

    return Phrase(f"{type(error).__name__}: {error}")
