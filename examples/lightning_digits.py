"""K-FAC inside PyTorch Lightning, with hyperparameters from a kfac-tune recipe: copy this file and adapt it.

    pip install "kfac-tune[lightning]"
    python examples/lightning_digits.py --recipe recipes/digits_mlp-kfac.yaml --steps 300

What matters for K-FAC (the rest is ordinary Lightning):

* ``configure_optimizers`` builds K-FAC on the network whose output the loss is computed from (``self.net``): K-FAC
  hooks that module's forward pass to collect its curvature statistics, and a recipe's architecture check compares
  that network with the one the recipe was tuned on.
* Keep Lightning's automatic optimization: Lightning calls ``optimizer.step(closure)``, and K-FAC runs the closure
  (``training_step`` + ``backward``) itself. Its adaptive modes (``adaptive_damping``) call the closure once more
  after the update to measure the loss change, so the step's ``train_loss`` is then logged twice per step.
* ``precision="16-mixed"`` steps through a ``GradScaler``, which cannot pass a closure: use ``"bf16-mixed"`` or
  ``32`` with the adaptive modes. ``gradient_clip_val`` clips the raw gradient before preconditioning; K-FAC's own
  ``kl_clip`` (a recipe hyperparameter) is the step-size guard it was tuned with.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kfac_tune import optimizer_from_recipe
from kfac_tune.optim import KFAC


def digits_loaders(batch_size: int = 128, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """scikit-learn's 8x8 digits (offline), pixels scaled to [0, 1], split 80/20 by a seeded permutation."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = round(0.2 * len(y))
    train, test = order[:-n_test], order[-n_test:]
    shuffle = torch.Generator().manual_seed(seed)
    return (DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True, generator=shuffle),
            DataLoader(TensorDataset(x[test], y[test]), batch_size=len(test)))


class DigitsClassifier(pl.LightningModule):
    """The MLP of ``examples/digits_mlp.yaml`` (64-64-64-10), trained with K-FAC.

    ``recipe``: a recipe YAML from ``kfac-tune export``/``search``; without one, ``kfac_options`` (or K-FAC's
    defaults) are used. ``kfac_options`` also override single recipe values (``{"adaptive_damping": True}``).
    """

    def __init__(self, recipe: str | Path | None = None, **kfac_options: Any) -> None:
        super().__init__()
        self.recipe, self.kfac_options = recipe, kfac_options
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                 nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_accuracy", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> KFAC:
        if self.recipe is not None:
            return optimizer_from_recipe(self.net, self.recipe, **self.kfac_options)
        return KFAC(self.net, **{"loss": "cross_entropy", **self.kfac_options})


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, help="recipe YAML (e.g. recipes/digits_mlp-kfac.yaml)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--root", type=Path, default=Path("lightning_logs"), help="Lightning's output directory")
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    train_loader, val_loader = digits_loaders(args.batch_size)
    model = DigitsClassifier(args.recipe)
    trainer = pl.Trainer(max_steps=args.steps, val_check_interval=50, check_val_every_n_epoch=None,
                         default_root_dir=args.root, accelerator="auto", devices=1, enable_model_summary=False)
    trainer.fit(model, train_loader, val_loader)
    return {key: float(value) for key, value in trainer.callback_metrics.items()}


if __name__ == "__main__":
    print(main())
