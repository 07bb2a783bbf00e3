"""The baselines a practitioner would pick today (AdamW, Muon, SOAP, Lion) through the whole tool, and the catalog as the
one place optimizer and loss names come from.

Each baseline runs the user's route: ``search`` (real SQLite study, two real trials on scikit-learn's digits) ->
``export`` -> ``train --recipe`` (the CLI in a subprocess), and the recipe is rebuilt with
``kfac_tune.optimizer_from_recipe``. Muon's parameter split is checked on a network that has every kind of
parameter the rule names.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from kfac_tune import catalog, optimizer_from_recipe
from kfac_tune.muon import MuonWithAdamW, split_parameters
from kfac_tune.catalog import build_optimizer
from kfac_tune.recipes import RecipeError, load_recipe
from kfac_tune.optim import KFAC
from kfac_tune.search.space import clip, default_space
from kfac_tune.zoo import build_model
from tests.search_support import cli, load_study, recipe_for, write_config

BASELINES = ("adamw", "muon", "soap", "lion")


def settings(opt: Any) -> list[dict[str, Any]]:
    """Every parameter group's constructor settings (the tensors left out), for comparing two optimizers."""
    return [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]


# ------------------------------------------------------------------------------------------------ the user's route


@pytest.mark.slow
@pytest.mark.parametrize("name", BASELINES)
def test_baseline_search_export_train_and_rebuild(tmp_path: Path, name: str) -> None:
    config = write_config(tmp_path, optimizer=name, search={"trials": 2})
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    searched = cli("search", str(config), "--no-tracking", "-o", str(tmp_path / "unused.yaml"), cwd=tmp_path)
    assert searched.returncode == 0, searched.stderr

    study = load_study(storage, "model")
    assert study.user_attrs["optimizer"] == name
    first = min(study.trials, key=lambda t: t.number)
    assert first.params == pytest.approx(catalog.optimizer(name).default_point), "the published defaults run first"
    completed = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert completed and all(t.value < math.log(10) for t in completed), "better than an untrained 10-class model"

    exported = cli("export", "--storage", storage, "--study", "model", "-o", str(tmp_path / "best.yaml"), cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    recipe = load_recipe(tmp_path / "best.yaml")
    assert recipe.optimizer == name and recipe.result.value == study.best_value
    trained = cli("train", str(config), "--recipe", str(tmp_path / "best.yaml"), "-f", "json", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert json.loads(trained.stdout)["value"] == pytest.approx(recipe.result.value, rel=1e-5)

    # round trip: the recipe rebuilds the optimizer the best trial ran, argument for argument
    model = build_model("mlp", input_shape=(64,), num_classes=10, hidden=[32])
    run = build_optimizer(name, model, study.best_trial.user_attrs["hyperparameters"], loss="cross_entropy")
    rebuilt = optimizer_from_recipe(model, tmp_path / "best.yaml")
    assert settings(rebuilt) == settings(run)
    assert rebuilt.param_groups[0]["lr"] == recipe.hyperparameters["lr"]
    if name == "muon":
        groups = recipe.parameter_groups
        assert groups == split_parameters(model).describe() and groups["rule"].startswith("muon: every 2-D weight")
        assert groups["muon"] == {"tensors": 1, "elements": 64 * 32}  # the one hidden matrix
        assert groups["adamw"] == {"tensors": 3, "elements": 32 + 32 * 10 + 10}  # its bias, the output layer
        assert rebuilt.optimizers["adamw"].param_groups[0]["lr"] == recipe.hyperparameters["adamw_lr"]
    else:
        assert recipe.parameter_groups is None


@pytest.mark.slow
def test_compare_puts_the_baselines_beside_kfac(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    kfac = {k: v for k, v in KFAC.complete_arguments({}).items() if k in KFAC.HYPERPARAMETERS}  # K-FAC untuned
    paths = [recipe_for(config, name, dict(kfac if name == "kfac" else catalog.optimizer(name).default_point),
                        tmp_path / f"{name}.yaml")
             for name in ("kfac", *BASELINES)]
    result = cli("compare", str(config), "--recipes", *map(str, paths), "--seeds", "2", "--no-tracking", "-f", "json",
                 "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    table = json.loads(result.stdout)
    rows = {row["optimizer"]: row for row in table["recipes"]}
    assert set(rows) == {"kfac", *BASELINES}
    for row in rows.values():  # every recipe reaches the common target on every seed it kept
        assert row["seeds"] + row["diverged"] == 2
        if row["seeds"]:
            assert row["final"]["mean"] < math.log(10) and row["steps_to_target"] is not None


# ------------------------------------------------------------------------------------------------ Muon's split


class EveryKind(nn.Module):
    """Biases, a norm, an embedding, a convolution, a weight-normalised layer and an output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.hidden = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.normalised = nn.utils.parametrizations.weight_norm(nn.Linear(16, 16))
        self.out = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.embed(x).transpose(1, 2)).mean(-1)
        return self.out(self.normalised(self.norm(self.hidden(h)).relu()))


def test_muon_takes_every_hidden_matrix_and_adamw_everything_else() -> None:
    torch.manual_seed(0)
    model = EveryKind()
    split = split_parameters(model)
    hidden_matrices = {"hidden.weight", "normalised.parametrizations.weight.original1"}  # the direction, not the gain
    assert {name for name, _ in split.muon} == hidden_matrices
    assert {name for name, _ in split.adamw} == {name for name, _ in model.named_parameters()} - hidden_matrices
    assert split.output_layer == "out"

    opt = build_optimizer("muon", model, {"lr": 0.02, "adamw_lr": 1e-3}, loss="cross_entropy")
    assert isinstance(opt, MuonWithAdamW)
    under = {kind: {id(p) for group in o.param_groups for p in group["params"]} for kind, o in opt.optimizers.items()}
    assert under["muon"] == {id(p) for _, p in split.muon} and under["adamw"] == {id(p) for _, p in split.adamw}
    assert isinstance(opt.optimizers["muon"], torch.optim.Muon)
    assert isinstance(opt.optimizers["adamw"], torch.optim.AdamW)

    x, y = torch.randint(0, 10, (64, 6)), torch.randint(0, 5, (64,))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    losses = [float(opt.step(closure).detach()) for _ in range(20)]
    assert losses[-1] < losses[0]
    assert all(not torch.equal(before[name], p) for name, p in model.named_parameters()), "every tensor is trained"


def test_muon_split_of_the_language_model_keeps_embedding_and_decoder_on_adamw() -> None:
    model = build_model("lstm_lm", input_shape=(12,), num_classes=30, embedding=8, hidden=16, layers=1)
    split = split_parameters(model)
    assert {name for name, _ in split.muon} == {"rnn.layers.0.ih.weight", "rnn.layers.0.hh.weight"}
    assert split.output_layer == "decoder"
    assert {name for name, _ in split.adamw} == {"embed.weight", "rnn.layers.0.ih.bias", "rnn.layers.0.hh.bias",
                                                 "decoder.weight", "decoder.bias"}


# ------------------------------------------------------------------------------------------------ the catalog


def test_catalog_is_where_the_names_come_from(tmp_path: Path) -> None:
    from kfac_tune.cli import find, search
    from kfac_tune.config import ConfigError, load_config
    from kfac_tune.optim.fisher import LOSSES as FISHER_LOSSES
    from kfac_tune.zoo import ARCHITECTURES

    for command in (search, find):
        (option,) = [p for p in command.params if p.name == "optimizer"]
        assert tuple(option.type.choices) == catalog.OPTIMIZER_NAMES
    for name, spec in catalog.OPTIMIZERS.items():
        space = default_space(spec)  # every entry's space validates as a YAML search.space would
        if isinstance(spec.default_point, str):  # K-FAC's: its constructor's defaults (tests/test_search_space.py)
            continue
        assert set(space) <= set(spec.hyperparameters), name
        assert {k: clip(space[k], v) for k, v in spec.default_point.items()} == spec.default_point, name
    assert catalog.hyperparameter_names("kfac") == tuple(KFAC.HYPERPARAMETERS)
    assert set(catalog.LOSS_NAMES) == set(FISHER_LOSSES)
    assert {spec.default_loss for spec in ARCHITECTURES.values()} <= set(catalog.LOSS_NAMES)

    path = tmp_path / "model.yaml"
    path.write_text("optimizer: adagrad\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "optimizer.name" in message and all(name in message for name in catalog.OPTIMIZER_NAMES)
    path.write_text("training: {loss: huber}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "training.loss" in str(error.value) and all(name in str(error.value) for name in catalog.LOSS_NAMES)


def test_a_recipe_for_an_unknown_optimizer_is_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    path = recipe_for(config, "adamw", dict(catalog.optimizer("adamw").default_point), tmp_path / "adamw.yaml")
    path.write_text(path.read_text().replace("optimizer: adamw", "optimizer: adagrad"))
    with pytest.raises(RecipeError, match="optimizer.*unknown optimizer 'adagrad'; known: kfac, adam, sgd, adamw, muon, soap, lion"):
        load_recipe(path)


def test_validating_the_optimizer_section_imports_no_optimizer_package() -> None:
    import subprocess
    import sys

    code = ("import sys; from kfac_tune.config import OptimizerConfig; "
            "OptimizerConfig.model_validate({'name': 'soap'}); "
            "print(sorted({'torch', 'heavyball'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"
