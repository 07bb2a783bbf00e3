"""What value of its validation curve a trial reports (``search.objective``), at the end and to the pruner.

* ``final``: the metric at the end of the budget; what a recipe trained for its whole length gives.
* ``best``: the best value reached at any evaluation; the step (and training seconds) where it was reached become
  the recipe's training length (early stopping). On small data a run overfits inside its budget, and ranking on
  the final value prefers settings that learn slowly.
* ``auc``: the mean of the metric over the budget (the area under the validation curve, trapezoids between
  evaluations, divided by the span): anytime performance, which rewards reaching a good value early and staying.

The pruner is fed the same quantity of the curve so far (the value, the best so far, the mean so far), so a trial
is cut on what it would be ranked on.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kfac_tune.config import Config


def _axis(cfg: Config) -> str:
    """The budget's clock: training seconds under a seconds budget, else steps."""
    return "train_seconds" if cfg.training.budget is not None else "step"


def curve_quantity(cfg: Config, curve: Sequence[Mapping[str, float]]) -> float:
    """``search.objective`` of the metric over ``curve`` (the evaluations so far, in order)."""
    metric, kind = cfg.training.metric, cfg.search.objective
    values = [point[metric] for point in curve]
    if kind == "final":
        return values[-1]
    if kind == "best":
        return (max if cfg.training.goal == "maximize" else min)(values)
    axis = [point[_axis(cfg)] for point in curve]
    span = axis[-1] - axis[0]
    if len(values) == 1 or span <= 0:
        return sum(values) / len(values)
    area = sum((b - a) * (u + v) / 2 for a, b, u, v in zip(axis, axis[1:], values, values[1:]))
    return area / span


def metric_objective(cfg: Config, result: Any) -> float:
    """The value a trial with ``result`` (a ``TrainResult``) reports for its metric."""
    return curve_quantity(cfg, result.curves)


def best_point(cfg: Config, curve: Sequence[Mapping[str, float]]) -> Mapping[str, float]:
    """The evaluation where the metric was best (the first, on ties): where ``best`` stops training."""
    sign = -1.0 if cfg.training.goal == "maximize" else 1.0
    return min(curve, key=lambda point: sign * point[cfg.training.metric])
