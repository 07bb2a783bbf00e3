"""Optuna search over optimizer hyperparameters: the space, the study and the per-trial objective."""
from __future__ import annotations

from kfac_tune.search.objective import Objective
from kfac_tune.search.space import build_space, suggest
from kfac_tune.search.study import SearchOutcome, make_storage, open_study, run_search

__all__ = ["Objective", "SearchOutcome", "build_space", "make_storage", "open_study", "run_search", "suggest"]
