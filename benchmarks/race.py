"""Does racing the best trials on more seeds (``search.race``) give recipes that hold on fresh seeds?

For each workload of ``benchmarks/objective.py`` and optimizer, two searches with the same sampler seed and the
same total budget of training runs: one without a race (every run a trial), one with the default race (3
candidates x 3 seeds: at most 6 of the runs go to the race, the rest are trials). Each recipe is trained on fresh
seeds and scored on the validation and test splits; printed beside what the recipe recorded (one seed's value,
or the race's mean ± spread).

    PYTHONPATH=. python benchmarks/race.py --runs 14 --seeds 4
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.objective import WORKLOADS, config, fresh_test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=["digits", "cancer"], choices=list(WORKLOADS))
    parser.add_argument("--optimizers", nargs="+", default=["kfac", "adam"])
    parser.add_argument("--runs", type=int, default=14, help="training runs per search, trials and race together")
    parser.add_argument("--seeds", type=int, default=4, help="fresh seeds 100, 101, ...")
    args = parser.parse_args()

    from kfac_tune.config import parse_config
    from kfac_tune.recipes import load_recipe
    from kfac_tune.search import prepare_search

    seeds = [100 + i for i in range(args.seeds)]
    print(f"{args.runs} training runs per search, fresh seeds {seeds}; losses mean ± sd\n")
    print("| workload | optimizer | race | trials | recorded (validation) | fresh validation | fresh test | s |")
    print("|---|---|---|---|---|---|---|---|")
    for workload in args.workloads:
        for optimizer in args.optimizers:
            for race in (1, 3):
                started = time.perf_counter()
                with tempfile.TemporaryDirectory() as scratch:
                    raw = config(workload, optimizer, "final", args.runs, Path(scratch))
                    raw["search"]["race"] = {"top": 3, "seeds": race}
                    path = Path(scratch) / "recipe.yaml"
                    outcome = prepare_search(parse_config(raw), study_name="bench", recipe_path=path,
                                             tracking=False).run()
                    trials = len([t for t in outcome.study.trials if t.state.name in ("COMPLETE", "PRUNED")])
                    recipe = load_recipe(path)
                    tests = fresh_test(raw, path, seeds, validation=True)
                recorded = f"{recipe.result.value:.4f}" + ("" if recipe.result.spread is None else
                                                           f" ± {recipe.result.spread:.4f}")
                cells = [f"{statistics.fmean(v):.4f} ± {statistics.stdev(v):.4f}"
                         for v in ([t["eval_loss"] for t in tests], [t["test_loss"] for t in tests])]
                print(f"| {workload} | {optimizer} | {'3 x 3' if race > 1 else 'none'} | {trials} | {recorded} | "
                      f"{cells[0]} | {cells[1]} | {time.perf_counter() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
