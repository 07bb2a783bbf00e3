"""The recipes shipped in ``recipes/`` are real: each validates, belongs to its example, and the cheap ones
reproduce their recorded value.

Every shipped recipe is ``recipes/<example stem>-<optimizer>.yaml``, the best trial of a ``kfac-tune search`` of
``examples/<example stem>.yaml``. For each one this checks that it loads and validates, that the example still
defines the same objective (the config hash the study recorded), the same architecture signature and the same
training settings, so a shipped recipe cannot silently drift from the file it claims to be tuned for.

Cheap workloads (digits: seconds) are trained again with the recipe (a recipe tuned under a seconds budget for
the steps its trial reached, since the clock is not reproducible but the steps are), and the value is judged
against what the code computes on this machine, never against one machine's float32 bits:

* retrained twice with the same seed, the value and curves are bit-identical here (one thread, seeded data);
* float32 reductions are ordered differently on another CPU or BLAS build, and 300 steps of training amplify
  last-bit differences: the test measures that amplification here, by retraining with the initial weights
  perturbed by one part in 2^24 (float32 rounding), and accepts the recorded value within three times the
  spread of those runs around them, or 10 % (a few perturbed runs can all land in one mode of a two-mode
  outcome: digits_autoencoder-adam gave 0.0390 unperturbed and 0.0371-0.0376 under four perturbations);
* the recipe must still work: every run ends below half the test loss of the untrained model (same seed, same
  data), so a broken optimizer or recipe fails however the tolerance comes out.

The Fashion-MNIST recipes take minutes to train on a CPU, so for them only loading and the architecture match are
checked here (``kfac-tune compare`` reruns them; see the README).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from kfac_tune import problem, training
from kfac_tune.catalog import loss_function
from kfac_tune.compare import bind_recipe
from kfac_tune.config import load_config
from kfac_tune.recipes import load_recipe
from kfac_tune.training import train
from kfac_tune.zoo.data import DEBIAN_FASHION_MNIST
from tests.search_support import REPO

SHIPPED = sorted((REPO / "recipes").glob("*-*.yaml"))
CHEAP_DATASETS = ("digits",)


def example_of(path: Path) -> Path:
    return REPO / "examples" / f"{path.stem.rsplit('-', 1)[0]}.yaml"


def test_every_workload_ships_kfac_and_adam() -> None:
    stems = {path.stem for path in SHIPPED}
    assert {"digits_mlp-kfac", "digits_mlp-adam", "digits_autoencoder-kfac", "digits_autoencoder-adam"} <= stems
    for stem in stems:
        workload = stem.rsplit("-", 1)[0]
        assert {f"{workload}-kfac", f"{workload}-adam"} <= stems, f"{stem} has no partner recipe"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_recipe_belongs_to_its_example(path: Path) -> None:
    recipe = load_recipe(path)
    example = example_of(path)
    assert example.exists(), f"{path.name}: no example {example.name}"
    assert path.stem.endswith(f"-{recipe.optimizer}")
    if recipe.training.dataset == "fashion_mnist" and not DEBIAN_FASHION_MNIST.exists():
        pytest.skip("needs Debian's dataset-fashion-mnist files")
    cfg, _, problem = bind_recipe(example, recipe, path)  # raises if the architecture or the loss differ
    searched = load_config(example, {"optimizer.name": recipe.optimizer})
    assert searched.fingerprint() == recipe.provenance.config_hash, f"{example.name} changed since {path.name}"
    assert (recipe.training.dataset, recipe.training.batch_size, recipe.training.loss) == (
        cfg.data.name, cfg.data.batch_size, problem.loss)
    if cfg.training.budget is None:
        assert recipe.training.steps == problem.steps
    else:  # a seconds budget: the steps the trial reached, within the cap
        assert 1 <= recipe.training.steps <= problem.steps
    assert recipe.result.trials >= 10 and math.isfinite(recipe.result.value)


CHEAP = [p for p in SHIPPED if load_recipe(p).training.dataset in CHEAP_DATASETS]
PERTURBATIONS = 3
ULP_SCALE = 2.0**-24  # float32's relative rounding error
SPREADS = 3.0
REL_FLOOR = 0.10


def _perturbed(make_model: Callable[..., nn.Module], seed: int) -> Callable[..., nn.Module]:
    """``make_model`` whose initial weights are multiplied by ``1 + 2^-24 * N(0, 1)``: what another CPU's rounding
    does to a run, injected at the start."""

    def make(cfg: Any, data: Any) -> nn.Module:
        model = make_model(cfg, data)
        noise = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(1 + ULP_SCALE * torch.randn(parameter.shape, generator=noise))
        return model

    return make


def _metrics(result: training.TrainResult) -> list[dict[str, float]]:
    """The curves without the clock."""
    return [{k: v for k, v in point.items() if k not in ("step_time", "train_seconds")} for point in result.curves]


def _untrained_loss(cfg: Any) -> float:
    """The test loss of the model as ``train`` initialises it, before any step."""
    data = problem.load_data(cfg)
    torch.manual_seed(cfg.training.seed)
    model = problem.make_model(cfg, data)
    task, loss = problem.task_and_loss(cfg)
    target = data.test_y if task == "classification" else data.test_x.flatten(1)
    with torch.no_grad():
        return loss_function(loss)(model(data.test_x), target).item()


@pytest.mark.slow
@pytest.mark.parametrize("path", CHEAP, ids=[p.stem for p in CHEAP])
def test_cheap_recipe_reaches_its_recorded_value(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = load_recipe(path)
    cfg, hparams, _ = bind_recipe(example_of(path), recipe, path)
    assert cfg.training.seed == recipe.training.seed
    if cfg.training.budget is not None:
        # a seconds budget ends wherever the clock does; the recorded value is that of the steps the trial reached,
        # and training is deterministic in steps, so retrain exactly those steps (evaluated by steps, not clock)
        cfg = cfg.model_copy(update={"training": cfg.training.model_copy(
            update={"budget": None, "steps": recipe.training.steps, "eval_seconds": None})})
    retrained, again = train(cfg, hparams), train(cfg, hparams)
    assert _metrics(again) == _metrics(retrained), "training is not deterministic on this machine"
    untrained = _untrained_loss(cfg)

    values = [retrained.value]
    for seed in range(PERTURBATIONS):
        with monkeypatch.context() as patch:
            patch.setattr(training, "make_model", _perturbed(training.make_model, seed))
            values.append(train(cfg, hparams).value)
    assert max(values) < 0.5 * untrained, ("the recipe no longer trains", values, untrained)
    tolerance = max(SPREADS * (max(values) - min(values)), REL_FLOOR * abs(recipe.result.value))
    assert min(values) - tolerance <= recipe.result.value <= max(values) + tolerance, (
        path.name, recipe.result.value, values, tolerance)
