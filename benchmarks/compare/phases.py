"""Where a tuned recipe's step time goes: every shipped recipe of one workload, interleaved, K-FAC split by phase.

The comparison table (README, "Shipped recipes and comparisons") says how many seconds each tuned recipe needs
to reach the common target; when K-FAC needs more, this says why. Each recipe gets its own copy of the
example's network and trains on the example's data with its own tuned batch size. The arms are interleaved in
rounds of ``--round`` steps (order alternating between rounds), so load from other processes on a shared machine
hits all arms alike; reported: the median over rounds of each arm's ms per step, its ratio to Adam in the same
round, and K-FAC's split (``KFAC(profile=True)``: gradient, statistics, inverses, preconditioning, update,
unattributed) over all timed rounds. A round should span at least one inversion period of the K-FAC recipe.

    PYTHONPATH=. python benchmarks/compare/phases.py examples/digits_mlp.yaml recipes/digits_mlp-*.yaml
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks._common import KFAC_PHASES, KfacSplit, format_table, machine_line, median
from kfac_tune import training
from kfac_tune.compare import bind_recipe
from kfac_tune.catalog import build_optimizer
from kfac_tune.recipes import load_recipe


def arm(config: Path, path: Path) -> dict:
    """One recipe bound to the workload: its model, optimizer (K-FAC profiled), batch stream and step."""
    recipe = load_recipe(path)
    cfg, hparams, problem = bind_recipe(config, recipe, path)
    data = training.load_data(cfg)
    task, loss_name = training.task_and_loss(cfg)
    loss_fn = training.loss_function(loss_name)
    torch.manual_seed(cfg.training.seed)
    model = training.make_model(cfg, data)
    extra = {"profile": True} if recipe.optimizer == "kfac" else {}
    opt = build_optimizer(recipe.optimizer, model, {**hparams, **extra}, loss=loss_name)
    x = data.train_x
    target = data.train_y if task == "classification" else x.flatten(1)
    batch, generator = cfg.data.batch_size, torch.Generator().manual_seed(cfg.training.seed)
    split = KfacSplit(opt, torch.device("cpu")) if recipe.optimizer == "kfac" else None

    def step() -> None:
        index = torch.randint(len(x), (batch,), generator=generator)
        xb, tb = x[index], target[index]

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), tb)
            loss.backward()
            return loss

        opt.step(split.timed(closure) if split else closure)

    return {"label": path.stem, "optimizer": recipe.optimizer, "batch": batch, "step": step, "split": split,
            "rounds": [], "hp": recipe.hyperparameters}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("recipes", type=Path, nargs="+")
    parser.add_argument("--round", type=int, default=20, help="steps per arm per round")
    parser.add_argument("--reps", type=int, default=5, help="timed rounds (after one warm-up round)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    arms = [arm(args.config, path) for path in args.recipes]
    for rep in range(args.reps + 1):
        order = arms if rep % 2 == 0 else arms[::-1]
        for a in order:
            if rep == 1 and a["split"]:
                a["split"].reset()
            start = time.perf_counter()
            for _ in range(args.round):
                before = time.perf_counter()
                a["step"]()
                if a["split"]:
                    a["split"].record_step(time.perf_counter() - before)
            if rep:
                a["rounds"].append((time.perf_counter() - start) / args.round)
    adam = next((a for a in arms if a["optimizer"] == "adam"), None)
    rows = []
    for a in arms:
        ratio = median(r / q for r, q in zip(a["rounds"], adam["rounds"])) if adam else float("nan")
        rows.append([a["label"], a["batch"], median(a["rounds"]) * 1e3, ratio])
    print(machine_line(torch.device("cpu")))
    print(f"{args.config}: {args.reps} rounds of {args.round} steps per arm, interleaved")
    print(format_table(["recipe", "batch", "ms / step (median)", "x adam (same round)"], rows))
    for a in arms:
        if a["split"]:
            per = a["split"].per_step()
            hp = a["hp"]
            mode = "automatic" if hp.get("adaptive_lr") else "fixed"
            print(f"\n{a['label']} ({mode}, inv_update_freq {hp.get('inv_update_freq')}, cov_update_freq "
                  f"{hp.get('cov_update_freq')}, stat_fraction {hp.get('stat_fraction')}, batch {a['batch']}): "
                  "ms per step by phase")
            phases = [*KFAC_PHASES, "other", "total"]
            print(format_table(phases, [[per[p] * 1e3 for p in phases]]))


if __name__ == "__main__":
    main()
