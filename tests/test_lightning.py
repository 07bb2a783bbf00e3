"""examples/lightning_digits.py, run for real: K-FAC under Lightning's closure-based automatic optimization.

Real digits, a few dozen steps on the CPU, no logger or checkpoints. What must hold: the loss falls, K-FAC took
every step with curvature it collected itself (factors filled and decomposed), a recipe's values are the ones in
use, and the adaptive modes get the closure they re-evaluate.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "digits_mlp-kfac.yaml"
STEPS = 40


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lightning_digits", ROOT / "examples" / "lightning_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny nets run best on one thread


def _fit(example: ModuleType, tmp_path: Path, model: pl.LightningModule) -> tuple[float, float, torch.optim.Optimizer]:
    """Train ``STEPS`` steps; the mean training-set loss before and after, and the optimizer Lightning stepped."""
    pl.seed_everything(0, verbose=False)
    train_loader, _ = example.digits_loaders(batch_size=128)
    before = _mean_loss(model, train_loader)
    trainer = pl.Trainer(max_steps=STEPS, logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
                         accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, train_loader)
    return before, _mean_loss(model, train_loader), trainer.optimizers[0]


def _mean_loss(model: pl.LightningModule, loader: torch.utils.data.DataLoader) -> float:
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(model(x), y, reduction="sum") for x, y in loader]
    return float(sum(losses)) / len(loader.dataset)


def _assert_curvature_used(optimizer: torch.optim.Optimizer) -> None:
    from kfac_tune.optim import KFAC

    assert isinstance(optimizer, KFAC)
    assert optimizer.state_dict()["kfac"]["steps"] == STEPS, "Lightning did not step K-FAC once per batch"
    assert len(optimizer.layers) == 3
    for name, (_, block) in optimizer.layers.items():
        assert block.has_statistics, f"layer {name}: no curvature statistics were collected"
        assert float(block.A.abs().sum()) > 0 and float(block.G.abs().sum()) > 0, name
        assert block.QA is not None and block.QG is not None, f"layer {name}: factors never decomposed"


def test_recipe_in_configure_optimizers(example: ModuleType, tmp_path: Path) -> None:
    from kfac_tune.recipes import load_recipe

    before, after, optimizer = _fit(example, tmp_path, example.DigitsClassifier(RECIPE))
    _assert_curvature_used(optimizer)
    tuned = load_recipe(RECIPE).hyperparameters
    group = optimizer.defaults  # the constructor's values: in automatic mode the param group's own ones adapt
    assert (group["lr"], group["damping"], group["momentum"]) == (tuned["lr"], tuned["damping"], tuned["momentum"])
    assert after < 0.5 * before, f"training-set loss {before:.4f} -> {after:.4f}"


def test_adaptive_damping_gets_lightnings_closure(example: ModuleType, tmp_path: Path) -> None:
    """Levenberg-Marquardt damping re-evaluates the loss through the closure Lightning passes to step()."""
    from kfac_tune.recipes import load_recipe

    model = example.DigitsClassifier(RECIPE, adaptive_damping=True, damping_adaptation_interval=2)
    before, after, optimizer = _fit(example, tmp_path, model)
    _assert_curvature_used(optimizer)
    assert math.isfinite(optimizer.last_rho), "the damping rule never compared the re-evaluated loss"
    assert optimizer.param_groups[0]["damping"] != load_recipe(RECIPE).hyperparameters["damping"], "never adapted"
    assert after < 0.5 * before, f"training-set loss {before:.4f} -> {after:.4f}"

