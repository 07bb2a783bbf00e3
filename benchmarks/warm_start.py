"""Does a warm start from a shipped recipe reach a given value in fewer trials than a cold search?

The workload is a neighbour of a shipped one, as a user's model would be: the digits MLP of
``examples/digits_mlp.yaml`` with other hidden widths (default [32, 32]) and a shorter budget, so the recipe
found by ``search.warm_start: true`` is ``recipes/digits_mlp-kfac.yaml``, tuned for another network (an
"architecture" match, not an exact one). Each repetition runs the same search twice with the same sampler seed,
cold (published defaults first, as usual) and warm (the recipe first, then the defaults), stopping as soon as a
complete trial reaches every ``--value``, and prints the trials each needed (``>N`` when the budget ran out).

    PYTHONPATH=. python benchmarks/warm_start.py --repetitions 3 --trials 12 --value 0.06 0.04
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def trials_to_values(overrides: dict[str, object], values: list[float], scratch: Path) -> list[int | None]:
    """Run the search until a complete trial is at or below every value (or the budget ends); for each value the
    number of finished trials it took. The best recipe goes to ``scratch``: written to ./recipes it would become
    the next warm start's exact match."""
    import optuna

    from kfac_tune.config import load_config
    from kfac_tune.search import prepare_search

    cfg = load_config(REPO / "examples" / "digits_mlp.yaml", overrides)
    reached: dict[float, int] = {}

    def record(study: optuna.Study) -> None:
        finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
        best = min((t.value for t in finished if t.state.name == "COMPLETE"), default=float("inf"))
        for value in values:
            if best <= value:
                reached.setdefault(value, len(finished))
        if len(reached) == len(values):
            study.stop()

    prepared = prepare_search(cfg, study_name="bench", storage=f"sqlite:///{scratch}/study.db", tracking=False,
                              recipe_path=scratch / "best.yaml")
    if overrides.get("search.warm_start"):
        print(f"  warm start from {prepared.warm_start.path.name if prepared.warm_start else None} "
              f"({prepared.warm_start.kind if prepared.warm_start else '-'})", flush=True)
    prepared.run(on_progress=record)
    return [reached.get(value) for value in values]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=3, help="sampler seeds 0..N-1")
    parser.add_argument("--trials", type=int, default=12, help="trial budget of each search")
    parser.add_argument("--value", type=float, nargs="+", default=[0.06, 0.04], help="eval_loss values to reach")
    parser.add_argument("--hidden", type=int, nargs="+", default=[32, 32], help="hidden widths of the MLP")
    parser.add_argument("--steps", type=int, default=200, help="training steps per trial")
    args = parser.parse_args()

    print(f"digits MLP hidden={args.hidden}, {args.steps} steps, K-FAC, TPE, budget {args.trials} trials; "
          f"trials until eval_loss <= value")
    results: dict[tuple[str, float], list[int]] = {}
    rows = []
    for seed in range(args.repetitions):
        row = [str(seed)]
        for mode in ("cold", "warm"):
            overrides = {"model.kwargs": {"hidden": args.hidden}, "training.steps": args.steps,
                         "search.trials": args.trials, "search.sampler.seed": seed, "optimizer.name": "kfac",
                         "search.warm_start": mode == "warm"}
            with tempfile.TemporaryDirectory() as scratch:
                needed = trials_to_values(overrides, args.value, Path(scratch))
            for value, n in zip(args.value, needed):
                # a search that never got there counts as budget + 1 in the mean: a lower bound on its cost
                results.setdefault((mode, value), []).append(n if n is not None else args.trials + 1)
                row.append(str(n) if n is not None else f">{args.trials}")
        rows.append(row)
    header = ["sampler seed"] + [f"{mode} <= {value:g}" for mode in ("cold", "warm") for value in args.value]
    means = ["mean"] + [f"{statistics.fmean(results[(mode, value)]):.1f}" for mode in ("cold", "warm")
                        for value in args.value]
    for line in (header, *rows, means):
        print("  ".join(f"{cell:>14}" for cell in line))
    print("(a search that missed a value counts as budget + 1 in the mean)")

if __name__ == "__main__":
    main()
