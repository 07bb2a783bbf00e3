"""The seed's headline experiment (issue 6): deep autoencoder, K-FAC vs tuned Adam, iterations and wall-clock to
a matched test loss.  C1 on the CPU (``--width-div 4``), G1a on a GPU (full width).

Data: Fashion-MNIST training images 0–9,999 (train) and 10,000–19,999 (test), /255, flattened.

``--experiment sigmoid`` (C1/G1a, Bulatov's setup): 784-1024-1024-1024-196-…-784, sigmoid after every layer
including the output, no biases, UFLDL uniform init; full batch 10,000 every step.  ``--experiment relu`` (C2, the
"tweaked" variant): ReLU hidden units, biases, linear output; Adam with weight normalisation at batch 128 against
K-FAC at full batch.

Loss: every arm minimises ``F.mse_loss(model(x), x)`` (mean over the 784 pixels and the batch; this is what
``KFAC(loss="mse")`` approximates the Fisher of: the output sigmoid is part of the model, so it is the Fisher w.r.t.
the post-sigmoid output).  Reported losses are the seed's metric, ½·SSE per image = ``0.5 * 784 * mse``.

Arms (``--arms`` picks a subset):
  adam        Adam, lr tuned on a log grid (or ``--adam-lr``)
  kfac-seed   K-FAC with Bulatov's settings: inverse every step, no momentum, no moving average (factor_decay
              0), MC Fisher, lr 0.2; damping 3e-3 literally and rescaled to this loss (λ²/392, see below), each
              in the damping modes ``--seed-damping-modes`` (pi, exact)
  kfac-tuned  K-FAC tuned on an lr × damping grid with as many trials as Adam (or ``--kfac-lr/--kfac-damping``)
  adam-kfac   Adam fed K-FAC-preconditioned gradients (Bulatov's ``adam_kfac``; lr ``--adam-kfac-lr``)
  muon        Muon on the hidden matrices, AdamW (lr ``--muon-adamw-lr``) on the output layer and biases
              (kfac-tune's ``muon``), Muon's lr tuned on a log grid like Adam's; momentum 0.95
  soap        SOAP (heavyball, kfac-tune's ``soap``; a Shampoo-family preconditioner), lr tuned on a log grid,
              heavyball's other defaults
The first-order arms (adam, muon, soap) run with the same batch size and step budget and no weight decay (the
Adam arm has none), so they differ only in the update rule.

Clocks: arms advance round-robin, always the one whose training clock is furthest behind, so background load
hits them alike; only optimizer steps are timed, evaluation is not.  Tuning trials are arms of the same kind, each
given the same training-time budget (``--tune-seconds``); a trial's score is its lowest test loss.

    PYTHONPATH=. python benchmarks/autoencoder.py --quick
    PYTHONPATH=. python benchmarks/autoencoder.py --width-div 4 --seeds 3 --out benchmarks/out/c1
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks._common import (
    KFAC_PHASES,
    KfacSplit,
    Series,
    Stopwatch,
    fashion_mnist_autoencoder_data,
    format_table,
    machine_line,
    median,
    plot_series,
    setup,
    write_json,
)
from kfac_tune.optim import KFAC
from kfac_tune.catalog import build_optimizer
from kfac_tune.zoo import build_model

PIXELS = 784
SEED_WIDTHS = (1024, 1024, 1024, 196)
# Bulatov adds λ = 3e-3 to each factor of the Fisher of ½·SSE/N.  F.mse_loss is that loss ÷ 392 (= 784/2), so on
# this loss his damped block is (A + λI) ⊗ (G + λ/392·I): factored damping whose two terms multiply to λ²/392.
# With damping_mode="pi" that is damping = λ²/392 (the split between the factors then follows the trace norm).
SEED_DAMPING_RESCALED = float(f"{3e-3 ** 2 / (PIXELS / 2):.3g}")
FIRST_ORDER = ("adam", "muon", "soap")


def seed_metric(mse: float) -> float:
    """The seed's loss, ½·SSE per image, from the element-mean squared error."""
    return 0.5 * PIXELS * mse


def scaled_widths(div: int) -> list[int]:
    """Bulatov's widths with the hidden layers divided by ``div``; the 196 code is divided and rounded up to a
    multiple of 16 (``--width-div 4`` gives C1's 256-256-256-64)."""
    if div == 1:
        return list(SEED_WIDTHS)
    code = 16 * math.ceil(SEED_WIDTHS[-1] / div / 16)
    return [w // div for w in SEED_WIDTHS[:-1]] + [code]


# ------------------------------------------------------------------------------------------------- arms
@dataclass(frozen=True)
class Arm:
    """One training configuration: an optimizer kind, its hyperparameters and its budget."""

    name: str
    kind: str  # "kfac" | "adam-kfac" | a first-order optimizer of kfac-tune's catalog: "adam", "muon", "soap"
    hparams: dict[str, Any]
    max_steps: int
    batch_size: Optional[int] = None  # None: the full training set every step
    weight_norm: bool = False


@dataclass
class Curve:
    """What one arm did: evaluation points (step, training seconds, test loss, train loss) and its cost split."""

    arm: str
    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    test: list[float] = field(default_factory=list)
    train: list[float] = field(default_factory=list)
    diverged: bool = False
    total_steps: int = 0
    total_seconds: float = 0.0
    split_ms: dict[str, float] = field(default_factory=dict)

    def best(self) -> tuple[float, int, float]:
        """(lowest test loss, first step where it was reached, training seconds then)."""
        if not self.test:
            return float("nan"), -1, float("nan")
        i = min(range(len(self.test)), key=lambda k: self.test[k])
        return self.test[i], self.steps[i], self.seconds[i]

    def reach(self, target: float) -> tuple[Optional[int], Optional[float]]:
        """First evaluated step (and its training seconds) with test loss ≤ target; None if never."""
        for s, t, loss in zip(self.steps, self.seconds, self.test):
            if loss <= target:
                return s, t
        return None, None


def build_net(experiment: str, widths: Sequence[int], weight_norm: bool) -> nn.Module:
    if experiment == "sigmoid":
        return build_model("autoencoder", input_shape=(1, 28, 28), num_classes=None, widths=list(widths),
                           activation="sigmoid", output_activation="sigmoid", code_activation="sigmoid",
                           bias=False, init="ufldl", weight_norm=weight_norm)
    return build_model("autoencoder", input_shape=(1, 28, 28), num_classes=None, widths=list(widths),
                       activation="relu", output_activation="linear", code_activation="relu", bias=True,
                       init="ufldl", weight_norm=weight_norm)


def reconstruction_closure(opt: Any, model: nn.Module, x: Tensor) -> Callable[[], Tensor]:
    """What every arm's ``step`` calls: zero the gradients, then the loss on ``x`` and its backward pass."""
    def closure() -> Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), x)
        loss.backward()
        return loss

    return closure


class Runner:
    """An arm in training: its model, optimizer, training clock and curve."""

    def __init__(self, arm: Arm, experiment: str, widths: Sequence[int], train_x: Tensor, seed: int,
                 device: torch.device, profile: bool) -> None:
        self.arm, self.train_x, self.device = arm, train_x, device
        torch.manual_seed(seed)  # the same initial weights for every arm of a seed
        self.model = build_net(experiment, widths, arm.weight_norm).to(device)
        self.clock = Stopwatch(device)
        self.curve = Curve(arm.name)
        self.split: Optional[KfacSplit] = None
        self.steps = 0
        self._order = torch.Generator().manual_seed(seed)
        self._perm: list[Tensor] = []
        self._step = self._make_step(arm, seed, profile)

    # -- optimizers -------------------------------------------------------------------------------------------
    def _make_step(self, arm: Arm, seed: int, profile: bool) -> Callable[[Tensor], Tensor]:
        model, h = self.model, arm.hparams
        if arm.kind in FIRST_ORDER:
            opt = build_optimizer(arm.kind, model, h, loss="mse")

            def first_order_step(x: Tensor) -> Tensor:
                return opt.step(reconstruction_closure(opt, model, x)).detach()

            return first_order_step

        kfac_kw = {k: v for k, v in h.items() if k not in ("adam_lr",)}
        if arm.kind == "adam-kfac":  # K-FAC only computes the direction: lr 1, no momentum, then Adam steps
            kfac_kw.update(lr=1.0, momentum=0.0)
        kfac = KFAC(model, loss="mse", seed=seed, profile=profile, **kfac_kw)
        self.split = KfacSplit(kfac, self.device) if profile else None
        adam = torch.optim.Adam(model.parameters(), lr=h["adam_lr"]) if arm.kind == "adam-kfac" else None
        params = [p for p in model.parameters() if p.requires_grad]

        def kfac_step(x: Tensor) -> Tensor:
            closure = reconstruction_closure(kfac, model, x)
            wrapped = self.split.timed(closure) if self.split is not None else closure
            if adam is None:
                return kfac.step(wrapped).detach()
            # Adam on the preconditioned gradient: let K-FAC apply θ ← θ + Δ, read Δ, undo it, give Adam −Δ.
            before = [p.detach().clone() for p in params]
            loss = kfac.step(wrapped).detach()
            for p, p0 in zip(params, before):
                p.grad = p0 - p.detach()
                p.data.copy_(p0)
            adam.step()
            return loss

        return kfac_step

    # -- training ---------------------------------------------------------------------------------------------
    def _batch(self) -> Tensor:
        size = self.arm.batch_size
        if size is None or size >= len(self.train_x):
            return self.train_x
        if not self._perm:
            order = torch.randperm(len(self.train_x), generator=self._order).to(self.train_x.device)
            self._perm = list(order.split(size))[::-1]
        return self.train_x[self._perm.pop()]

    def step(self) -> Tensor:
        x = self._batch()
        start = time.perf_counter()
        with self.clock:
            loss = self._step(x)
        if self.split is not None:
            self.split.record_step(time.perf_counter() - start)
        self.steps += 1
        return loss

    def done(self, max_seconds: float) -> bool:
        return self.curve.diverged or self.steps >= self.arm.max_steps or self.clock.total >= max_seconds

    @torch.no_grad()
    def evaluate(self, test_x: Tensor, train_loss: Optional[Tensor]) -> None:
        mse = float(F.mse_loss(self.model(test_x), test_x))
        c = self.curve
        c.steps.append(self.steps)
        c.seconds.append(self.clock.total)
        c.test.append(seed_metric(mse))
        c.train.append(seed_metric(float(train_loss)) if train_loss is not None else float("nan"))
        if not math.isfinite(mse):
            c.diverged = True

    def finish(self) -> Curve:
        c = self.curve
        c.total_steps, c.total_seconds = self.steps, self.clock.total
        if self.split is not None:
            c.split_ms = {k: v * 1e3 for k, v in self.split.per_step().items()}
        else:
            c.split_ms = {"total": 1e3 * self.clock.total / max(self.steps, 1)}
        return c


def eval_due(step: int, arm: Arm, n_train: int, every: int, dense_until: int) -> bool:
    """Full-batch arms: after every step up to ``dense_until`` (K-FAC's targets fall there), then every ``every``
    steps.  Mini-batch arms: four times per epoch."""
    if arm.batch_size is not None and arm.batch_size < n_train:
        return step % max(1, n_train // arm.batch_size // 4) == 0
    return step <= dense_until or step % every == 0


def run_arms(arms: Sequence[Arm], experiment: str, widths: Sequence[int], train_x: Tensor, test_x: Tensor,
             seed: int, device: torch.device, *, max_seconds: float, deadline: float, eval_every: int,
             dense_until: int, profile: bool, log: Optional[Callable[[str], None]] = None) -> list[Curve]:
    """Train all arms together: always step the live arm whose training clock is furthest behind."""
    runners = [Runner(a, experiment, widths, train_x, seed, device, profile) for a in arms]
    for r in runners:
        r.evaluate(test_x, None)
    last_log = time.time()
    while True:
        live = [r for r in runners if not r.done(max_seconds)]
        if not live or time.time() > deadline:
            break
        r = min(live, key=lambda r: r.clock.total)
        loss = r.step()
        if eval_due(r.steps, r.arm, len(train_x), eval_every, dense_until) or r.done(max_seconds):
            r.evaluate(test_x, loss)
        if log and time.time() - last_log > 60:
            last_log = time.time()
            log("    " + "; ".join(f"{x.arm.name}: it {x.steps}, {x.clock.total:.0f}s, test "
                                    f"{min(x.curve.test):.3f}" for x in runners))
    return [r.finish() for r in runners]


# -------------------------------------------------------------------------------------------------- tuning
def tune(kind_arms: Sequence[Arm], run: Callable[..., list[Curve]], log: Callable[[str], None]
         ) -> tuple[Arm, list[tuple[Arm, float]]]:
    """Run every trial with the same training-time budget; the best is the lowest test loss reached."""
    curves = run(kind_arms)
    scored = []
    for arm, curve in zip(kind_arms, curves):
        best = curve.best()[0]
        scored.append((arm, best if math.isfinite(best) and not curve.diverged else float("inf")))
        log(f"    trial {arm.name}: best test {best:.4f} in {curve.total_steps} it, "
            f"{curve.total_seconds:.1f}s{' (diverged)' if curve.diverged else ''}")
    return min(scored, key=lambda t: t[1])[0], scored


# ------------------------------------------------------------------------------------------------ analysis
def compare(curves: list[Curve], baseline: str) -> dict[str, Any]:
    """Per arm: own minimum, and iterations/seconds to the matched target against the baseline and overall."""
    by = {c.arm: c for c in curves}
    base = by[baseline]
    finite = [c for c in curves if math.isfinite(c.best()[0])]
    overall = max(c.best()[0] for c in finite)  # the best test loss every (finite) arm reaches
    out: dict[str, Any] = {"overall_target": overall, "arms": {}}
    for c in curves:
        best, best_step, best_sec = c.best()
        pair_target = max(best, base.best()[0])
        s_arm, t_arm = c.reach(pair_target)
        s_base, t_base = base.reach(pair_target)
        o_step, o_sec = c.reach(overall)
        out["arms"][c.arm] = {
            "min": best, "min_step": best_step, "min_seconds": best_sec,
            "overall_step": o_step, "overall_seconds": o_sec,
            "pair_target": pair_target, "pair_step": s_arm, "pair_seconds": t_arm,
            "base_pair_step": s_base, "base_pair_seconds": t_base,
            "ms_per_step": c.split_ms.get("total"), "diverged": c.diverged,
            "steps_run": c.total_steps, "seconds_run": c.total_seconds,
        }
    return out


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b and math.isfinite(a) and math.isfinite(b) else None


def summarise(per_seed: list[dict[str, Any]], baseline: str) -> str:
    """Tables of medians over seeds."""
    arms = list(per_seed[0]["arms"])

    def med(arm: str, key: str) -> float:
        vals = [s["arms"][arm][key] for s in per_seed if s["arms"][arm][key] is not None]
        return median(vals) if vals else float("nan")

    def med_ratio(arm: str, num: str, den: str) -> float:
        vals = [_ratio(s["arms"][arm][num], s["arms"][arm][den]) for s in per_seed]
        vals = [v for v in vals if v is not None]
        return median(vals) if vals else float("nan")

    lines = [f"medians over {len(per_seed)} seed(s); losses are ½·SSE per test image; seconds are training time",
             "\nOwn minimum (min-to-min speed-up is against " + baseline + "'s own minimum):"]
    rows = []
    for a in arms:
        rows.append([a, med(a, "min"), med(a, "min_step"), med(a, "min_seconds"), med(a, "ms_per_step"),
                     _safe_div(med(baseline, "min_step"), med(a, "min_step")),
                     _safe_div(med(baseline, "min_seconds"), med(a, "min_seconds"))])
    lines.append(format_table(["arm", "min test", "it", "s", "ms/step", f"{baseline} it ÷ it",
                               f"{baseline} s ÷ s"], rows))
    lines.append(f"\nMatched target per pair: max(own minimum, {baseline}'s minimum); both times measured to it:")
    rows = []
    for a in arms:
        if a == baseline:
            continue
        rows.append([a, med(a, "pair_target"), med(a, "pair_step"), med(a, "base_pair_step"),
                     med_ratio(a, "base_pair_step", "pair_step"), med(a, "pair_seconds"),
                     med(a, "base_pair_seconds"), med_ratio(a, "base_pair_seconds", "pair_seconds")])
    lines.append(format_table(["arm", "target", "it", f"{baseline} it", "× fewer it", "s", f"{baseline} s",
                               "× less time"], rows))
    overall = median(s["overall_target"] for s in per_seed)
    lines.append(f"\nOverall matched target (the best test loss every arm reaches), median {overall:.4f}:")
    rows = [[a, med(a, "overall_step"), med(a, "overall_seconds")] for a in arms]
    lines.append(format_table(["arm", "it", "s"], rows))
    return "\n".join(lines)


def _safe_div(a: float, b: float) -> float:
    return a / b if b and math.isfinite(a) and math.isfinite(b) else float("nan")


def split_table(curves_by_seed: list[list[Curve]]) -> str:
    cols = [*KFAC_PHASES, "other", "total"]
    rows = []
    for name in [c.arm for c in curves_by_seed[0]]:
        per = [next(c for c in cs if c.arm == name).split_ms for cs in curves_by_seed]
        rows.append([name, *(median(p.get(k, float("nan")) for p in per) for k in cols)])
    return "ms per step (median over seeds; first-order arms have only a total):\n" + format_table(
        ["arm", *cols], rows)


def plot(curves: list[Curve], target: float, out: Path, tag: str) -> list[Path]:
    paths = []
    for xkey, xlabel in (("steps", "iterations"), ("seconds", "training seconds (evaluation excluded)")):
        series = [Series(c.arm, [max(v, 1e-3 if xkey == "seconds" else 1) for v in getattr(c, xkey)], c.test)
                  for c in curves]
        path = out / f"{tag}_test_vs_{xkey}.png"
        plot_series(series, path, xlabel=xlabel, ylabel="test loss (½·SSE per image)", title=tag, hline=target)
        paths.append(path)
    return paths


# -------------------------------------------------------------------------------------------------- main
def log_grid(lo: float, hi: float, n: int) -> list[float]:
    return [float(f"{lo * (hi / lo) ** (i / (n - 1)):.3g}") for i in range(n)]


def build_arms(args: argparse.Namespace) -> dict[str, list[Arm]]:
    """Candidate arms per family: a one-element list when fixed, a tuning grid otherwise."""
    kfac_common = dict(momentum=args.kfac_momentum, factor_decay=0.95, inv_update_freq=args.inv_update_freq,
                       cov_update_freq=args.cov_update_freq, stat_fraction=args.stat_fraction,
                       damping_mode=args.damping_mode)
    adam_bs = 128 if args.experiment == "relu" else None  # None: full batch
    wn = args.experiment == "relu"
    fams: dict[str, list[Arm]] = {}
    lrs = [args.adam_lr] if args.adam_lr else log_grid(*args.adam_lr_range, args.trials)
    fams["adam"] = [Arm(f"adam lr={lr:g}", "adam", {"lr": lr}, args.adam_steps, adam_bs, wn) for lr in lrs]
    fams["muon"] = [Arm(f"muon lr={lr:g}", "muon", {"lr": lr, "momentum": 0.95, "weight_decay": 0.0,
                                                    "adamw_lr": args.muon_adamw_lr, "adamw_weight_decay": 0.0},
                        args.adam_steps, adam_bs, wn) for lr in log_grid(*args.muon_lr_range, args.trials)]
    fams["soap"] = [Arm(f"soap lr={lr:g}", "soap", {"lr": lr, "weight_decay": 0.0}, args.adam_steps, adam_bs, wn)
                    for lr in log_grid(*args.soap_lr_range, args.trials)]
    if args.experiment == "sigmoid":
        fams["kfac-seed"] = [
            Arm(f"kfac-seed ({mode}, λ={d:g})", "kfac",
                dict(lr=0.2, damping=d, momentum=0.0, factor_decay=0.0, inv_update_freq=1, cov_update_freq=1,
                     damping_mode=mode), args.kfac_steps)
            for d in args.seed_dampings for mode in args.seed_damping_modes]
    if args.kfac_lr and args.kfac_damping:
        grid = [(args.kfac_lr, args.kfac_damping)]
    else:
        lrs_k = args.kfac_lr_grid
        damps = args.kfac_damping_grid
        grid = [(lr, d) for lr in lrs_k for d in damps][: max(args.trials, 1)]
    fams["kfac-tuned"] = [Arm(f"kfac lr={lr:g} damping={d:g}", "kfac", {**kfac_common, "lr": lr, "damping": d},
                              args.kfac_steps) for lr, d in grid]
    # Martens & Grosse's automatic mode: Levenberg–Marquardt damping and quadratic-model lr and momentum; only the
    # initial damping λ₀ is searched (same trial budget as the other families).
    fams["kfac-adaptive"] = [
        Arm(f"kfac-adaptive λ0={d:g}", "kfac",
            {**kfac_common, "damping": d, "adaptive_damping": True, "adaptive_lr": True, "adaptive_momentum": True},
            args.kfac_steps)
        for d in args.adaptive_damping_grid[: max(args.trials, 1)]]
    if args.adam_kfac_lr:
        fams["adam-kfac"] = [Arm(f"adam-kfac lr={args.adam_kfac_lr:g}", "adam-kfac",
                                 dict(adam_lr=args.adam_kfac_lr, damping=args.seed_dampings[-1], factor_decay=0.0,
                                      inv_update_freq=1, damping_mode=args.seed_damping_modes[0]),
                                 args.kfac_steps)]
    return {k: v for k, v in fams.items() if k in args.arms}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    floats = lambda s: [float(v) for v in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", choices=("sigmoid", "relu"), default="sigmoid")
    p.add_argument("--width-div", type=int, default=1, help="divide the hidden widths (4: C1's CPU network)")
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--test-size", type=int, default=10000)
    p.add_argument("--arms", type=lambda s: s.split(","),
                   default=["adam", "kfac-seed", "kfac-tuned", "kfac-adaptive", "adam-kfac", "muon", "soap"])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds run are first-seed … first-seed+seeds-1 (to split seeds across processes)")
    p.add_argument("--adam-steps", type=int, default=3000)
    p.add_argument("--kfac-steps", type=int, default=300)
    p.add_argument("--arm-seconds", type=float, default=600, help="training-time cap per arm and seed")
    p.add_argument("--max-minutes", type=float, default=60, help="wall-clock deadline for the whole script")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--dense-until", type=int, default=100, help="evaluate after every step up to this one")
    # tuning
    p.add_argument("--trials", type=int, default=9, help="trials per tuned family (Adam and K-FAC alike)")
    p.add_argument("--tune-seconds", type=float, default=60, help="training seconds per trial")
    p.add_argument("--adam-lr", type=float, default=None, help="skip Adam's tuning, use this lr")
    p.add_argument("--adam-lr-range", type=floats, default=[1e-4, 1e-1])
    p.add_argument("--muon-lr-range", type=floats, default=[2e-3, 0.2], help="Muon's lr grid (around its 0.02)")
    p.add_argument("--muon-adamw-lr", type=float, default=1e-3,
                   help="AdamW's lr for the parameters Muon does not take (the output layer, biases)")
    p.add_argument("--soap-lr-range", type=floats, default=[3e-4, 3e-2], help="SOAP's lr grid (around its 3e-3)")
    p.add_argument("--kfac-lr", type=float, default=None)
    p.add_argument("--kfac-damping", type=float, default=None)
    p.add_argument("--kfac-lr-grid", type=floats, default=[0.05, 0.2, 0.5])
    # on F.mse_loss the Fisher is ~392x smaller than on ½·SSE/N: Bulatov's 3e-3 corresponds to ~2e-8 (see above)
    p.add_argument("--kfac-damping-grid", type=floats, default=[1e-7, 1e-6, 1e-5])
    p.add_argument("--kfac-momentum", type=float, default=0.0)
    p.add_argument("--adaptive-damping-grid", type=floats, default=[1e-4, 1e-3, 1e-2],
                   help="initial damping values tried for the kfac-adaptive family")
    p.add_argument("--inv-update-freq", type=int, default=5)
    p.add_argument("--cov-update-freq", type=int, default=1)
    p.add_argument("--stat-fraction", type=float, default=0.25)
    p.add_argument("--damping-mode", choices=("pi", "exact"), default="pi")
    p.add_argument("--seed-damping-modes", type=lambda s: s.split(","), default=["pi", "exact"])
    p.add_argument("--seed-dampings", type=floats, default=[3e-3, SEED_DAMPING_RESCALED],
                   help="damping of the kfac-seed arms: Bulatov's 3e-3 literally, and rescaled to this loss")
    p.add_argument("--adam-kfac-lr", type=float, default=1e-3, help="0 disables the adam-kfac arm")
    # machine and output
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/out/autoencoder")
    p.add_argument("--mlflow", metavar="URI", default=None,
                   help="also log the curves, tables and plots to this MLflow tracking URI (benchmarks/log_mlflow.py)")
    p.add_argument("--combine", nargs="+", metavar="DIR", default=None,
                   help="no training: pool the seeds of earlier runs' results.json (same arms) into --out")
    p.add_argument("--quick", action="store_true",
                   help="width ÷8, 2,000 train/test images, 1 seed, short budgets: a few minutes")
    args = p.parse_args(argv)
    if args.quick:
        args.width_div = max(args.width_div, 8)
        args.train_size = args.test_size = 2000
        args.seeds = 1
        args.adam_steps, args.kfac_steps = min(args.adam_steps, 1000), min(args.kfac_steps, 100)
        args.tune_seconds = min(args.tune_seconds, 15)
        args.arm_seconds = min(args.arm_seconds, 30)
        args.trials = min(args.trials, 8)
    return args


def combine(dirs: Sequence[str], out: Path) -> dict[str, Any]:
    """Pool the seeds of runs made in separate processes (``--first-seed``) into one summary and results.json."""
    runs = [json.loads((Path(d) / "results.json").read_text()) for d in dirs]
    names = [[a["name"] for a in r["arms"]] for r in runs]
    if any(n != names[0] for n in names):
        raise SystemExit(f"--combine: the runs have different arms: {names}")
    per_seed = [s for r in runs for s in r["per_seed"]]
    curves = [cs for r in runs for cs in r["curves"]]
    baseline = runs[0]["baseline"]
    summary = summarise(per_seed, baseline)
    splits = split_table([[Curve(**c) for c in cs] for cs in curves])
    out.mkdir(parents=True, exist_ok=True)
    write_json(str(out / "results.json"), {
        **runs[0], "per_seed": per_seed, "curves": curves, "summary": summary, "splits": splits,
        "seeds": [seed for r in runs for seed in r.get("seeds", range(len(r["per_seed"])))],
        "combined_from": list(dirs), "machine": "; ".join(sorted({r["machine"] for r in runs})),
    })
    print(summary + "\n\n" + splits)
    return {"per_seed": per_seed, "summary": summary}


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.combine:
        return combine(args.combine, Path(args.out))
    device = setup(args.device, args.threads)
    start = time.time()
    deadline = start + 60 * args.max_minutes
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = (out / "log.txt").open("a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    widths = scaled_widths(args.width_div)
    train_x, test_x = fashion_mnist_autoencoder_data(args.train_size, args.test_size, device)
    log(f"experiment {args.experiment}: 784-{'-'.join(map(str, widths))}-…-784, train {len(train_x)}, "
        f"test {len(test_x)}; loss F.mse_loss, reported as 0.5*784*mse (½·SSE per image)")
    log(machine_line(device))
    profile = device.type == "cpu"  # the profiler synchronises a GPU around every phase; on a CPU it is free

    def run(arms: Sequence[Arm], seed: int, max_seconds: float) -> list[Curve]:
        return run_arms(arms, args.experiment, widths, train_x, test_x, seed, device, max_seconds=max_seconds,
                        deadline=deadline, eval_every=args.eval_every, dense_until=args.dense_until,
                        profile=profile, log=log)

    chosen: list[Arm] = []
    tuning: dict[str, list[tuple[str, float]]] = {}
    for family, candidates in build_arms(args).items():
        if family == "kfac-seed" or len(candidates) == 1:  # fixed settings: every candidate is an arm
            chosen += candidates
            continue
        log(f"tuning {family}: {len(candidates)} trials x {args.tune_seconds:g} training seconds (seed 0)")
        best, scored = tune(candidates, lambda arms: run(arms, 0, args.tune_seconds), log)
        tuning[family] = [(a.name, s) for a, s in scored]
        log(f"  -> {best.name}")
        chosen.append(best)
    arms = chosen
    baseline = next((a.name for a in arms if a.kind == "adam"), arms[0].name)

    per_seed, curves_by_seed = [], []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        log(f"seed {seed}: " + ", ".join(a.name for a in arms))
        curves = run(arms, seed, args.arm_seconds)
        cmp = compare(curves, baseline)
        per_seed.append(cmp)
        curves_by_seed.append(curves)
        plot(curves, cmp["overall_target"], out, f"{args.experiment}_seed{seed}")
        for c in curves:
            b = c.best()
            log(f"  {c.arm}: min {b[0]:.4f} at it {b[1]} ({b[2]:.1f}s); ran {c.total_steps} it "
                f"{c.total_seconds:.1f}s{' DIVERGED' if c.diverged else ''}")
    summary = summarise(per_seed, baseline)
    splits = split_table(curves_by_seed)
    log("\n" + summary + "\n\n" + splits)
    if time.time() > deadline:
        log(f"\nNOTE: the --max-minutes deadline ({args.max_minutes:g} min) cut some runs short")
    write_json(str(out / "results.json"), {
        "args": vars(args), "machine": machine_line(device), "widths": widths, "baseline": baseline,
        "arms": [asdict(a) for a in arms], "tuning": tuning, "per_seed": per_seed,
        "seeds": list(range(args.first_seed, args.first_seed + args.seeds)),
        "curves": [[asdict(c) for c in cs] for cs in curves_by_seed], "summary": summary, "splits": splits,
    })
    log(f"wrote {out}/results.json and plots; {time.time() - start:.0f}s in all")
    if args.mlflow:
        from benchmarks.log_mlflow import log_results

        log(f"logged to MLflow at {args.mlflow}: parent run {log_results(out, args.mlflow)}")
    return {"per_seed": per_seed, "summary": summary}


if __name__ == "__main__":
    main()
