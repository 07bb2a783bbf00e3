"""NaN and inf inside K-FAC's inverse path: the optimizer never writes them into the parameters.

tests/test_optim_behaviour.py covers a NaN *input* (NaN loss, gradients and statistics: the update is skipped,
the factors stay finite). These scenarios poison what lies behind the statistics instead: the stored factors
(as an overflow that reached them would) and the eigendecomposition the inverses are built from.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_tune import KFAC

Batch = tuple[torch.Tensor, torch.Tensor]


def _trained(digits: Batch, inv_update_freq: int, steps: int) -> tuple[nn.Module, KFAC, Callable[[], torch.Tensor]]:
    """A digits MLP after ``steps`` healthy K-FAC steps (so every layer has an inverse), and its closure."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = KFAC(model, lr=0.05, inv_update_freq=inv_update_freq)
    x, y = digits[0][:128], digits[1][:128]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return model, opt, closure


def _snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_poisoned_factor_keeps_the_previous_inverse_and_warns(digits: Batch, poison: float) -> None:
    model, opt, closure = _trained(digits, inv_update_freq=1, steps=2)
    name, (_, block) = next(iter(opt.layers.items()))
    previous = block.QA.clone()
    block.A[0, 0] = poison
    with pytest.warns(RuntimeWarning, match="not finite or could not be decomposed; keeping its previous"):
        opt.step(closure)
    assert torch.equal(block.QA, previous), f"layer {name}: a poisoned factor replaced the inverse"
    assert opt.skipped_steps == 0  # the kept inverse still gives a finite update, which is applied
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_inverse_skips_the_update_then_raises_damping_and_recovers(digits: Batch) -> None:
    """An eigendecomposition that came back NaN (what a failed eigh on a bad GPU kernel looks like): the update
    is skipped, the next inverse refresh warns, multiplies the damping by 10 and rebuilds a finite inverse."""
    model, opt, closure = _trained(digits, inv_update_freq=2, steps=3)
    _, (_, block) = next(iter(opt.layers.items()))
    block.set_decomposition(block.QA, torch.full_like(block.dA, float("nan")), block.QG, block.dG)
    damping = opt.param_groups[0]["damping"]
    before = _snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # step 4 refreshes no inverse: the skip is silent until step 5
        opt.step(closure)
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)), "a NaN update was applied"
    with pytest.warns(RuntimeWarning, match="skipped 1 non-finite update"):
        opt.step(closure)  # step 5: refresh due
    assert opt.param_groups[0]["damping"] == pytest.approx(damping * 10)
    assert torch.isfinite(block.dA).all()
    after = _snapshot(model)
    assert any(not torch.equal(p, b) for p, b in zip(after, before)), "the optimizer did not recover"
    assert all(torch.isfinite(p).all() for p in after)
