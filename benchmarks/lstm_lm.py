"""Adam vs K-FAC (independence) vs K-FAC (Option 2) on the character-level LSTM language model.

    python benchmarks/lstm_lm.py [--steps 200] [--hidden 64] [--out benchmarks/out/lstm_lm.json]

Each arm gets the same trial budget: a fixed grid of four hyperparameter points (Adam: learning rate; K-FAC:
learning rate x damping, KL-clip fixed at 0.01), every trial the same model initialisation, data order and step budget.  The best trial of
each arm (lowest final validation loss, per character, in nats) is reported with its validation curve against
iterations and against wall-clock training time (evaluation excluded), as a markdown table on stdout and as JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from kfac_tune import KFAC
from kfac_tune.zoo import build_model, load_dataset

KL_CLIP = 0.01
ARMS: dict[str, list[dict[str, float]]] = {
    "adam": [{"lr": lr} for lr in (3e-3, 1e-2, 3e-2, 1e-1)],
    "kfac_independent": [{"lr": lr, "damping": d} for lr in (0.03, 0.1) for d in (0.03, 0.3)],
    "kfac_option2": [{"lr": lr, "damping": d} for lr in (0.03, 0.1) for d in (0.03, 0.3)],
}


def _optimizer(arm: str, model: nn.Module, hp: dict[str, float]) -> torch.optim.Optimizer:
    if arm == "adam":
        return torch.optim.Adam(model.parameters(), lr=hp["lr"])
    temporal = "option2" if arm == "kfac_option2" else "independent"
    return KFAC(model, lr=hp["lr"], damping=hp["damping"], momentum=0.9, kl_clip=KL_CLIP, temporal=temporal,
                inv_update_freq=10, seed=0)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def run_trial(arm: str, hp: dict[str, float], data: Any, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_model("lstm_lm", input_shape=data.input_shape, num_classes=data.num_classes,
                        embedding=args.embedding, hidden=args.hidden)
    opt = _optimizer(arm, model, hp)
    order = torch.Generator().manual_seed(0)
    curve, seconds = [], 0.0
    for step in range(1, args.steps + 1):
        index = torch.randint(len(data.train_x), (args.batch,), generator=order)
        x, y = data.train_x[index], data.train_y[index]
        start = time.perf_counter()

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = _loss(model, x, y)
            loss.backward()
            return loss

        loss = opt.step(closure).item()
        seconds += time.perf_counter() - start
        if not math.isfinite(loss):
            break
        if step % args.eval_every == 0:
            with torch.no_grad():
                model.eval()
                val = float(_loss(model, data.test_x, data.test_y))
                model.train()
            curve.append({"step": step, "seconds": round(seconds, 2), "val_loss": round(val, 4)})
    if isinstance(opt, KFAC):
        opt.close()
    final = curve[-1]["val_loss"] if len(curve) == args.steps // args.eval_every else math.inf
    return {"arm": arm, "hyperparameters": hp, "final_val_loss": final, "curve": curve}


def _table(best: dict[str, dict[str, Any]], key: Callable[[dict[str, Any]], Any], title: str) -> str:
    lines = [f"| {title} | " + " | ".join(best) + " |", "|---" * (len(best) + 1) + "|"]
    rows = zip(*(r["curve"] for r in best.values()))
    for points in rows:
        lines.append(f"| {key(points[0])} | " + " | ".join(
            f"{p['val_loss']:.3f} ({p['seconds']:.0f} s)" for p in points) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--embedding", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--train-size", type=int, default=4096)
    parser.add_argument("--test-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/lstm_lm.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("pydoc_text", seq_len=args.seq_len, train_size=args.train_size, test_size=args.test_size)
    results = []
    for arm, grid in ARMS.items():
        for hp in grid:
            result = run_trial(arm, hp, data, args)
            print(f"{arm:18s} {json.dumps(hp):32s} final val loss {result['final_val_loss']:.4f}", flush=True)
            results.append(result)
    best = {arm: min((r for r in results if r["arm"] == arm), key=lambda r: r["final_val_loss"]) for arm in ARMS}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "source": data.source,
                                    "results": results}, indent=1))
    print("\nbest per arm: " + ", ".join(f"{a}: {json.dumps(r['hyperparameters'])}" for a, r in best.items()))
    print("\nvalidation loss (nats/char) and cumulative training time, by iteration\n")
    print(_table(best, lambda p: p["step"], "step"))


if __name__ == "__main__":
    main()
