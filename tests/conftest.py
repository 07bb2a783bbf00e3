"""Shared fixtures: small real data sets and float64 helpers."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits, flattened to 64 features in [0, 1]: real data, always offline."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target, dtype=torch.long)


@pytest.fixture
def float64_default():
    """Exactness is checked in float64; the default dtype is restored so other tests see float32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)

