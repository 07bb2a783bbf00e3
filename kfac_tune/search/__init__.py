"""Optuna search over optimizer hyperparameters: the space, the study and the per-trial objective."""
from __future__ import annotations

from kfac_tune.search.objective import Objective
from kfac_tune.search.space import build_space, suggest
from kfac_tune.search.study import PreparedSearch, SearchOutcome, make_storage, open_study, prepare_search, run_search

__all__ = [
    "Objective", "PreparedSearch", "SearchOutcome", "build_space", "make_storage", "open_study", "prepare_search",
    "run_search", "suggest",
]
