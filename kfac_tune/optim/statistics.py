"""Curvature statistics: summed over the passes of one step, then folded into bias-corrected moving averages.

The optimizer drives one :class:`Statistics` per layer and step: ``add_input`` in the layer's forward hook (with
the index of the call within the pass, so a layer called at every time step is seen step by step),
``add_output_grad`` for each gradient w.r.t. one of the layer's outputs (the sampled or empirical one, on the
scale of ``fisher``'s convention once multiplied by ``scale = N · batch / used``), ``end_backward`` after each
sampled backward stream, ``end_pass`` when a new forward pass starts, and ``estimates`` at ``step()``.  Estimates are plain tensors keyed by factor name, so data parallelism can average
them without knowing what they are, and the layer's block folds them into its moving averages.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor


class Statistics:
    """One layer's statistics for one step.  Subclasses add what their block needs."""

    def add_input(self, x: Tensor, used: int, call: int) -> None:
        raise NotImplementedError

    def add_output_grad(self, g: Tensor, scale: float, call: int) -> None:
        raise NotImplementedError

    def end_backward(self) -> None:
        """One backward stream (a sampled or exact-Fisher column) has delivered all its gradients."""

    def end_pass(self) -> None:
        """A forward pass is over: the next input starts a new sequence (and the empirical gradients are in)."""

    def estimates(self, passes: int) -> dict[str, Tensor]:
        """Factor estimates of this step; keys with no data yet (no backward pass) are left out."""
        raise NotImplementedError


class KroneckerStatistics(Statistics):
    """``A = Σ a aᵀ / rows`` (or the helper's own input moment) and ``G = Σ_passes N Σ_rows g gᵀ / passes``."""

    def __init__(self, helper: Any, dtype: torch.dtype) -> None:
        self.helper, self.dtype = helper, dtype
        self.A_sum: Optional[Tensor] = None
        self.G_sum: Optional[Tensor] = None
        self.rows = 0

    def add_input(self, x: Tensor, used: int, call: int) -> None:
        moment, rows = self.helper.a_moment(x, used)
        moment = moment.to(self.dtype)
        self.A_sum = moment if self.A_sum is None else self.A_sum + moment
        self.rows += rows

    def add_output_grad(self, g: Tensor, scale: float, call: int) -> None:
        cov = self.helper.g_moment(self.helper.g_rows(g).to(self.dtype)) * scale
        self.G_sum = cov if self.G_sum is None else self.G_sum + cov

    def estimates(self, passes: int) -> dict[str, Tensor]:
        out = {}
        if self.A_sum is not None and self.rows:
            out["A"] = self.A_sum / self.rows
        if self.G_sum is not None and passes:
            out["G"] = self.G_sum / passes
        return out
