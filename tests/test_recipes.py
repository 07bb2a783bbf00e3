"""Recipes: round trip, atomic writes that never damage the previous file, clear errors for bad files."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kfac_tune.recipes import Recipe, RecipeError, check_architecture, load_recipe, save_recipe

SIGNATURE = {"layers": [{"path": "1", "type": "Linear", "weight_shape": [32, 64], "bias": True}], "hash": "abc123"}


def make_recipe(value: float = 0.25, **hyperparameters: object) -> Recipe:
    return Recipe.model_validate({
        "architecture": "mlp",
        "optimizer": "kfac",
        "hyperparameters": {"lr": 0.05, "damping": 3e-3, "inv_update_freq": 10, "loss": "cross_entropy",
                            **hyperparameters},
        "training": {"dataset": "digits", "batch_size": 64, "steps": 100, "loss": "cross_entropy",
                     "metric": "eval_loss", "seed": 0},
        "result": {"metric": "eval_loss", "value": value, "direction": "minimize", "trials": 12},
        "provenance": {"study": "s", "trial": 7, "mlflow_run_id": None, "config_hash": "f00", "architecture": "mlp",
                       "signature": SIGNATURE, "device": "cpu", "date": "2026-11-23T10:00:00+00:00",
                       "versions": {"torch": "2.14.1"}},
    })


def test_round_trip(tmp_path: Path) -> None:
    recipe = make_recipe()
    path = save_recipe(recipe, tmp_path / "recipes" / "mlp.yaml")
    assert load_recipe(path) == recipe
    assert path.read_text().startswith("# kfac-tune recipe")
    assert recipe.optimizer == "kfac" and recipe.hyperparameters["lr"] == 0.05
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_keeps_old_file(tmp_path: Path) -> None:
    path = save_recipe(make_recipe(0.5), tmp_path / "mlp.yaml")
    before = path.read_bytes()
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(RecipeError, match="unchanged"):
            save_recipe(make_recipe(0.1), path)
    finally:
        tmp_path.chmod(0o700)
    assert path.read_bytes() == before


@pytest.mark.parametrize("interruption", [OSError(18, "Invalid cross-device link"), KeyboardInterrupt()],
                         ids=["rename fails", "ctrl-c at rename"])
def test_target_that_cannot_be_replaced_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       interruption: BaseException) -> None:
    """The rename fails (or Ctrl-C lands) after the temp file was written: the temp file must go, the old file
    stay. The fault is injected at ``os.replace``, the one call between a complete temp file and the new name."""
    import kfac_tune.files

    path = save_recipe(make_recipe(0.5), tmp_path / "mlp.yaml")
    before = path.read_bytes()

    def blocked(*args: object) -> None:
        raise interruption

    monkeypatch.setattr(kfac_tune.files.os, "replace", blocked)
    with pytest.raises(RecipeError if isinstance(interruption, OSError) else KeyboardInterrupt):
        save_recipe(make_recipe(0.1), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.yaml"]


def test_unserialisable_recipe_never_touches_the_file(tmp_path: Path) -> None:
    path = save_recipe(make_recipe(0.5), tmp_path / "mlp.yaml")
    before = path.read_bytes()
    recipe = make_recipe(0.1)  # validation refuses such a value; model_copy does not validate, YAML cannot dump it
    broken = recipe.model_copy(update={"hyperparameters": {**recipe.hyperparameters, "fisher": object()}})
    with pytest.raises(RecipeError, match="cannot serialise"):
        save_recipe(broken, path)
    assert path.read_bytes() == before


@pytest.mark.parametrize("text, match", [
    ("", "expected a mapping"),
    ("architecture: mlp\noptimizer: kfac\nhyperparameters: {lr: 0.1", "valid YAML"),
    ("architecture: mlp\noptimizer: kfac\n", "incomplete"),
    ("- 1\n- 2\n", "expected a mapping"),
    ("\x00\x01binary", "valid YAML"),
])
def test_corrupt_or_partial_file(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=match):
        load_recipe(path)


def test_truncated_recipe_is_rejected(tmp_path: Path) -> None:
    full = save_recipe(make_recipe(), tmp_path / "full.yaml").read_text()
    for cut in range(40, len(full), max(len(full) // 15, 1)):
        path = tmp_path / "cut.yaml"
        path.write_text(full[:cut])
        with pytest.raises(RecipeError):
            load_recipe(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="cannot read"):
        load_recipe(tmp_path / "nope.yaml")


def test_architecture_mismatch_names_both() -> None:
    recipe = make_recipe()
    with pytest.raises(RecipeError, match="'mlp'.*'convnet'"):
        check_architecture(recipe, "convnet", SIGNATURE)
    wider = {"layers": [{"path": "1", "type": "Linear", "weight_shape": [128, 64], "bias": True}], "hash": "zzz"}
    with pytest.raises(RecipeError, match=r"32x64.*128x64"):
        check_architecture(recipe, "mlp", wider)
    check_architecture(recipe, "mlp", SIGNATURE)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(max_size=300), st.recursive(
    st.one_of(st.none(), st.booleans(), st.floats(), st.integers(), st.text(max_size=10)),
    lambda inner: st.dictionaries(st.sampled_from(["architecture", "optimizer", "hyperparameters", "training",
                                                   "result", "provenance", "lr", "value"]), inner, max_size=6),
    max_leaves=15).map(yaml.safe_dump)))
def test_load_recipe_raises_only_recipe_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_recipe(path)
    except RecipeError as error:
        assert str(path) in str(error)
