"""Selection on a validation split: held out of the training data (seeded), never the test split.

The central check poisons the test split (random labels, scrambled images) and runs the same search twice: if the
objective read the test split at all, some trial's value, and so TPE's later choices, would change. They must be
identical to the last bit, while the recipes' test values differ (the test split is measured, once, afterwards).
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from kfac_tune.cli import cli
from kfac_tune.config import load_config
from kfac_tune.recipes import load_recipe
from kfac_tune.problem import load_data, preflight
from kfac_tune.zoo import load_dataset
from kfac_tune.zoo.data import hold_out
from tests.search_support import load_study, tiny_config, write_config

DATA_MODULE = '''
import torch
from kfac_tune.zoo import load_dataset

def digits(poison=False, explicit_validation=False):
    d = load_dataset("digits")
    test_x, test_y = d.test_x, d.test_y
    if poison:  # garbage labels and images: an objective that reads them cannot give the same values
        g = torch.Generator().manual_seed(123)
        test_x = torch.rand(test_x.shape, generator=g)
        test_y = torch.randint(10, test_y.shape, generator=g)
    if explicit_validation:  # an explicit validation split: the last 200 training images
        return d.train_x[:-200], d.train_y[:-200], d.train_x[-200:], d.train_y[-200:], test_x, test_y
    return d.train_x, d.train_y, test_x, test_y
'''


def test_hold_out_is_a_seeded_disjoint_cut_of_the_training_data() -> None:
    bundle = load_dataset("digits")
    a, b, other = hold_out(bundle, 0.1, seed=0), hold_out(bundle, 0.1, seed=0), hold_out(bundle, 0.1, seed=1)
    assert len(a.val_x) == round(0.1 * len(bundle.train_x)) and len(a.train_x) + len(a.val_x) == len(bundle.train_x)
    assert torch.equal(a.val_x, b.val_x) and not torch.equal(a.val_x, other.val_x)
    rows = {tuple(x.flatten().tolist()) for x in bundle.train_x}
    train_rows = {tuple(x.flatten().tolist()) for x in a.train_x}
    assert all(tuple(x.flatten().tolist()) in rows - train_rows for x in a.val_x)  # from train, not kept there
    assert torch.equal(a.test_x, bundle.test_x)  # the test split is untouched
    assert hold_out(bundle, 0.0, seed=0) is bundle and hold_out(a, 0.5, seed=0) is a


def callable_config(directory: Path, **kwargs: object) -> Path:
    """A tiny search of the digits MLP whose data come from ``poisoned_data:digits(**kwargs)``."""
    config = tiny_config(directory, search={"trials": 5, "pruner": "none"})
    config["data"] = {"callable": "poisoned_data:digits", "kwargs": kwargs, "batch_size": 64}
    path = directory / "model.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture()
def data_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "poisoned_data.py").write_text(DATA_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))


def test_validation_sources(tmp_path: Path, data_module: None) -> None:
    data = load_data(load_config(callable_config(tmp_path, explicit_validation=True)))
    assert len(data.val_x) == 200 and len(data.train_x) == len(load_dataset("digits").train_x) - 200
    off = load_config(write_config(tmp_path, data={"validation": 0}))
    assert load_data(off).val_x is None and preflight(off, {}).split == "test"  # the old protocol, on request
    bulatov = load_config(write_config(tmp_path, model={"name": "autoencoder", "kwargs": {"widths": [16, 4]}},
                                       data={"name": "synthetic", "train_size": 300, "test_size": 100,
                                             "test_from_train": True, "validation": 0.2}))
    data = load_data(bulatov)
    assert (len(data.train_x), len(data.val_x), len(data.test_x)) == (240, 60, 100)


def search(directory: Path, poison: bool) -> tuple[list[tuple[dict, list[float] | None]], float]:
    directory.mkdir()
    config = callable_config(directory, poison=poison)
    result = CliRunner().invoke(cli, ["search", str(config), "--no-tracking", "-o", str(directory / "best.yaml")])
    assert result.exit_code == 0, result.output
    study = load_study(f"sqlite:///{directory / 'study.db'}", "model")
    recipe = load_recipe(directory / "best.yaml")
    assert recipe.result.split == "validation"
    return [(t.params, t.values) for t in study.trials], recipe.result.test_value


def test_the_objective_never_reads_the_test_split(tmp_path: Path, data_module: None,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    clean, clean_test = search(tmp_path / "clean", poison=False)
    poisoned, poisoned_test = search(tmp_path / "poisoned", poison=True)
    assert len(clean) == 5 and poisoned == clean  # same points, same values: nothing of the test split reached it
    assert math.isfinite(clean_test) and poisoned_test != clean_test  # the test split is measured, afterwards
