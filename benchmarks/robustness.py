"""Robustness of K-FAC's defaults: over how much of (λ₀, T_inv) does it train without diverging, before and after
the safe defaults?

For each workload (digits MLP, digits autoencoder by default), each initial damping λ₀ on a log grid 1e-6 … 1e2
and each inverse period T_inv, train ``--steps`` steps from the same seed with

- ``old``: the optimizer before the safe defaults, reproduced by explicit arguments: ``kl_clip=None`` and
  :attr:`KFAC.LEGACY` (absolute damping, the slow Levenberg–Marquardt rule, no update-size guard, no loss
  rejection);
- ``session 8``: the safe defaults before issue 24 (KL clip 1e-3 whatever the loss, updates larger than ‖θ‖
  skipped, Martens & Grosse's damping rule with a tenfold boost on a bad step);
- ``new``: today's defaults (the trust-region damping rule, the overflow-only update guard, the loss-aware KL
  clip);

once with a fixed learning rate (the constructor's ``lr`` and ``momentum``) and once in the automatic mode
(Levenberg–Marquardt damping from λ₀ + quadratic-model lr and momentum).  A setting *trains* when the loss on the
training subset after the run is finite and below its initial value and the weights are finite; *clean* when it
also skipped no update.  Prints one table row per (workload, mode, arm):

    PYTHONPATH=. python benchmarks/robustness.py [--steps 40] [--workloads digits_mlp,digits_autoencoder]
"""
from __future__ import annotations

import argparse
import math
import time
import warnings
from typing import Any

import torch

from benchmarks import workloads
from kfac_tune import KFAC

DAMPINGS = [10.0**e for e in range(-6, 3)]
INVERSE_PERIODS = [1, 10, 50]
ARMS: dict[str, dict[str, Any]] = {
    "old": dict(kl_clip=None, **KFAC.LEGACY),
    # the defaults between the safe defaults and issue 24: size-based guards and M&G's damping rule with a boost
    "session 8": dict(kl_clip=1e-3, max_update_ratio=1.0, damping_boost=10.0, rejection_ratio=4.0,
                      damping_rule="martens"),
    "new": {},
}
MODES: dict[str, dict[str, Any]] = {
    "fixed lr": dict(lr=0.01, momentum=0.9),  # the constructor's fixed-lr values, asked for explicitly
    "automatic": dict(adaptive_damping=True, adaptive_lr=True, adaptive_momentum=True),
}


def run(name: str, steps: int, **kwargs: Any) -> tuple[bool, bool]:
    """(trains, clean) for one setting."""
    w = workloads.load(name)
    opt = KFAC(w.model, loss=w.loss, seed=0, **kwargs)
    before = w.full_loss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            for _ in w.losses(opt, steps):
                pass
        except RuntimeError:  # e.g. sampling targets from NaN logits: a divergence
            return False, False
    after = w.full_loss()
    finite = all(bool(torch.isfinite(p).all()) for p in w.model.parameters())
    trains = finite and math.isfinite(after) and after < before
    return trains, trains and opt.skipped_steps == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workloads", default="digits_mlp,digits_autoencoder")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = [(d, t) for d in DAMPINGS for t in INVERSE_PERIODS]
    print(f"λ₀ ∈ {{{', '.join(f'{d:g}' for d in DAMPINGS)}}} × T_inv ∈ {INVERSE_PERIODS}: {len(settings)} settings, "
          f"{args.steps} steps each, seed 0")
    print("| workload | mode | arm | trains | clean (no skipped update) | failing λ₀ (any T_inv) |")
    print("|---|---|---|---|---|---|")
    for name in args.workloads.split(","):
        for mode, mode_kwargs in MODES.items():
            for arm, arm_kwargs in ARMS.items():
                started = time.perf_counter()
                results = {(d, t): run(name, args.steps, damping=d, inv_update_freq=t, **mode_kwargs, **arm_kwargs)
                           for d, t in settings}
                trains = sum(ok for ok, _ in results.values())
                clean = sum(c for _, c in results.values())
                failing = sorted({d for (d, _), (ok, _) in results.items() if not ok})
                print(f"| {name} | {mode} | {arm} | {trains}/{len(settings)} ({trains / len(settings):.0%}) | "
                      f"{clean}/{len(settings)} ({clean / len(settings):.0%}) | "
                      f"{', '.join(f'{d:g}' for d in failing) or '—'} |  <!-- {time.perf_counter() - started:.0f} s -->",
                      flush=True)


if __name__ == "__main__":
    main()
