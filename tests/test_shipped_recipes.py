"""The recipes shipped in ``recipes/`` are real: each validates, belongs to its example, and the cheap ones
reproduce their recorded value.

Every shipped recipe is ``recipes/<example stem>-<optimizer>.yaml``, the best trial of a ``kfac-tune search`` of
``examples/<example stem>.yaml``. For each one this checks that it loads and validates, that the example still
defines the same objective (the config hash the study recorded), the same architecture signature and the same
training settings, so a shipped recipe cannot silently drift from the file it claims to be tuned for.

Cheap workloads (digits: a few seconds) are trained again with the recipe and must reach its recorded value.
Same seed, same data, one thread: on the machine that ran the search the value comes back to the last bit.
The tolerance, a relative 5 %, is for other machines: a different CPU or BLAS build (AVX2 vs AVX-512, MKL vs
OpenBLAS) orders float32 reductions differently, and 200-300 steps of training (K-FAC's eigendecompositions
included) turn last-bit differences into visible ones; a recipe that no longer works (wrong hyperparameters, a
changed default, a broken optimizer) is off by far more than that. The Fashion-MNIST recipes take minutes to
train on a CPU, so for them only loading and the architecture match are checked here (``kfac-tune compare``
reruns them; see the README).
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from kfac_tune.compare import bind_recipe
from kfac_tune.config import load_config
from kfac_tune.recipes import load_recipe
from kfac_tune.training import train
from kfac_tune.zoo.data import DEBIAN_FASHION_MNIST
from tests.search_support import REPO

SHIPPED = sorted((REPO / "recipes").glob("*-*.yaml"))
CHEAP_DATASETS = ("digits",)
REL_TOLERANCE = 0.05


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
    assert (recipe.training.dataset, recipe.training.batch_size, recipe.training.steps, recipe.training.loss) == (
        cfg.data.name, cfg.data.batch_size, problem.steps, problem.loss)
    assert recipe.result.trials >= 10 and math.isfinite(recipe.result.value)


CHEAP = [p for p in SHIPPED if load_recipe(p).training.dataset in CHEAP_DATASETS]


@pytest.mark.slow
@pytest.mark.parametrize("path", CHEAP, ids=[p.stem for p in CHEAP])
def test_cheap_recipe_reaches_its_recorded_value(path: Path) -> None:
    recipe = load_recipe(path)
    cfg, hparams, _ = bind_recipe(example_of(path), recipe, path)
    assert cfg.training.seed == recipe.training.seed
    result = train(cfg, hparams)
    recorded = recipe.result.value
    assert result.value == pytest.approx(recorded, rel=REL_TOLERANCE), (path.name, result.value, recorded)
