"""Lion, the optimizer added as one catalog entry: its update is the paper's, and it trains real data.

Its place in the tool (search -> export -> train --recipe, compare beside K-FAC, the space holding its default
point) is tested with the other baselines in tests/test_baselines.py.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kfac_tune.catalog import build_optimizer, optimizer
from kfac_tune.lion import Lion


def test_two_steps_are_the_papers_update(float64_default) -> None:
    """c = b1 m + (1 - b1) g; theta -= lr (sign(c) + wd theta); m = b2 m + (1 - b2) g, written out by hand."""
    theta = nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
    opt = Lion([theta], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    grads = [torch.tensor([1.0, -2.0, 0.0]), torch.tensor([-3.0, 0.5, 1.0])]
    expected, momentum = theta.detach().clone(), torch.zeros(3)
    for g in grads:
        theta.grad = g.clone()
        opt.step()
        c = 0.9 * momentum + 0.1 * g
        expected = expected - 0.1 * (torch.sign(c) + 0.5 * expected)
        momentum = 0.99 * momentum + 0.01 * g
        assert torch.allclose(theta.detach(), expected, atol=1e-15), (theta, expected)
    assert torch.allclose(opt.state[theta]["exp_avg"], momentum, atol=1e-15)


def test_lion_from_the_catalog_trains_digits(digits) -> None:
    """Built by name from its catalog entry's default point (lr raised for a short run), full-batch on
    scikit-learn's digits: the loss falls from chance (ln 10) to a fraction of it."""
    x, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    arguments = {**optimizer("lion").default_point, "lr": 3e-3}
    opt = build_optimizer("lion", model, arguments, loss="cross_entropy")
    assert isinstance(opt, Lion) and opt.param_groups[0]["betas"] == (0.9, 0.99)
    first = F.cross_entropy(model(x), y).item()
    for _ in range(100):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    assert first > 0.8 * math.log(10) and loss.item() < 0.5, (first, loss.item())  # 0.24-0.28 over seeds 0-2
