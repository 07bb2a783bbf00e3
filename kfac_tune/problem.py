"""The run's problem: what a config trains (data, model, loss) and the preflight that checks it before any trial.

Everything here is fixed for a config, whatever hyperparameters a trial samples, which is why ``compare``, the
recipe finder and warm starts can depend on it without depending on the training loop or the search. The training
loop (:mod:`kfac_tune.training`) builds the same data and model through these functions.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import default_collate

from kfac_tune.augment import Augmented, training_transform
from kfac_tune.catalog import TASK_LOSSES, build_optimizer, loss_function
from kfac_tune.config import MAX_STEPS, AugmentConfig, Config, DataConfig, Phrase, import_callable
from kfac_tune.userdata import Data, DataProblem, as_datasets, call_data, hold_out_datasets
from kfac_tune.zoo import ARCHITECTURES, DataBundle, DatasetNotFoundError, architecture_signature, build_model, load_dataset
from kfac_tune.zoo.data import hold_out


@dataclass(frozen=True)
class Problem:
    """The fixed part of every trial of a config: what is trained, on what, judged by which loss."""

    architecture: str
    signature: dict[str, Any]
    task: str
    loss: str
    input_shape: tuple[int, ...]
    num_classes: int
    train_examples: int
    steps: int
    device: str
    parameter_groups: dict[str, Any] | None = None  # how a multi-optimizer (muon) splits the model; see recipes
    split: str = "validation"  # where eval_* metrics (the objective) are measured: validation, or test


# ------------------------------------------------------------------------------------------------ building
def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when one is visible; asking for ``cuda`` without one is an error, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("training.device is 'cuda' but torch sees no CUDA device")
    return torch.device(name)


def load_data(cfg: Config) -> Data:
    """The dataset the config names, with its validation split and training augmentation (cached per process:
    every trial of a study uses the same one, whatever batch size it samples). Tensors (a ``DataBundle``) unless
    the data callable returned Datasets or ``data.augment`` is set. Raises ``DataProblem`` for a setting that
    cannot be honoured."""
    exclude = {"batch_size", "eval_batch_size", "workers"}
    data_json = json.dumps(cfg.data.model_dump(mode="json", exclude=exclude), sort_keys=True)
    return _load_data(data_json, cfg.training.seed)


@functools.lru_cache(maxsize=1)
def _load_data(data_json: str, seed: int) -> Data:
    data = json.loads(data_json)
    if data["callable"]:
        defaults = {key: field.default for key, field in DataConfig.model_fields.items()}
        loaded = call_data(import_callable(data["callable"]), data["callable"], data, defaults, data["kwargs"], seed)
    else:
        loaded = load_dataset(
            data["name"], root=data["root"], train_size=data["train_size"], test_size=data["test_size"],
            test_from_train=data["test_from_train"], download=data["download"], seed=seed, **data["kwargs"])
    if isinstance(loaded, DataBundle):
        loaded = hold_out(loaded, data["validation"], seed)
    else:
        loaded = hold_out_datasets(loaded, data["validation"], seed)
    if data["augment"] is None:
        return loaded
    datasets = as_datasets(loaded)
    transform = training_transform(AugmentConfig.model_validate(data["augment"]), datasets.train[0][0])
    return dataclasses.replace(datasets, train=Augmented(datasets.train, transform))


def make_model(cfg: Config, data: Data) -> nn.Module:
    if cfg.model.callable:
        model = import_callable(cfg.model.callable)(
            input_shape=data.input_shape, num_classes=data.num_classes, **cfg.model.kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model.callable returned a {type(model).__name__}, not a torch.nn.Module")
        return model
    return build_model(cfg.model.name, input_shape=data.input_shape, num_classes=data.num_classes, **cfg.model.kwargs)


def task_and_loss(cfg: Config) -> tuple[str, str]:
    """The task (built-ins know theirs; callables say it or are classifiers) and the loss (override or default)."""
    if cfg.model.callable:
        task = cfg.model.task or "classification"
        default_loss = TASK_LOSSES[task][0]
    else:
        spec = ARCHITECTURES[cfg.model.name]
        task, default_loss = spec.task, spec.default_loss
    return task, cfg.training.loss or default_loss


def objective_loss(task: str, loss_name: str) -> Callable[..., torch.Tensor]:
    """What a batch's output and target are scored with: the torch functional ``loss_name`` (mean reduction, the
    convention K-FAC's Fisher assumes), one term per position for sequences, on targets of the output's shape for
    regression."""
    loss_fn = loss_function(loss_name)
    if task == "sequence":
        return functools.partial(_per_position, loss_fn)
    if task == "regression":
        return functools.partial(_shaped_like_output, loss_fn)
    return loss_fn


def batch_target(task: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """What a batch's output is compared with: its labels or targets, or for reconstruction its own (flattened)
    input."""
    if task in ("classification", "sequence", "regression"):
        return lambda x, y: y
    return lambda x, y: x.flatten(1)


def _per_position(loss_fn: Callable[..., torch.Tensor], out: torch.Tensor, target: torch.Tensor,
                  **kwargs: Any) -> torch.Tensor:
    """A sequence model's loss: logits ``(batch, time, classes)`` against ``(batch, time)`` targets, one term per
    position (the mean over all positions, the convention K-FAC's Fisher assumes)."""
    return loss_fn(out.flatten(0, -2), target.flatten(), **kwargs)


def _shaped_like_output(loss_fn: Callable[..., torch.Tensor], out: torch.Tensor, target: torch.Tensor,
                        **kwargs: Any) -> torch.Tensor:
    """A regression loss, on targets of the output's shape and dtype. Targets of ``(batch,)`` for an output of
    ``(batch, 1)`` are the common case: ``F.mse_loss`` would broadcast them to ``batch × batch`` pairs (with only a
    warning) and train on the wrong loss. Sizes that differ are an error naming both shapes."""
    if target.shape != out.shape:
        if target.numel() != out.numel():
            raise ValueError(f"the model's output has shape {tuple(out.shape)} but the regression targets have "
                             f"{tuple(target.shape)}: expected one output per target value")
        target = target.reshape(out.shape)
    return loss_fn(out, target.to(out.dtype), **kwargs)


def check_output(model: nn.Module, data: Data, task: str, loss_name: str) -> None:
    """Score the first two training examples, in eval mode and without gradients, as training will: a model whose
    forward returns a tuple or a dict, fewer logits than the data has classes, or a regression output of another
    size than its targets fails here, once, rather than in every trial. Raises what the forward or the loss
    raises."""
    if isinstance(data, DataBundle):
        inputs, labels = data.train_x[:2], data.train_y[:2]
    else:
        inputs, labels = default_collate([data.train[i] for i in range(min(2, len(data.train)))])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(inputs)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"its forward returns a {type(out).__name__}, not the one tensor the loss is computed "
                            "from (return the logits or prediction alone)")
        if task == "classification" and out.shape[-1] < data.num_classes:  # two labels may not show it
            raise ValueError(f"its output has {out.shape[-1]} logits per example (shape {tuple(out.shape)}) but "
                             f"the labels have {data.num_classes} classes")
        objective_loss(task, loss_name)(out, batch_target(task)(inputs, labels))
    finally:
        model.train(was_training)


def total_steps(cfg: Config, train_examples: int) -> int:
    """The step budget, or under ``training.budget.seconds`` the step cap (none given: effectively unlimited)."""
    if cfg.training.epochs is None:
        return cfg.training.steps or (MAX_STEPS if cfg.training.budget is not None else 300)
    per_epoch = max(train_examples // cfg.data.batch_size, 1)
    return max(math.ceil(cfg.training.epochs * per_epoch), 1)


def preflight(cfg: Config, hparams: Mapping[str, Any]) -> Problem:
    """Build data, model and optimizer once, before any trial, so a bad argument is a config error (exit 2)
    rather than a study full of failed trials. Returns what the study and recipes record about the problem."""
    try:
        data = load_data(cfg)
    except DataProblem as problem:
        raise cfg.problem(problem.field, f"expected {problem.expected}", Phrase(problem.found)) from None
    except (DatasetNotFoundError, ValueError, TypeError) as error:
        field = "data.callable" if cfg.data.callable else "data.kwargs" if "argument" in str(error) else "data.name"
        raise cfg.problem(field, "expected a loadable dataset", Phrase(f"{type(error).__name__}: {error}")) from None
    task, loss = task_and_loss(cfg)
    if task == "classification" and data.num_classes == 0:  # cross-entropy on real numbers: a loss of 0, silently
        raise cfg.problem("model.task", "expected regression for data whose labels are real numbers (classification "
                          "needs integer class labels)", Phrase(f"{cfg.model.task or 'classification (the default)'}"))
    if loss not in TASK_LOSSES[task]:
        raise cfg.problem("training.loss", f"expected a loss for {task} ({', '.join(TASK_LOSSES[task])})", loss)
    batch = min(cfg.data.batch_size, data.train_examples)
    if batch % cfg.training.processes:
        raise cfg.problem("training.processes", f"expected a divisor of the batch size {batch} (every process "
                          "trains on an equal slice of each batch)", cfg.training.processes)
    try:
        torch.manual_seed(cfg.training.seed)
        model = make_model(cfg, data)
    except (Exception, SystemExit) as error:  # a user callable may raise anything, or call sys.exit()
        where = "model.callable" if cfg.model.callable else "model.kwargs"
        raise cfg.problem(where, "expected a buildable model", Phrase(f"{type(error).__name__}: {error}")) from None
    try:
        check_output(model, data, task, loss)
    except (Exception, SystemExit) as error:  # a user's forward may raise anything, or call sys.exit()
        where = "model.callable" if cfg.model.callable else "model.kwargs"
        raise cfg.problem(where, f"expected a model whose output the {task} loss ({loss}) accepts on the training "
                          "examples",
                          Phrase(f"{type(error).__name__}: {error}")) from None
    try:
        opt = build_optimizer(cfg.optimizer.name, model, {**cfg.optimizer.options, **hparams}, loss=loss)
    except (TypeError, ValueError) as error:
        raise cfg.problem("optimizer.options", f"expected options accepted by {cfg.optimizer.name}",
                          Phrase(f"{type(error).__name__}: {error}")) from None
    return Problem(
        architecture=cfg.model.architecture, signature=architecture_signature(model), task=task, loss=loss,
        input_shape=tuple(data.input_shape), num_classes=data.num_classes, train_examples=data.train_examples,
        steps=total_steps(cfg, data.train_examples), device=str(resolve_device(cfg.training.device)),
        parameter_groups=getattr(opt, "parameter_groups", None),
        split="validation" if data.has_validation else "test")
