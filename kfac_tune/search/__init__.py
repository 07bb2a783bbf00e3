"""Optuna search over optimizer hyperparameters: the space (space.py), storage, sampler and pruner (storage.py),
the study and its setup lock (study.py), the trial (objective.py), worker processes (workers.py), and the run from
config to recipe (prepare.py)."""
from __future__ import annotations

import sys
import types
from typing import Any

from kfac_tune.search.objective import Objective
from kfac_tune.search.prepare import PreparedSearch, SearchOutcome, prepare_search
from kfac_tune.search.space import build_space, suggest
from kfac_tune.search.storage import make_storage
from kfac_tune.search.study import open_study

__all__ = ["Objective", "PreparedSearch", "SearchOutcome", "build_space", "make_storage", "open_study",
           "prepare_search", "suggest"]


class _CallablePackage(types.ModuleType):
    """``kfac_tune.search(config, ...)`` is the Python API's search (``kfac_tune.api.search``), while
    ``kfac_tune.search`` stays this package: the package object itself is what ``import kfac_tune.search`` binds
    on ``kfac_tune``, so the call has to live on it."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from kfac_tune.api import search

        return search(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
