"""K-FAC's fixed per-step overhead on a small network: the digits MLP (64-64-64-10, batch 128, cross-entropy),
inverses every 20 steps, against Adam measured in the same run.

Protocol: each optimizer trains its own copy of the model on the same batches; a round is 20 steps (one inverse
period, starting on an inversion step) of each arm, the arms interleaved step by step, so load from other
processes hits both alike.  After one warm-up round, ``--rounds`` rounds are timed; reported are the medians over
rounds of each arm's mean step time (ms) and of the within-round K-FAC/Adam ratio.  ``--profile`` prints
torch.profiler's top operators of K-FAC's steps instead.

    PYTHONPATH=. python benchmarks/overhead.py [--rounds 15] [--profile]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import torch

from benchmarks import workloads
from kfac_tune import KFAC

PERIOD = 20


def arms(kfac_kwargs: dict[str, Any]) -> dict[str, tuple[workloads.Workload, torch.optim.Optimizer]]:
    adam = workloads.load("digits_mlp", train_size=1024)
    kfac = workloads.load("digits_mlp", train_size=1024)
    return {
        "adam": (adam, torch.optim.Adam(adam.model.parameters(), lr=1e-3)),
        "kfac": (kfac, KFAC(kfac.model, loss=kfac.loss, inv_update_freq=PERIOD, seed=0, kl_clip=1e-3, **kfac_kwargs)),
    }


def timed(step: Callable[[], Any]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def measure(rounds: int, kfac_kwargs: dict[str, Any]) -> dict[str, float]:
    setup = arms(kfac_kwargs)
    means: dict[str, list[float]] = {name: [] for name in setup}
    step = 0
    for r in range(rounds + 1):
        totals = dict.fromkeys(setup, 0.0)
        for _ in range(PERIOD):
            order = list(setup) if step % 2 == 0 else list(reversed(setup))
            for name in order:
                w, opt = setup[name]
                closure = w.closure(opt, step)
                totals[name] += timed(lambda: opt.step(closure))
            step += 1
        if r:  # round 0 warms up
            for name in setup:
                means[name].append(totals[name] / PERIOD)
    ratios = [k / a for k, a in zip(means["kfac"], means["adam"])]
    return {"adam_ms": 1e3 * statistics.median(means["adam"]), "kfac_ms": 1e3 * statistics.median(means["kfac"]),
            "ratio": statistics.median(ratios)}


def profile(kfac_kwargs: dict[str, Any]) -> None:
    w, opt = arms(kfac_kwargs)["kfac"]
    for i in range(PERIOD):
        opt.step(w.closure(opt, i))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for i in range(PERIOD, 3 * PERIOD):
            opt.step(w.closure(opt, i))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.profile:
        profile({})
        return
    result = measure(args.rounds, {})
    print(f"digits MLP, batch 128, inverses every {PERIOD} steps, 1 thread, {args.rounds} rounds: "
          f"Adam {result['adam_ms']:.2f} ms, K-FAC {result['kfac_ms']:.2f} ms, K-FAC/Adam {result['ratio']:.2f}x")


if __name__ == "__main__":
    main()
