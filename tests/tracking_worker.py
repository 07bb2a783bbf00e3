"""A cheap Optuna objective tracked through StudyTracker, shared by the tracking tests and their worker processes.

Run as a script it is one worker: it loads an existing study and runs trials against the shared stores,
which is how ``kfac-tune search --workers N`` uses the tracker.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable

import optuna

from kfac_tune.tracking import StudyTracker

EVAL_STEPS = 5
PRUNE_STEP = 3
FAILING_TRIAL = 3


def quadratic_loss(lr: float, damping: float, step: int) -> float:
    """A loss that decays with the step towards a quadratic bowl in log-space around lr=1e-2, damping=1e-3."""
    floor = (math.log10(lr) + 2) ** 2 + 0.5 * (math.log10(damping) + 3) ** 2 + 0.1
    return floor * (1 + 2.0 / step)


def make_objective(tracker: StudyTracker) -> Callable[[optuna.Trial], float]:
    """Objective with pruned (every third) and failing (``FAILING_TRIAL``) trials, plus non-finite metrics."""

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-4, 1.0, log=True)
        damping = trial.suggest_float("damping", 1e-5, 1e-1, log=True)
        with tracker.trial_run(trial, trial.params) as run:
            if trial.number == FAILING_TRIAL:
                raise RuntimeError("boom: diverged on purpose")
            loss = math.nan
            for step in range(1, EVAL_STEPS + 1):
                loss = quadratic_loss(lr, damping, step)
                odd_value = (math.nan, math.inf, -math.inf)[step % 3]
                run.log_eval(step, {"eval_loss": loss, "train_loss": 1.1 * loss, "grad_norm": odd_value,
                                    "step_time": 0.01, "eval_accuracy": 1 / (1 + loss)})  # fmt: skip
                trial.report(loss, step)
                if trial.number % 3 == 2 and step == PRUNE_STEP:
                    raise optuna.TrialPruned(f"pruned at step {step}")
            run.set_outcome("COMPLETE", loss)
        return loss

    return objective


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for name in ("storage", "tracking_uri", "experiment", "study_name"):
        parser.add_argument(name)
    parser.add_argument("n_trials", type=int)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=args.study_name, storage=args.storage)
    tracker = StudyTracker(args.tracking_uri, args.experiment, args.study_name)
    tracker.ensure_parent_run(study, tags={}, artifacts={})
    study.optimize(make_objective(tracker), n_trials=args.n_trials, catch=(RuntimeError,))


if __name__ == "__main__":
    main()
