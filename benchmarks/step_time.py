"""Time per step of SGD, Adam and K-FAC on the deep autoencoder (issue 2), all measured in one run.

Model: the zoo ``autoencoder`` with its defaults (784-1000-500-250-30-250-500-1000-784, sigmoid, biases, logits
out), loss ``F.binary_cross_entropy_with_logits`` (K-FAC ``loss="bce"``, true Fisher), on the first ``batch``
Fashion-MNIST training images, one full batch per step.

Protocol: every arm has its own model.  A round is one whole inversion period
(``lcm(inv_update_freq, cov_update_freq)`` steps, starting on an inversion step, so K-FAC's mean includes exactly
one inverse refresh); within a round the arms are interleaved step by step (order alternating between rounds), so
load from other processes hits all arms alike.  After one warm-up round, ``--reps`` rounds are timed.  Reported:
the median over rounds of each arm's mean step time, the median over rounds of the within-round ratio to Adam, and
K-FAC's split (``KFAC(profile=True)``) into gradient, statistics, inverses, preconditioning, update and
unattributed overhead, over all timed rounds.

    PYTHONPATH=. python benchmarks/step_time.py --batch 1000 10000
    PYTHONPATH=. python benchmarks/step_time.py --quick
"""
from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks._common import (
    KFAC_PHASES,
    KfacSplit,
    fashion_mnist_autoencoder_data,
    format_table,
    machine_line,
    median,
    setup,
    sync,
    write_json,
)
from kfac_tune.optim import KFAC
from kfac_tune.zoo import build_model

DEFAULT_WIDTHS = (1000, 500, 250, 30)
QUICK_WIDTHS = (256, 128, 64, 16)


@dataclass
class TimedArm:
    """One optimizer on its own copy of the model, with the step it times."""

    name: str
    step: Callable[[], None]
    round_means: list[float] = field(default_factory=list)
    split: Optional[KfacSplit] = None
    _round_total: float = 0.0
    _round_steps: int = 0

    def timed_step(self, device: torch.device) -> None:
        sync(device)
        start = time.perf_counter()
        self.step()
        sync(device)
        elapsed = time.perf_counter() - start
        self._round_total += elapsed
        self._round_steps += 1
        if self.split is not None:
            self.split.record_step(elapsed)

    def close_round(self) -> float:
        """Record the mean step time of the round that just ended."""
        mean = self._round_total / max(self._round_steps, 1)
        self.round_means.append(mean)
        self._round_total, self._round_steps = 0.0, 0
        return mean


def _model(widths: Sequence[int], device: torch.device, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("autoencoder", input_shape=(1, 28, 28), num_classes=None, widths=list(widths)).to(device)


def make_arms(x: Tensor, widths: Sequence[int], args: argparse.Namespace, device: torch.device) -> list[TimedArm]:
    """SGD (momentum 0.9), Adam and K-FAC, each on an identical copy of the model."""
    arms = []

    def first_order(name: str, opt_cls: type[torch.optim.Optimizer], **kw: Any) -> TimedArm:
        model = _model(widths, device, args.seed)
        opt = opt_cls(model.parameters(), **kw)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            F.binary_cross_entropy_with_logits(model(x), x).backward()
            opt.step()

        return TimedArm(name, step)

    arms.append(first_order("sgd", torch.optim.SGD, lr=1e-3, momentum=0.9))
    arms.append(first_order("adam", torch.optim.Adam, lr=1e-4))

    # Profiling synchronises a GPU around every phase; there the ratio comes from an unprofiled K-FAC and the split
    # from a second, profiled one.  On the CPU the profiler costs microseconds, so one profiled arm does both.
    profiled = [True] if device.type == "cpu" else [False, True]
    for profile in profiled:
        model = _model(widths, device, args.seed)
        opt = KFAC(model, lr=1e-3, damping=args.damping, momentum=0.9, inv_update_freq=args.inv_update_freq,
                   cov_update_freq=args.cov_update_freq, stat_fraction=args.stat_fraction, loss="bce",
                   damping_mode=args.damping_mode, seed=args.seed, profile=profile)
        split = KfacSplit(opt, device) if profile else None

        def closure(model: nn.Module = model, opt: KFAC = opt) -> Tensor:
            opt.zero_grad(set_to_none=True)
            loss = F.binary_cross_entropy_with_logits(model(x), x)
            loss.backward()
            return loss

        step_closure = split.timed(closure) if split is not None else closure
        name = "kfac" if profile == profiled[0] else "kfac (profiled)"
        arms.append(TimedArm(name, lambda opt=opt, c=step_closure: opt.step(c), split=split))
    return arms


def run_round(arms: list[TimedArm], steps: int, device: torch.device, reverse: bool) -> None:
    """``steps`` ticks; in each tick every arm takes one step (order alternating between rounds)."""
    order = arms[::-1] if reverse else arms
    for _ in range(steps):
        for arm in order:
            arm.timed_step(device)
    for arm in arms:
        arm.close_round()


def measure(batch: int, widths: Sequence[int], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """All arms at one batch size: one warm-up round, then ``args.reps`` timed rounds of one inversion period."""
    x, _ = fashion_mnist_autoencoder_data(batch, 1, device)
    arms = make_arms(x, widths, args, device)
    period = math.lcm(args.inv_update_freq, args.cov_update_freq)
    run_round(arms, period, device, reverse=False)  # warm-up: allocator, kernels, first factors and inverses
    for arm in arms:
        arm.round_means.clear()
        if arm.split is not None:
            arm.split.reset()
    for rep in range(args.reps):
        run_round(arms, period, device, reverse=rep % 2 == 1)
        if args.verbose:
            print(f"  batch {batch} round {rep + 1}/{args.reps}: "
                  + ", ".join(f"{a.name} {a.round_means[-1] * 1e3:.0f} ms" for a in arms), flush=True)
    adam = next(a for a in arms if a.name == "adam")
    result: dict[str, Any] = {"batch": batch, "widths": list(widths), "ms_per_step": {}, "ratio_to_adam": {},
                              "rounds_ms": {}, "kfac_split_ms": {}}
    for arm in arms:
        result["ms_per_step"][arm.name] = median(arm.round_means) * 1e3
        result["rounds_ms"][arm.name] = [m * 1e3 for m in arm.round_means]
        # ratio within each round (same load for both arms), then the median over rounds
        result["ratio_to_adam"][arm.name] = median(a / b for a, b in zip(arm.round_means, adam.round_means))
        if arm.split is not None:
            result["kfac_split_ms"] = {k: v * 1e3 for k, v in arm.split.per_step().items()}
    return result


def report(results: list[dict[str, Any]]) -> str:
    names = list(results[0]["ms_per_step"])
    rows = []
    for r in results:
        rows.append([r["batch"], *(r["ms_per_step"][n] for n in names),
                     *(r["ratio_to_adam"][n] for n in names if n != "adam")])
    out = [format_table(["batch", *(f"{n} ms" for n in names), *(f"{n}/adam" for n in names if n != "adam")],
                        rows)]
    split_cols = [*KFAC_PHASES, "other", "total"]
    out.append("\nK-FAC split, ms per step (share of the profiled step):")
    rows = []
    for r in results:
        s = r["kfac_split_ms"]
        rows.append([r["batch"], *(f"{s[c]:.1f} ({100 * s[c] / s['total']:.0f}%)" for c in split_cols[:-1]),
                     f"{s['total']:.1f}"])
    out.append(format_table(["batch", *split_cols], rows))
    return "\n".join(out)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1000, 10000], help="batch sizes (full batches)")
    p.add_argument("--widths", type=lambda s: [int(w) for w in s.split(",")], default=None,
                   help="encoder widths, comma-separated (default 1000,500,250,30)")
    p.add_argument("--inv-update-freq", type=int, default=20)
    p.add_argument("--cov-update-freq", type=int, default=1)
    p.add_argument("--stat-fraction", type=float, default=1.0)
    p.add_argument("--damping", type=float, default=1e-2)
    p.add_argument("--damping-mode", choices=("pi", "exact"), default="pi")
    p.add_argument("--reps", type=int, default=5,
                   help="timed rounds of one inversion period each (median reported)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help=f"widths {','.join(map(str, QUICK_WIDTHS))}, batch 250 and 1000, 3 rounds (about a minute)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--verbose", action="store_true", help="print every repetition")
    args = p.parse_args(argv)
    if args.quick:
        args.widths = args.widths or list(QUICK_WIDTHS)
        if args.batch == [1000, 10000]:
            args.batch = [250, 1000]
        args.reps = min(args.reps, 3)
    args.widths = args.widths or list(DEFAULT_WIDTHS)
    return args


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    device = setup(args.device, args.threads, args.seed)
    header = (f"autoencoder 784-{'-'.join(map(str, args.widths))}-…-784, BCE, K-FAC inv every "
              f"{args.inv_update_freq}, cov every {args.cov_update_freq}, stat_fraction {args.stat_fraction}, "
              f"damping_mode {args.damping_mode}; median of {args.reps} rounds, arms interleaved step by step")
    print(header)
    print(machine_line(device), flush=True)
    results = [measure(b, args.widths, args, device) for b in args.batch]
    print(report(results))
    write_json(args.json, {"header": header, "machine": machine_line(device), "args": vars(args),
                           "results": results})
    return results


if __name__ == "__main__":
    main()
