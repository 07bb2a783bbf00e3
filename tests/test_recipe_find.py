"""``kfac-tune recipe find`` ranks recipes by closeness to a model; ``search --warm-start`` enqueues the closest."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from kfac_tune.cli import cli
from kfac_tune.recipes import find_recipes, load_recipe, signature_distance
from tests.search_support import load_study, recipe_for, write_config

KFAC_POINT = {"lr": 0.03, "damping": 2e-2, "momentum": 0.5, "factor_decay": 0.95, "inv_update_freq": 5}


@pytest.fixture()
def library(tmp_path: Path) -> tuple[Path, Path]:
    """A recipes directory holding an exact, a same-name, a foreign-architecture, an Adam recipe and junk."""
    config = write_config(tmp_path)  # mlp, hidden [32], digits
    shelf = tmp_path / "shelf"
    recipe_for(config, "kfac", KFAC_POINT, shelf / "exact.yaml")
    recipe_for(write_config(tmp_path, "wide.yaml", model={"name": "mlp", "kwargs": {"hidden": [64]}}), "kfac",
               {**KFAC_POINT, "lr": 0.1}, shelf / "wider.yaml")
    recipe_for(write_config(tmp_path, "ae.yaml", model={"name": "autoencoder", "kwargs": {"widths": [32]}}),
               "kfac", KFAC_POINT, shelf / "autoencoder.yaml")
    recipe_for(config, "adam", {"lr": 1e-3}, shelf / "adam.yaml")
    (shelf / "notes.yaml").write_text("just: notes\n")
    return config, shelf


def test_signature_distance_counts_width_ratios() -> None:
    def mlp(hidden: int) -> dict:
        return {"layers": [{"type": "Linear", "weight_shape": [hidden, 64]},
                           {"type": "Linear", "weight_shape": [10, hidden]}]}

    assert signature_distance(mlp(32), mlp(32)) == 0
    assert signature_distance(mlp(32), mlp(64)) == pytest.approx(2.0)  # one doubled dimension in each layer
    conv = {"layers": [{"type": "Conv2d", "weight_shape": [32, 1, 3, 3]}]}
    assert signature_distance(mlp(32), conv) == pytest.approx(10.0 + 10.0)  # other type + a missing layer


def test_find_ranks_exact_then_same_name_then_nearest(library: tuple[Path, Path]) -> None:
    _, shelf = library
    exact = load_recipe(shelf / "exact.yaml")
    matches = find_recipes("mlp", exact.provenance.signature, "kfac", [shelf], dataset="digits")
    assert [(m.path.name, m.kind) for m in matches] == [
        ("exact.yaml", "exact"), ("wider.yaml", "architecture"), ("autoencoder.yaml", "nearest")]
    assert matches[0].distance == 0 and matches[1].distance > 0
    assert [m.path.name for m in find_recipes("mlp", exact.provenance.signature, "adam", [shelf])] == ["adam.yaml"]


def test_recipe_find_cli(library: tuple[Path, Path]) -> None:
    config, shelf = library
    result = CliRunner().invoke(cli, ["recipe", "find", str(config), "--recipes-dir", str(shelf), "-n", "2",
                                      "-f", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(Path(r["path"]).name, r["match"]) for r in rows] == [("exact.yaml", "exact"),
                                                                  ("wider.yaml", "architecture")]


def test_warm_start_enqueues_the_closest_recipe_first(library: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    _, shelf = library
    monkeypatch.chdir(tmp_path)
    narrow = {"damping": {"low": 1e-3, "high": 1e-2, "log": True}}
    config = write_config(tmp_path, search={"trials": 2, "space": narrow}, optimizer="kfac")
    result = CliRunner(env={"COLUMNS": "200"}).invoke(
        cli, ["search", str(config), "--warm-start", "--recipes-dir", str(shelf), "-o", str(tmp_path / "best.yaml")])
    assert result.exit_code == 0, result.output
    assert "warm start: shelf/exact.yaml (same architecture and signature" in result.output
    first, second = load_study(f"sqlite:///{tmp_path / 'study.db'}", "model").trials[:2]
    assert first.user_attrs["warm_start_recipe"] == str(shelf / "exact.yaml")
    # the recipe's values (its 2e-2 damping moved into this space) in its mode; knobs it does not name are sampled
    assert {k: first.params[k] for k in KFAC_POINT} == {**KFAC_POINT, "damping": 1e-2}
    assert first.params["mode"] == "fixed"
    assert second.params["mode"] == "automatic"  # then the published defaults (K-FAC's automatic mode), as cold


def test_warm_start_path_must_be_a_recipe_for_the_searched_optimizer(library: tuple[Path, Path],
                                                                     tmp_path: Path) -> None:
    _, shelf = library
    config = write_config(tmp_path, "warm.yaml", optimizer="kfac", search={"warm_start": str(shelf / "adam.yaml")})
    result = CliRunner().invoke(cli, ["search", str(config), "--no-tracking"])
    assert result.exit_code == 2 and "search.warm_start: expected a recipe for kfac" in result.output
