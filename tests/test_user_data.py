"""The data pipeline for your own data: a data callable given the settings it asks for, Datasets with transforms
through a DataLoader, augmentation of built-in data, and recipes checked against the network they are used on.

Real data (scikit-learn's digits, Fashion-MNIST from the Debian package), real training, the real CLI; the user's
package is written to a temporary directory outside the repository, as a user's would be.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch.utils.data import Subset

from kfac_tune import KFAC, optimizer_from_recipe
from kfac_tune.augment import Augmented
from kfac_tune.config import ConfigError, load_config
from kfac_tune.problem import load_data, preflight
from kfac_tune.recipes import RecipeError
from kfac_tune.training import train
from kfac_tune.userdata import DatasetBundle
from kfac_tune.zoo import build_model, load_dataset
from tests.search_support import USER_DATASET, cli, recipe_for, tiny_config

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

USER_PACKAGE = USER_DATASET + '''
from kfac_tune.zoo import load_dataset

def datasets(train_size=None, test_size=None, seed=0, transform=True):
    d = load_dataset("digits", train_size=train_size, test_size=test_size, seed=seed)
    return Images(d.train_x, d.train_y, noise if transform else None), Images(d.test_x, d.test_y)

def tensors(seed=0):
    d = load_dataset("digits", seed=seed)
    return d.train_x, d.train_y, d.test_x, d.test_y

def fixed():
    d = load_dataset("digits")
    return d.train_x, d.train_y, d.test_x, d.test_y

def wrong_shape(x):
    return x[..., :4]
'''


@pytest.fixture()
def package(tmp_path: Path) -> Path:
    """A user package outside the repository, next to the YAML (the config's directory is importable)."""
    directory = tmp_path / "project"
    directory.mkdir()
    (directory / "userdata_pkg.py").write_text(USER_PACKAGE)
    return directory


def config_file(directory: Path, data: dict[str, Any], **sections: Any) -> Path:
    config = tiny_config(directory, **sections)
    config["data"] = {"batch_size": 64, **data}
    path = directory / "model.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def curves(cfg: Any) -> list[dict[str, float]]:
    return [{k: v for k, v in point.items() if k not in ("train_seconds", "step_time")}
            for point in train(cfg, {}, test=True).curves]


# ------------------------------------------------------------------------------------ settings by signature


def test_dataset_callable_with_a_transform_trains_on_train_size_examples(package: Path) -> None:
    cfg = load_config(config_file(package, {"callable": "userdata_pkg:datasets", "train_size": 300,
                                            "test_size": 100, "validation": 0.2}))
    data = load_data(cfg)
    assert isinstance(data, DatasetBundle) and isinstance(data.train, Subset)
    assert (len(data.train), len(data.validation), len(data.test)) == (240, 60, 100)  # train_size reached it
    problem = preflight(cfg, {})
    assert (problem.train_examples, problem.split, problem.input_shape) == (240, "validation", (1, 8, 8))
    first, again = data.train[0][0], data.train[0][0]
    assert not torch.equal(first, again), "the callable's random transform runs on every read"
    result = train(cfg, {}, test=True)
    assert result.final["eval_accuracy"] > 0.5 and result.test["test_accuracy"] > 0.5  # chance is 0.1


def test_dataset_path_trains_on_the_same_batches_as_the_tensor_path(package: Path) -> None:
    """The same examples as Datasets (no transform, read by a DataLoader) and as tensors (sliced in memory):
    the same batches in the same order, so the same curves."""
    as_datasets = load_config(config_file(package, {"callable": "userdata_pkg:datasets",
                                                    "kwargs": {"transform": False}}))
    as_tensors = load_config(config_file(package, {"callable": "userdata_pkg:tensors"}))
    assert curves(as_datasets) == [pytest.approx(point, rel=1e-5) for point in curves(as_tensors)]


def test_dataloader_workers_are_reproducible(package: Path) -> None:
    """Two workers applying a random transform: the same seed gives the same run, another seed another run."""
    config = config_file(package, {"callable": "userdata_pkg:datasets", "workers": 2, "train_size": 400},
                         training={"steps": 20, "eval_every": 10})
    first, second = curves(load_config(config)), curves(load_config(config))
    assert first == second
    assert curves(load_config(config, {"training.seed": 1})) != first


def test_a_setting_the_callable_cannot_take_is_refused_by_the_cli(package: Path) -> None:
    config = config_file(package, {"callable": "userdata_pkg:fixed", "train_size": 100})
    result = cli("search", str(config), "--no-tracking", cwd=package)
    assert result.returncode == 2, result.stderr
    message = " ".join(result.stderr.split())
    assert "data.train_size" in message and "userdata_pkg:fixed" in message and "100" in message, message
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("data", "field"), [
    ({"callable": "userdata_pkg:fixed", "kwargs": {"scale": 2}}, "data.kwargs.scale"),
    ({"callable": "userdata_pkg:datasets", "kwargs": {"seed": 3}}, "data.kwargs.seed"),
    ({"callable": "userdata_pkg:tensors", "root": "/data"}, "data.root"),
])
def test_keys_a_callable_cannot_honour(package: Path, data: dict[str, Any], field: str) -> None:
    cfg = load_config(config_file(package, data))
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as raised:
        preflight(cfg, {})
    assert data["callable"] in str(raised.value) or "data setting" in str(raised.value)


# ------------------------------------------------------------------------------------------ augmentation


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_fashion_mnist_with_augmentation(tmp_path: Path) -> None:
    data_section = {"name": "fashion_mnist", "train_size": 600, "test_size": 200,
                    "augment": {"random_crop": 2, "horizontal_flip": True}}
    cfg = load_config(config_file(tmp_path, data_section, training={"steps": 40, "eval_every": 20}))
    data = load_data(cfg)
    assert isinstance(data.train, Augmented) and len(data.train) == 540
    plain = load_dataset("fashion_mnist", train_size=600, test_size=200)
    reads = torch.stack([data.train[5][0] for _ in range(20)])
    assert reads.shape == (20, 1, 28, 28) and len({tuple(r.flatten().tolist()) for r in reads}) > 1
    # validation and test examples are not augmented
    val_x = torch.stack([data.validation[i][0] for i in range(len(data.validation))])
    assert all(any(torch.equal(v, x) for x in plain.train_x) for v in val_x[:5])
    assert torch.equal(data.test.tensors[0], plain.test_x)
    result = train(cfg, {}, test=True)
    assert result.final["eval_accuracy"] > 0.4 and result.test["test_accuracy"] > 0.4  # chance is 0.1
    assert curves(cfg) == curves(cfg), "augmented runs reproduce"


def test_augmentation_settings_are_checked_at_preflight(package: Path) -> None:
    flat = load_config(config_file(package, {"name": "synthetic", "augment": {"random_crop": 2}}))
    with pytest.raises(ConfigError, match=r"data\.augment\.random_crop: expected image examples"):
        preflight(flat, {})
    wrong = load_config(config_file(package, {"name": "digits", "augment": {"callable": "userdata_pkg:wrong_shape"}}))
    with pytest.raises(ConfigError, match=r"data\.augment\.callable: expected a tensor of the example's shape"):
        preflight(wrong, {})
    with pytest.raises(ConfigError, match=r"data\.augment\.random_flip"):
        load_config(config_file(package, {"name": "digits", "augment": {"random_flip": True}}))


# ----------------------------------------------------------------------------------- recipes and networks


@pytest.mark.parametrize(("optimizer", "hyperparameters", "kind"), [
    ("kfac", {"lr": 0.05, "damping": 0.01}, KFAC),
    ("adam", {"lr": 0.002}, torch.optim.Adam),
    ("sgd", {"lr": 0.05}, torch.optim.SGD),
])
def test_recipes_check_the_network(tmp_path: Path, optimizer: str, hyperparameters: dict[str, Any],
                                   kind: type) -> None:
    recipe = recipe_for(config_file(tmp_path, {"name": "digits"}, model={"name": "mlp", "kwargs": {"hidden": [32]}}),
                        optimizer, hyperparameters, tmp_path / f"{optimizer}.yaml")
    same = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    built = optimizer_from_recipe(same, recipe)
    assert isinstance(built, kind) and built.param_groups[0]["lr"] == hyperparameters["lr"]
    wider = build_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=[64])
    with pytest.raises(RecipeError) as raised:
        optimizer_from_recipe(wider, recipe)
    message = str(raised.value)
    assert "'mlp'" in message and "Sequential" in message and "32x64" in message and "64x64" in message, message
    assert isinstance(optimizer_from_recipe(wider, recipe, strict=False), kind)
    if optimizer == "kfac":
        with pytest.raises(RecipeError, match="'mlp'.*Sequential.*strict=False"):
            optimizer_from_recipe(wider, recipe)
        assert optimizer_from_recipe(wider, recipe, strict=False).param_groups[0]["damping"] == 0.01


# ------------------------------------------------------------------------------------------------ regression
REGRESSION_PACKAGE = '''
import torch
from sklearn.datasets import load_diabetes
from torch import nn


def diabetes(column=False):
    """scikit-learn's bundled diabetes data (442 patients, 10 features, disease progression): standardised, a
    fixed shuffle, 350 / 92. Targets of shape (N,) by default, (N, 1) with column=True."""
    d = load_diabetes()
    x, y = torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target, dtype=torch.float32)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = (x[order] - x.mean(0)) / x.std(0), (y[order] - y.mean()) / y.std()
    y = y[:, None] if column else y
    return x[:350], y[:350], x[350:], y[350:]


def mlp(input_shape, num_classes, hidden=16, outputs=1):
    return nn.Sequential(nn.Linear(input_shape[0], hidden), nn.Tanh(), nn.Linear(hidden, outputs))
'''


def _regression(tmp_path: Path, task: str | None = "regression", column: bool = False, outputs: int = 1) -> Path:
    directory = tmp_path / "project"
    directory.mkdir(exist_ok=True)
    (directory / "regression_pkg.py").write_text(REGRESSION_PACKAGE)
    model = {"callable": "regression_pkg:mlp", "kwargs": {"outputs": outputs}, **({"task": task} if task else {})}
    return config_file(directory, {"callable": "regression_pkg:diabetes", "kwargs": {"column": column}},
                       model=model, training={"steps": 60, "eval_every": 20, "device": "cpu", "threads": 1, "seed": 0})


def test_a_regression_model_trains_on_real_valued_targets_of_either_shape(tmp_path: Path) -> None:
    """``model.task: regression`` compares the output with the data's real-valued targets (mse by default), and
    targets of shape (N,) train exactly as (N, 1) would against an (N, 1) output: F.mse_loss would otherwise
    broadcast them to N × N pairs and train on the wrong loss. K-FAC's defaults fit the diabetes data."""
    flat = curves(load_config(_regression(tmp_path, column=False)))
    column = curves(load_config(_regression(tmp_path, column=True)))
    assert flat == column
    assert "eval_accuracy" not in flat[-1]
    # standardised targets: predicting their mean scores about 1; the linear signal in these data explains half
    assert flat[-1]["eval_loss"] < 0.7 and flat[-1]["test_loss"] < 0.7


def test_real_valued_labels_with_the_default_task_stop_before_training(tmp_path: Path) -> None:
    """Without ``task: regression`` a callable is a classifier, and cross-entropy against real numbers is 0 on every
    trial (a study of perfect scores, measured): the preflight stops it, naming ``model.task``, exit 2."""
    config = _regression(tmp_path, task=None)
    result = cli("search", str(config), "--no-tracking", cwd=config.parent)
    assert result.returncode == 2, result.stderr
    assert "model.task: expected regression for data whose labels are real numbers" in result.stderr
    assert "Traceback" not in result.stderr and not (config.parent / "study.db").exists()


def test_a_regression_output_of_another_size_than_its_targets_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"output has shape \(64, 3\) but the regression targets have \(64,\)"):
        train(load_config(_regression(tmp_path, outputs=3)), {})


BAD_OUTPUTS = '''
import torch
from torch import nn


class TwoOutputs(nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.hidden, self.out = nn.Linear(64, 16), nn.Linear(16, classes)

    def forward(self, x):
        h = torch.relu(self.hidden(x.flatten(1)))
        return self.out(h), h


def pair(input_shape, num_classes):
    return TwoOutputs(num_classes)


def five_logits(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
'''


@pytest.mark.parametrize(("model", "task", "named"), [
    ("bad_outputs:pair", None, "TypeError: its forward returns a tuple, not the one tensor the loss is computed from"),
    ("bad_outputs:five_logits", None, "its output has 5 logits per example (shape (2, 5)) but the labels have 10 "
                                      "classes"),
    ("regression_pkg:mlp", "regression", "the model's output has shape (2, 3) but the regression targets have (2,)"),
])
def test_a_model_whose_output_the_loss_cannot_score_stops_before_training(tmp_path: Path, model: str,
                                                                          task: str | None, named: str) -> None:
    """The preflight scores two training examples as training will, so a forward that returns a tuple, too few
    logits for the labels (two labels alone may not show it) or a regression output of another size than its
    targets is one paragraph naming model.callable, exit 2, no study: not a failed trial after failed trial."""
    config = _regression(tmp_path, outputs=3) if task else config_file(
        tmp_path, {"name": "digits", "batch_size": 64}, model={"callable": model})
    (config.parent / "bad_outputs.py").write_text(BAD_OUTPUTS)
    result = cli("search", str(config), "--no-tracking", cwd=config.parent)
    assert result.returncode == 2, result.stderr
    assert "model.callable: expected a model whose output" in result.stderr and named in result.stderr
    assert "Traceback" not in result.stderr and not (config.parent / "study.db").exists()
