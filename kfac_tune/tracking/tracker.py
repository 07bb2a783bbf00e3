"""What the search needs from tracking (:class:`Tracker`), the tracker that records nothing (:class:`Untracked`),
and :func:`open_tracker`, which picks one of them from the config.

The search talks to this protocol only, so ``--no-tracking`` is the same code path with a tracker that does
nothing, and MLflow is imported only when tracking is on.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import optuna

    from kfac_tune.config import Config

FLUSH_INTERVAL_S = 10.0  # curve points reach MLflow in batches at most this often (and always at the trial's end)


class RunRecorder(Protocol):
    """The record of one trial: its evaluation curve and how it ended."""

    run_id: str | None

    def log_eval(self, step: int, metrics: dict[str, float]) -> None: ...

    def log_model(self, model: Any) -> None: ...

    def set_outcome(self, state: str, value: float | None = None, reason: str | None = None) -> None: ...


class Tracker(Protocol):
    """The record of one study: a parent run, one run per trial, plots, and the calls it gave up on."""

    def ensure_parent_run(self, study: optuna.Study, tags: dict[str, str], artifacts: dict[str, str],
                          params: Mapping[str, Any] | None = None) -> str | None: ...

    def trial_run(self, trial: optuna.Trial, params: dict[str, object]) -> AbstractContextManager[RunRecorder]: ...

    def refresh_plots(self, study: optuna.Study) -> None: ...

    def finish_study(self, study: optuna.Study, recipe_path: str | None = None) -> None: ...

    @property
    def given_up(self) -> list[str]: ...


class Untracked:
    """A :class:`Tracker` recording nothing: ``--no-tracking`` keeps one code path in the search."""

    @property
    def given_up(self) -> list[str]:
        return []

    def ensure_parent_run(self, study: optuna.Study, tags: dict[str, str], artifacts: dict[str, str],
                          params: Mapping[str, Any] | None = None) -> None: ...
    def refresh_plots(self, study: optuna.Study) -> None: ...
    def finish_study(self, study: optuna.Study, recipe_path: str | None = None) -> None: ...

    @contextmanager
    def trial_run(self, trial: optuna.Trial, params: dict[str, object]) -> Iterator[UntrackedRun]:
        yield UntrackedRun()


class UntrackedRun:
    """A :class:`RunRecorder` recording nothing."""

    run_id = None

    def log_eval(self, step: int, metrics: dict[str, float]) -> None: ...
    def log_model(self, model: Any) -> None: ...
    def set_outcome(self, state: str, value: float | None = None, reason: str | None = None) -> None: ...


def open_tracker(cfg: Config, study_name: str, enabled: bool, *, prepare: bool = False) -> Tracker:
    """A :class:`~kfac_tune.tracking.runs.StudyTracker` for the config's store, or :class:`Untracked` when
    tracking is off.

    ``prepare`` (the parent, once, before any worker): create/migrate the store and check it answers, so an
    unreachable MLflow is reported before training starts.
    """
    if not enabled:
        return Untracked()
    from kfac_tune.tracking.runs import StudyTracker, used_settings
    from kfac_tune.tracking.server import check_reachable, prepare_store

    if prepare:
        prepare_store(cfg.tracking.uri)
        check_reachable(cfg.tracking.uri)
    return StudyTracker(cfg.tracking.uri, cfg.tracking.experiment or cfg.stem, study_name,
                        flush_interval_s=FLUSH_INTERVAL_S,
                        run_config=used_settings(cfg.model_dump(mode="json", by_alias=True)))
