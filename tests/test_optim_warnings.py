"""K-FAC's RuntimeWarnings name the user's line (the ``step()`` call), not torch's ``_contextlib.py`` or K-FAC's own
files, whichever path reaches them: the damping raise in ``step`` and the undecomposable factor in ``blocks``."""
from __future__ import annotations

import inspect
import warnings

import torch
from torch import nn

from kfac_tune.optim import KFAC


def _train(batch: tuple[torch.Tensor, torch.Tensor], **options: object) -> tuple[list[warnings.WarningMessage], int]:
    """Five K-FAC steps on one batch; the warnings raised and the line number of the ``step()`` call below."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = KFAC(model, momentum=0.0, inv_update_freq=1, **options)
    x, y = batch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            step_line = inspect.currentframe().f_lineno + 1
            optimizer.step()
    return [w for w in caught if issubclass(w.category, RuntimeWarning)], step_line


def test_damping_raise_points_at_the_step_call() -> None:
    batch = torch.randn(16, 4), torch.randint(0, 3, (16,))
    caught, line = _train(batch, lr=1e30, damping=1e-8, kl_clip=None)  # every update overflows: skipped, λ raised
    assert caught and all("non-finite update" in str(w.message) for w in caught)
    assert {(w.filename, w.lineno) for w in caught} == {(__file__, line)}


def test_undecomposable_factor_points_at_the_step_call() -> None:
    """Reached from ``step(closure)`` through the inverse refresh in ``blocks``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = KFAC(model, lr=0.1, inv_update_freq=1)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    next(iter(optimizer.layers.values()))[1].A[0, 0] = float("nan")  # a factor that cannot be decomposed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        optimizer.step(closure)
    assert [str(w.message) for w in caught] == [
        "K-FAC: a factor was not finite or could not be decomposed; keeping its previous inverse"]
    assert (caught[0].filename, caught[0].lineno) == (__file__, line)
