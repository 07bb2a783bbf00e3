"""The built-in workloads as (model, batches, loss) triples, small enough to train a few dozen steps in seconds.

Shared by the robustness sweep (``benchmarks/robustness.py``) and the defaults tests
(``tests/test_kfac_defaults.py``): the five shipped examples' models and data (``examples/*.yaml``, read through
the tool's own config loader, with the training set cut to ``train_size``), the LSTM language model, the digits
convnet and a small BatchNorm residual network.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kfac_tune.config import load_config
from kfac_tune.problem import load_data, make_model, task_and_loss
from kfac_tune.zoo import build_model, load_dataset

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FUNCTIONALS = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss, "bce": F.binary_cross_entropy_with_logits}
SHIPPED = ("digits_mlp", "digits_autoencoder", "fashion_mnist_mlp", "fashion_mnist_convnet",
           "fashion_mnist_autoencoder", "pydoc_lstm_lm")
EXTRA = ("digits_convnet", "digits_batchnorm_cnn")
ALL = SHIPPED + EXTRA


@dataclass
class Workload:
    """A model, its training tensors and the loss K-FAC is told about; ``batch(i)`` is the i-th mini-batch."""

    name: str
    model: nn.Module
    x: Tensor
    target: Tensor
    loss: str
    batch_size: int

    def batch(self, i: int) -> tuple[Tensor, Tensor]:
        n = len(self.x)
        start = (i * self.batch_size) % max(n - self.batch_size + 1, 1)
        return self.x[start:start + self.batch_size], self.target[start:start + self.batch_size]

    def objective(self, output: Tensor, target: Tensor) -> Tensor:
        """The mean loss, one term per position for a sequence model (the convention K-FAC's Fisher assumes)."""
        if output.dim() == 3:
            output, target = output.flatten(0, -2), target.flatten()
        return FUNCTIONALS[self.loss](output, target)

    def closure(self, opt: torch.optim.Optimizer, i: int) -> Callable[[], Tensor]:
        x, t = self.batch(i)

        def closure() -> Tensor:
            opt.zero_grad()
            loss = self.objective(self.model(x), t)
            loss.backward()
            return loss

        return closure

    def losses(self, opt: torch.optim.Optimizer, steps: int) -> Iterator[float]:
        """Train ``steps`` steps with ``opt.step(closure)``, yielding each step's batch loss."""
        for i in range(steps):
            yield float(opt.step(self.closure(opt, i)))

    def full_loss(self) -> float:
        """The loss on every training example held (the model in training mode, as it trains)."""
        with torch.no_grad():
            return float(self.objective(self.model(self.x), self.target))


def load(name: str, *, train_size: int = 512, seed: int = 0) -> Workload:
    """Workload ``name`` (one of :data:`ALL`) on its first ``train_size`` training examples, model seeded."""
    if name in SHIPPED:
        cfg = load_config(EXAMPLES / f"{name}.yaml", {"data.train_size": train_size, "data.test_size": 16})
        data = load_data(cfg)
        task, loss = task_and_loss(cfg)
        torch.manual_seed(seed)
        model = make_model(cfg, data)
        target = data.train_y if task in ("classification", "sequence") else data.train_x.flatten(1)
        return Workload(name, model, data.train_x, target, loss, cfg.data.batch_size)
    data = load_dataset("digits", train_size=train_size, test_size=16)
    torch.manual_seed(seed)
    if name == "digits_convnet":
        model = build_model("convnet", input_shape=data.input_shape, num_classes=10, channels=[8, 16], hidden=32)
    elif name == "digits_batchnorm_cnn":
        model = build_model("resnet", input_shape=data.input_shape, num_classes=10, depth=8, width=8)
    else:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(ALL)}")
    return Workload(name, model, data.train_x, data.train_y, "cross_entropy", 128)
