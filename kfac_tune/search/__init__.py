"""Optuna search over optimizer hyperparameters: the space (space.py), storage, sampler and pruner (storage.py),
the study and its setup lock (study.py), the trial (objective.py), worker processes (workers.py), and the run from
config to recipe (prepare.py)."""
from __future__ import annotations

from kfac_tune.search.objective import Objective
from kfac_tune.search.prepare import PreparedSearch, SearchOutcome, prepare_search
from kfac_tune.search.space import build_space, suggest
from kfac_tune.search.storage import make_storage
from kfac_tune.search.study import open_study

__all__ = [
    "Objective", "PreparedSearch", "SearchOutcome", "build_space", "make_storage", "open_study", "prepare_search",
    "suggest",
]
