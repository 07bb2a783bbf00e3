"""Which ``search.objective`` gives recipes that hold on fresh seeds: ``final``, ``best`` or ``auc``?

For each small workload and optimizer, the same search (same sampler seed, trial budget, median pruner, no race)
runs once per objective; each search's recipe is then trained on fresh seeds under its own protocol (``final`` and
``auc``: the whole budget; ``best``: up to the step its search found best, which the recipe records) and scored on
the test split. Printed: the test loss (and accuracy) mean ± sd over the fresh seeds, per objective, as a
markdown table. Small budgets on purpose: the workloads overfit inside them, which is where the objectives differ.

    PYTHONPATH=. python benchmarks/objective.py --trials 8 --seeds 4
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

OBJECTIVES = ("final", "best", "auc")


def breast_cancer(seed: int = 0) -> tuple[np.ndarray, ...]:
    """scikit-learn's bundled breast-cancer table (569 rows, 30 features), standardised, 3/4 train: a tabular
    stranger that overfits an MLP within a few hundred steps."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    x, y = load_breast_cancer(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype("float32")
    train_x, test_x, train_y, test_y = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    return train_x, train_y, test_x, test_y


WORKLOADS: dict[str, dict[str, Any]] = {
    "digits": {"model": {"name": "mlp", "kwargs": {"hidden": [64]}},
               "data": {"name": "digits", "batch_size": 64},
               "training": {"steps": 300, "eval_every": 20}},
    "cancer": {"model": {"name": "mlp", "kwargs": {"hidden": [64, 64]}},
               "data": {"callable": "benchmarks.objective:breast_cancer", "batch_size": 32},
               "training": {"steps": 500, "eval_every": 20}},
    "synthetic": {"model": {"name": "mlp", "kwargs": {"hidden": [64, 64]}},
                  "data": {"name": "synthetic", "train_size": 300, "batch_size": 32},
                  "training": {"steps": 200, "eval_every": 10}},
}


def config(workload: str, optimizer: str, objective: str, trials: int, scratch: Path) -> dict[str, Any]:
    base = WORKLOADS[workload]
    return {**base, "training": {**base["training"], "device": "cpu", "threads": 1, "seed": 0},
            "optimizer": optimizer,
            "search": {"trials": trials, "objective": objective, "race": {"seeds": 1},
                       "sampler": {"name": "tpe", "seed": 0}},
            "tracking": {"enabled": False}, "storage": f"sqlite:///{scratch / 'study.db'}"}


def fresh_test(raw: dict[str, Any], recipe_path: Path, seeds: list[int], validation: bool = False
               ) -> list[dict[str, float]]:
    """The recipe trained on each fresh seed under its objective's protocol: its test metrics at the end (and the
    validation ones, ``eval_*``, with ``validation``)."""
    from kfac_tune.config import parse_config
    from kfac_tune.recipes import load_recipe
    from kfac_tune.training import Diverged, train

    recipe = load_recipe(recipe_path)
    cfg = parse_config(raw)
    steps = recipe.training.steps if recipe.result.objective == "best" else cfg.training.steps
    hparams = {k: v for k, v in recipe.hyperparameters.items() if k != "loss"}
    out = []
    for seed in seeds:
        run = cfg.model_copy(update={"training": cfg.training.model_copy(update={"seed": seed, "steps": steps})})
        try:
            result = train(run, hparams, optimizer=recipe.optimizer, test=True)
            out.append(result.final if validation else result.test)
        except Diverged:
            out.append({"test_loss": float("inf"), "eval_loss": float("inf")})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--optimizers", nargs="+", default=["adam", "kfac"])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=4, help="fresh seeds 100, 101, ...")
    args = parser.parse_args()

    from kfac_tune.search import prepare_search
    from kfac_tune.config import parse_config
    from kfac_tune.recipes import load_recipe

    seeds = [100 + i for i in range(args.seeds)]
    print(f"trials {args.trials}, fresh seeds {seeds}; test loss (accuracy) mean ± sd; recipe: the value its "
          "search recorded (validation, seed 0) and its training steps\n")
    print("| workload | optimizer | objective | recipe value | steps | fresh test loss | fresh test accuracy | s |")
    print("|---|---|---|---|---|---|---|---|")
    for workload in args.workloads:
        for optimizer in args.optimizers:
            for objective in OBJECTIVES:
                started = time.perf_counter()
                with tempfile.TemporaryDirectory() as scratch:
                    raw = config(workload, optimizer, objective, args.trials, Path(scratch))
                    path = Path(scratch) / "recipe.yaml"
                    prepare_search(parse_config(raw), study_name="bench", recipe_path=path, tracking=False).run()
                    recipe = load_recipe(path)
                    tests = fresh_test(raw, path, seeds)
                losses = [t["test_loss"] for t in tests]
                accuracy = [t["test_accuracy"] for t in tests if "test_accuracy" in t]
                print(f"| {workload} | {optimizer} | {objective} | {recipe.result.value:.4f} | "
                      f"{recipe.training.steps} | {statistics.fmean(losses):.4f} ± {statistics.stdev(losses):.4f} | "
                      f"{statistics.fmean(accuracy):.4f} ± {statistics.stdev(accuracy):.4f} | "
                      f"{time.perf_counter() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
