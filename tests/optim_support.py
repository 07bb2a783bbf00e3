"""Helpers shared by the optimizer's exactness tests."""
from __future__ import annotations

import torch
from torch import nn

from kfac_tune import KFAC


def exact_kfac(model: nn.Module, **kw) -> KFAC:
    """K-FAC set up for exact comparisons: float64 factors, inverses every step, plain steps of size 1 (no trust
    region, no update-size or loss guard: the safety mechanisms would change the step these tests derive)."""
    base = dict(lr=1.0, momentum=0.0, factor_decay=0.5, inv_update_freq=1, factor_dtype=torch.float64,
                kl_clip=None, max_update_ratio=None, rejection_ratio=None)
    return KFAC(model, **{**base, **kw})
