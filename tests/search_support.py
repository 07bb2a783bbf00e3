"""Helpers shared by the search/config/recipe tests: tiny configs, the CLI, storage inspection.

The optimizer the search tests tune is ``KFAC_TUNE_TEST_OPTIMIZER`` (default ``kfac``); set it to ``adam`` or
``sgd`` to check that the tool works independently of the K-FAC implementation.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import yaml

REPO = Path(__file__).resolve().parents[1]
TEST_OPTIMIZER = os.environ.get("KFAC_TUNE_TEST_OPTIMIZER", "kfac")


USER_DATASET = '''
import torch
from torch.utils.data import Dataset


class Images(Dataset):
    """Images as a map-style Dataset of (image, label), with an optional per-example transform."""

    classes = list(range(10))

    def __init__(self, images, labels, transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = self.images[i]
        return (self.transform(image) if self.transform else image), int(self.labels[i])


def noise(image):
    """A random transform: Gaussian pixel noise."""
    return (image + 0.05 * torch.randn_like(image)).clamp(0, 1)
'''
"""The Dataset class and random transform of the user packages the tests write (plain torch, no kfac_tune)."""


def tiny_config(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    """A digits MLP that trains in about a second per trial on one CPU thread."""
    config: dict[str, Any] = {
        "model": {"name": "mlp", "kwargs": {"hidden": [32]}},
        "data": {"name": "digits", "batch_size": 64},
        "training": {"steps": 60, "eval_every": 20, "device": "cpu", "threads": 1, "seed": 0},
        "optimizer": TEST_OPTIMIZER,
        "search": {"trials": 3, "sampler": {"name": "tpe", "seed": 0}},
        "tracking": {"enabled": False, "uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "storage": f"sqlite:///{tmp_path / 'study.db'}",
    }
    for name, value in sections.items():  # sections merge key by key; a model or optimizer is replaced whole
        merge = name not in ("model", "optimizer") and isinstance(config.get(name), dict)
        config[name] = {**config[name], **value} if merge else value
    return config


def write_config(tmp_path: Path, name: str = "model.yaml", **sections: Any) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, **sections), sort_keys=False))
    return path


def cli(*args: str, cwd: Path, timeout: float = 600, **popen: Any) -> subprocess.CompletedProcess[str]:
    """Run ``python cli.py ARGS`` from the checkout, as a user would, in ``cwd``."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("KFAC_TUNE_STORAGE", None)
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, **popen)


def cli_popen(*args: str, cwd: Path, output: IO[str] | None = None) -> subprocess.Popen[str]:
    """Start ``python cli.py ARGS``; stdout and stderr together go to a pipe, or to ``output`` (a file) for
    processes that run alongside others and would fill an unread pipe."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, str(REPO / "cli.py"), *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE if output is None else output, stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen[Any], timeout_s: float = 60) -> None:
    """Terminate a process a test started (SIGTERM, then SIGKILL); no-op if it has exited."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_s)


def load_study(storage: str, name: str) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=storage)


def recipe_for(config: Path, optimizer: str, hyperparameters: dict[str, Any], path: Path, value: float = 1.0) -> Path:
    """A valid recipe for ``config``'s model (real architecture signature) without running a search."""
    from kfac_tune.config import load_config
    from kfac_tune.recipes import Recipe, save_recipe
    from kfac_tune.problem import preflight

    cfg = load_config(config, {"optimizer.name": optimizer, "optimizer.options": {}})
    problem = preflight(cfg, hyperparameters)
    recipe = Recipe.model_validate({
        "architecture": problem.architecture, "optimizer": optimizer, "hyperparameters": hyperparameters,
        "training": {"dataset": cfg.data.name, "batch_size": cfg.data.batch_size, "steps": problem.steps,
                     "loss": problem.loss, "metric": cfg.training.metric, "seed": cfg.training.seed},
        "result": {"metric": cfg.training.metric, "value": value, "direction": cfg.training.goal, "trials": 1},
        "provenance": {"study": "test", "trial": 0, "config_hash": cfg.fingerprint(), "architecture":
                       problem.architecture, "signature": problem.signature, "device": "cpu",
                       "date": "2026-01-01T00:00:00+00:00", "versions": {}},
    })
    return save_recipe(recipe, path)


def invoke(*args: str) -> str:
    """Run ``kfac-tune ARGS`` in this process (Click's runner); it must exit 0. Its standard output."""
    from click.testing import CliRunner

    from kfac_tune.cli import cli as kfac_tune

    result = CliRunner().invoke(kfac_tune, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout
