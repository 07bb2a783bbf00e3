"""Does a warm start from a shipped recipe reach a given value in fewer trials than a cold search?

The workload is a neighbour of a shipped one, as a user's model would be: the digits MLP of
``examples/digits_mlp.yaml`` with other hidden widths (default [32, 32]) and a shorter budget, so the recipe
found by ``search.warm_start: true`` is ``recipes/digits_mlp-kfac.yaml``, tuned for another network (an
"architecture" match, not an exact one). Each repetition runs the same search twice with the same sampler seed,
cold (published defaults first, as usual) and warm (the recipe first, then the defaults), stopping as soon as a
complete trial reaches ``--value``, and prints the trials each needed (``>N`` when the budget ran out).

    PYTHONPATH=. python benchmarks/warm_start.py --repetitions 3 --trials 12 --value 0.06
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def trials_to_value(overrides: dict[str, object], value: float, storage: str) -> int | None:
    """Run the search until a complete trial is at or below ``value``; the number of finished trials it took."""
    import optuna

    from kfac_tune.config import load_config
    from kfac_tune.search import prepare_search

    cfg = load_config(REPO / "examples" / "digits_mlp.yaml", overrides)
    reached: list[int] = []

    def stop_at_value(study: optuna.Study) -> None:
        finished = [t for t in study.trials if t.state.is_finished() and t.state.name != "FAIL"]
        if not reached and any(t.value is not None and t.value <= value for t in finished
                               if t.state.name == "COMPLETE"):
            reached.append(len(finished))
            study.stop()

    prepare_search(cfg, study_name="bench", storage=storage, tracking=False).run(on_progress=stop_at_value)
    return reached[0] if reached else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=3, help="sampler seeds 0..N-1")
    parser.add_argument("--trials", type=int, default=12, help="trial budget of each search")
    parser.add_argument("--value", type=float, default=0.06, help="eval_loss to reach")
    parser.add_argument("--hidden", type=int, nargs="+", default=[32, 32], help="hidden widths of the MLP")
    parser.add_argument("--steps", type=int, default=200, help="training steps per trial")
    args = parser.parse_args()

    print(f"digits MLP hidden={args.hidden}, {args.steps} steps, K-FAC, TPE; trials until eval_loss <= {args.value} "
          f"(budget {args.trials})")
    print(f"{'sampler seed':>12}  {'cold':>5}  {'warm':>5}")
    results: dict[str, list[int]] = {"cold": [], "warm": []}
    for seed in range(args.repetitions):
        row = []
        for mode in ("cold", "warm"):
            overrides = {"model.kwargs": {"hidden": args.hidden}, "training.steps": args.steps,
                         "search.trials": args.trials, "search.sampler.seed": seed, "optimizer.name": "kfac",
                         "search.warm_start": mode == "warm"}
            with tempfile.TemporaryDirectory() as scratch:
                needed = trials_to_value(overrides, args.value, f"sqlite:///{scratch}/study.db")
            # a search that never got there counts as budget + 1 in the mean: a lower bound on its true cost
            results[mode].append(needed if needed is not None else args.trials + 1)
            row.append(str(needed) if needed is not None else f">{args.trials}")
        print(f"{seed:>12}  {row[0]:>5}  {row[1]:>5}", flush=True)
    cold, warm = (statistics.fmean(results[m]) for m in ("cold", "warm"))
    print(f"{'mean':>12}  {cold:>5.1f}  {warm:>5.1f}   (a search that missed counts as budget + 1)")


if __name__ == "__main__":
    main()
