"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): the sign of an interpolated momentum.

torch has no Lion, so here it is in the paper's few lines (its Algorithm 2, decoupled weight decay):

    c = β₁ m + (1 − β₁) g;   θ ← θ − lr (sign(c) + λ θ);   m ← β₂ m + (1 − β₂) g

Every coordinate moves by exactly ``lr`` (before decay), so Lion's lr is 3-10x below AdamW's and its weight decay
3-10x above it (the paper's advice, which the catalog's space follows); its state is one momentum per parameter.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class Lion(torch.optim.Optimizer):
    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0) -> None:
        if not lr > 0:
            raise ValueError(f"Lion: lr={lr!r}: expected a positive number")
        if not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"Lion: betas={betas!r}: expected two numbers in [0, 1)")
        if not weight_decay >= 0:
            raise ValueError(f"Lion: weight_decay={weight_decay!r}: expected a number >= 0")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), decay = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                momentum = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - lr * decay)
                p.add_(torch.sign(momentum.lerp(p.grad, 1 - beta1)), alpha=-lr)
                momentum.lerp_(p.grad, 1 - beta2)
        return loss
