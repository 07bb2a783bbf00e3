"""How much of a search's wall time is spent outside training (Optuna + MLflow + setup)?

Runs a real study in-process (SQLite storage, MLflow SQLite store unless --no-tracking) on the digits MLP, with
the number of steps calibrated so each trial trains for about --trial-seconds, and prints where the time went:

* setup: validation, preflight (data, model), storage and study creation, MLflow store and parent run;
* per trial: sampling, storage writes, heartbeat, MLflow child run and curves, memory release;
* teardown: recipe export, final plots, ending the parent run.

"training" is the time inside ``train()`` (data to device, model build, steps, evaluations), as recorded on each
trial. The target is under 2% outside training for one-minute trials:

    PYTHONPATH=. python benchmarks/search_overhead.py --trial-seconds 60 --trials 3
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trial-seconds", type=float, default=60.0, help="target training time per trial")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--optimizer", default="kfac", choices=["kfac", "adam", "sgd"])
    parser.add_argument("--no-tracking", action="store_true", help="leave MLflow out")
    parser.add_argument("--evals", type=int, default=10, help="evaluations per trial")
    args = parser.parse_args()

    from kfac_tune.config import load_config
    from kfac_tune.search import prepare_search
    from kfac_tune.training import train

    # a narrow, stable region: the benchmark measures overhead, so every trial should train to the end
    space: dict[str, object] = {"lr": {"low": 1e-3, "high": 3e-3, "log": True}}
    if args.optimizer == "kfac":
        space.update(damping=0.1, momentum=0.9)
    probe_point = {name: (2e-3 if name == "lr" else value) for name, value in space.items()}

    with tempfile.TemporaryDirectory(prefix="kfac-tune-overhead-") as tmp:
        root = Path(tmp)
        document = {
            "model": {"name": "mlp", "kwargs": {"hidden": [64, 64]}},
            "data": {"name": "digits", "batch_size": 128},
            "training": {"steps": 200, "eval_every": 50, "device": "cpu", "threads": 1},
            "optimizer": {"name": args.optimizer},
            "search": {"trials": args.trials, "pruner": "none", "enqueue_defaults": False, "space": space},
            "tracking": {"enabled": not args.no_tracking, "uri": f"sqlite:///{root / 'mlflow.db'}"},
            "storage": f"sqlite:///{root / 'study.db'}",
        }
        path = root / "bench.yaml"
        path.write_text(yaml.safe_dump(document))

        for _ in range(2):  # calibrate the step count on a warm second run (the first loads the data)
            probe = train(load_config(path), probe_point, optimizer=args.optimizer)
        steps = max(int(args.trial_seconds / max(probe.seconds / probe.steps, 1e-6)), args.evals)
        document["training"].update(steps=steps, eval_every=max(steps // args.evals, 1))
        path.write_text(yaml.safe_dump(document))

        started = time.perf_counter()
        prepared = prepare_search(load_config(path), recipe_path=root / "recipe.yaml")
        setup = time.perf_counter() - started
        trial_ends: list[float] = []
        outcome = prepared.run(on_progress=lambda study: trial_ends.append(time.perf_counter()))
        wall = time.perf_counter() - started
        teardown = time.perf_counter() - trial_ends[-1] if trial_ends else 0.0

    trials = [t for t in outcome.study.trials if "result" in t.user_attrs]
    training = sum(t.user_attrs["result"]["seconds"] for t in trials)
    outside = wall - training
    per_trial = (wall - setup - teardown - training) / max(len(trials), 1)
    print(f"{len(trials)} trials x {steps} steps ({args.optimizer}, tracking {'off' if args.no_tracking else 'on'})")
    print(f"  wall time            {wall:9.2f} s")
    print(f"  inside train()       {training:9.2f} s   ({training / len(trials):.2f} s per trial)")
    print(f"  setup                {setup:9.2f} s")
    print(f"  per-trial overhead   {per_trial:9.3f} s")
    print(f"  teardown             {teardown:9.2f} s")
    trial_time = training / max(len(trials), 1)
    print(f"  per-trial overhead   {100 * per_trial / (trial_time + per_trial):9.2f} % of a trial's time "
          f"(target < 2% for 1-minute trials)")
    print(f"  outside training     {outside:9.2f} s = {100 * outside / wall:.2f}% of this study's wall time "
          f"(setup and teardown are paid once per study run)")


if __name__ == "__main__":
    main()
