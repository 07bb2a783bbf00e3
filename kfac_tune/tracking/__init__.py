"""MLflow tracking for kfac-tune: the store and its server (:mod:`.server`), a study's runs (:mod:`.runs`), its
plots (:mod:`.plots`), comparisons (:mod:`.comparisons`), and the :class:`Tracker` protocol the search uses with
its null object (:mod:`.tracker`). Importing this package does not import mlflow."""
from __future__ import annotations

from kfac_tune.tracking.comparisons import log_comparison
from kfac_tune.tracking.plots import INTERACTIVE_PAGE
from kfac_tune.tracking.runs import StoreCalls, StudyTracker, TrialRun, flatten
from kfac_tune.tracking.server import (PortInUse, TrackingUnavailable, check_reachable, experiment_url,
                                       get_or_create_experiment, prepare_store, serve_ui)
from kfac_tune.tracking.tracker import RunRecorder, Tracker, Untracked, open_tracker

__all__ = ["INTERACTIVE_PAGE", "PortInUse", "RunRecorder", "StoreCalls", "StudyTracker",
           "Tracker", "TrackingUnavailable", "TrialRun", "Untracked", "check_reachable", "experiment_url", "flatten",
           "get_or_create_experiment", "log_comparison", "open_tracker", "prepare_store", "serve_ui"]
