"""kfac-tune: a K-FAC optimizer for PyTorch and the tool that tunes it.

The heavy imports (torch, optuna, mlflow) are deferred so that ``kfac-tune --help``
answers instantly; ``from kfac_tune import KFAC`` imports torch on first use.
"""
from __future__ import annotations

from typing import Any

from kfac_tune.version import __version__

__all__ = ["KFAC", "KFACWarning", "register_layer", "load_recipe", "optimizer_from_recipe", "search", "train", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "KFAC":
        from kfac_tune.optim import KFAC

        return KFAC
    if name == "KFACWarning":
        from kfac_tune.optim import KFACWarning

        return KFACWarning
    if name == "register_layer":
        from kfac_tune.optim import register_layer

        return register_layer
    if name == "load_recipe":
        from kfac_tune.recipes import load_recipe

        return load_recipe
    if name == "optimizer_from_recipe":
        from kfac_tune.recipes import optimizer_from_recipe

        return optimizer_from_recipe
    if name == "search":  # the package kfac_tune.search, callable as the API's search (see its __init__)
        import kfac_tune.search

        return kfac_tune.search
    if name == "train":
        from kfac_tune.api import train

        return train
    raise AttributeError(f"module 'kfac_tune' has no attribute {name!r}")
