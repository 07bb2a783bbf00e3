"""K-FAC's fixed per-step overhead on a small network: the digits MLP (64-64-64-10, batch 128, cross-entropy),
inverses every 20 steps, against Adam measured in the same run; and what the cost knobs buy back.

Protocol: each optimizer trains its own copy of the model on the same batches; a round is 20 steps (one inverse
period, starting on an inversion step) of each arm, the arms interleaved step by step (order rotating), so load
from other processes hits every arm alike.  After one warm-up round, ``--rounds`` rounds are timed; reported are
the medians over rounds of each arm's mean step time (ms) and of its within-round ratio to Adam.  The K-FAC arms
are the fixed-lr mode (statistics every step, on the whole batch) with the cost knobs a search samples:
``cov_update_freq`` (statistics and the sampled backward pass every k steps) and ``stat_fraction`` (statistics on
a fraction of the batch); and the automatic mode, what ``KFAC(model, loss=...)`` runs under ``step(closure)``
(quadratic-model lr and momentum, Levenberg–Marquardt damping), at its defaults and with ``cov_update_freq=5``.
``--arms`` times a subset; ``--base REV`` adds the automatic arm with revision REV's quadratic model (before and
after a change, in the same run); ``--profile [ARM]`` prints torch.profiler's top operators of one arm's steps.

    PYTHONPATH=. python benchmarks/overhead.py [--rounds 15] [--arms ARM ...] [--base REV] [--profile [ARM]]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks import workloads
from benchmarks.quadratic_model import revision_module
from kfac_tune import KFAC
from kfac_tune.optim import quadratic

PERIOD = 20


# the fixed-lr mode (lr and momentum given), KL-clipped as the earlier rounds measured it
FIXED: dict[str, Any] = {"lr": 0.01, "momentum": 0.9, "inv_update_freq": PERIOD, "kl_clip": 1e-3}
KFAC_ARMS: dict[str, dict[str, Any]] = {
    "kfac fixed-lr": FIXED,
    "kfac fixed-lr cov_update_freq=5": {**FIXED, "cov_update_freq": 5},
    "kfac fixed-lr cov_update_freq=10": {**FIXED, "cov_update_freq": 10},
    "kfac fixed-lr stat_fraction=0.25": {**FIXED, "stat_fraction": 0.25},
    # the automatic mode: what KFAC(model, loss=...) runs under step(closure)
    "kfac automatic (default)": {},
    "kfac automatic cov_update_freq=5": {"cov_update_freq": 5},
}


def arms(kfac_arms: dict[str, dict[str, Any]]) -> dict[str, tuple[workloads.Workload, torch.optim.Optimizer]]:
    adam = workloads.load("digits_mlp", train_size=1024)
    setup: dict[str, tuple[workloads.Workload, torch.optim.Optimizer]] = {
        "adam": (adam, torch.optim.Adam(adam.model.parameters(), lr=1e-3))}
    for name, kwargs in kfac_arms.items():
        w = workloads.load("digits_mlp", train_size=1024)
        setup[name] = (w, KFAC(w.model, loss=w.loss, seed=0, **kwargs))
    return setup


def with_quadratic_model_of(opt: KFAC, module: types.ModuleType) -> None:
    """Make ``opt`` build its quadratic model with ``module``'s ``build`` (another revision's ``quadratic.py``):
    the before/after of a change to the automatic mode's products, timed in the same interleaved run."""
    def build(self: KFAC, params: list[torch.Tensor], grads: list[torch.Tensor], dirs: list[list[torch.Tensor]],
              weight_decay: float) -> quadratic.QuadraticModel:
        self._hooks_enabled = False
        try:
            return module.build(self.model, self._last_inputs, self.loss, params, grads, dirs, weight_decay,
                                damping_weights=self._damping_weights(params))
        finally:
            self._hooks_enabled = True

    opt._quadratic_model = types.MethodType(build, opt)  # type: ignore[method-assign]


def timed(step: Callable[[], Any]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def measure(rounds: int, kfac_arms: dict[str, dict[str, Any]], base: dict[str, types.ModuleType]
            ) -> dict[str, tuple[float, float]]:
    """Per arm: (median ms per step, median within-round ratio to Adam); ``base`` names the arms that build their
    quadratic model with another revision's module."""
    setup = arms(kfac_arms)
    for name, module in base.items():
        with_quadratic_model_of(setup[name][1], module)
    names = list(setup)
    means: dict[str, list[float]] = {name: [] for name in setup}
    step = 0
    for r in range(rounds + 1):
        totals = dict.fromkeys(setup, 0.0)
        for _ in range(PERIOD):
            shift = step % len(names)
            for name in names[shift:] + names[:shift]:
                w, opt = setup[name]
                closure = w.closure(opt, step)
                totals[name] += timed(lambda: opt.step(closure))
            step += 1
        if r:  # round 0 warms up
            for name in setup:
                means[name].append(totals[name] / PERIOD)
    return {name: (1e3 * statistics.median(means[name]),
                   statistics.median(k / a for k, a in zip(means[name], means["adam"]))) for name in setup}


def profile(name: str) -> None:
    w, opt = arms({name: KFAC_ARMS[name]})[name]
    for i in range(PERIOD):
        opt.step(w.closure(opt, i))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for i in range(PERIOD, 3 * PERIOD):
            opt.step(w.closure(opt, i))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--profile", nargs="?", const="kfac automatic (default)", metavar="ARM",
                        help="print the top operators of one arm's steps (default: the automatic mode)")
    parser.add_argument("--arms", nargs="*", metavar="ARM", help="time only these K-FAC arms (with Adam)")
    parser.add_argument("--base", metavar="REV", help="add the automatic arm with REV's quadratic.py and fisher.py")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.profile:
        profile(args.profile)
        return
    chosen = {name: KFAC_ARMS[name] for name in args.arms} if args.arms else dict(KFAC_ARMS)
    base = {}
    with tempfile.TemporaryDirectory() as folder:
        if args.base:
            name = f"kfac automatic (default), {args.base}'s quadratic model"
            chosen[name] = KFAC_ARMS["kfac automatic (default)"]
            base[name] = revision_module(args.base, Path(folder))
        result = measure(args.rounds, chosen, base)
    print(f"digits MLP, batch 128, fixed-lr arms: inverses every {PERIOD} steps, kl_clip 1e-3; automatic arms: "
          f"the defaults; 1 thread, {args.rounds} rounds")
    print("| arm | ms / step | × Adam (same round) |\n|---|---|---|")
    for name, (ms, ratio) in result.items():
        print(f"| {name} | {ms:.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
