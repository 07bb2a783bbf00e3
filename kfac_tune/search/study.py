"""The Optuna study behind ``kfac-tune search``: created or resumed, its setup serialised, stale trials failed,
warm starts enqueued.

* The study is created once, in the parent, with ``load_if_exists=True``; workers only load it (two processes
  creating a fresh SQLite database at once crash). Re-running the same command resumes, unless the config's
  fingerprint differs from the one recorded on the study.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from kfac_tune import record
from kfac_tune.config import Config, ConfigError
from kfac_tune.filelock import sqlite_setup_lock
from kfac_tune.search.space import describe
from kfac_tune.search.storage import make_pruner, make_sampler, make_storage
from kfac_tune.secrets import display_url, mask_data
from kfac_tune.stores import StudyNotFound, check_storage_url
from kfac_tune.problem import Problem

def load_study(url: str, study_name: str | None) -> optuna.Study:
    """Load ``study_name`` (or the storage's only study) for reading, without touching heartbeats or samplers;
    ``StudyNotFound`` names what the storage holds instead."""
    from kfac_tune.search.workers import quiet

    quiet()
    check_storage_url(url)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        raise StudyNotFound(f"no storage at {display_url(url)}: run `kfac-tune search CONFIG` first, or pass --storage")
    try:
        names = optuna.get_all_study_names(storage=url)
        if study_name is None:
            if len(names) != 1:
                listing = ", ".join(names) if names else "none"
                raise StudyNotFound(f"{display_url(url)} holds {len(names)} studies ({listing}); choose one with "
                                    f"--study")
            study_name = names[0]
        if study_name not in names:
            raise StudyNotFound(f"no study {study_name!r} in {display_url(url)}; studies there: "
                                f"{', '.join(names) or 'none'}")
        study = optuna.load_study(study_name=study_name, storage=url)
        record.check_study(study)
    except json.JSONDecodeError:  # Optuna decodes every attribute it reads; find the one that is not JSON
        raise _not_json(url) from None
    return study


def _not_json(url: str) -> record.StoredDataError:
    """The first study or trial attribute in the RDB storage ``url`` whose stored value is not JSON, as the error
    naming it (read with SQL from Optuna's tables: Optuna itself fails on the first it decodes, naming none)."""
    import sqlalchemy

    queries = {
        "the stored study attribute {key!r}": "SELECT s.study_name, NULL, a.key, a.value_json FROM "
        "study_user_attributes a JOIN studies s ON s.study_id = a.study_id",
        "trial {number}'s stored attribute {key!r}": "SELECT s.study_name, t.number, a.key, a.value_json FROM "
        "trial_user_attributes a JOIN trials t ON t.trial_id = a.trial_id JOIN studies s ON s.study_id = t.study_id",
        "the stored study system attribute {key!r}": "SELECT s.study_name, NULL, a.key, a.value_json FROM "
        "study_system_attributes a JOIN studies s ON s.study_id = a.study_id",
        "trial {number}'s stored system attribute {key!r}": "SELECT s.study_name, t.number, a.key, a.value_json "
        "FROM trial_system_attributes a JOIN trials t ON t.trial_id = a.trial_id JOIN studies s "
        "ON s.study_id = t.study_id",
    }
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as connection:
            for what, query in queries.items():
                for study, number, key, text in connection.execute(sqlalchemy.text(query)):
                    try:
                        json.loads(text)
                    except json.JSONDecodeError as error:
                        return record.stored_problem(study, what.format(number=number, key=key), f"JSON ({error})",
                                                     text)
    finally:
        engine.dispose()
    return record.StoredDataError(f"{display_url(url)}: a stored value is not valid JSON; the storage was edited or "
                                  f"damaged, so its studies cannot be read.")


def open_study(cfg: Config, study_name: str, storage_url: str, problem: Problem, space: dict[str, Any]) -> optuna.Study:
    """Create or resume the study, refusing to resume one created from a different objective."""
    study = optuna.create_study(study_name=study_name, storage=make_storage(storage_url, cfg),
                                directions=cfg.directions, load_if_exists=True,
                                sampler=make_sampler(cfg, cfg.search.sampler.seed),
                                pruner=make_pruner(cfg, problem.steps))
    recorded = record.study_attr(study, record.CONFIG_HASH)
    if recorded is not None and recorded != cfg.fingerprint():
        raise ConfigError(
            f"{cfg.source or '<config>'}: study {study_name!r} in {display_url(storage_url)} was created from a "
            f"different model/data/training/optimizer/space (config hash {recorded}, this file {cfg.fingerprint()}); "
            f"resuming would mix incomparable trials. Pass --study NEW_NAME for a new study, or resume with the "
            f"original file.")
    if recorded is None:
        config = mask_data(cfg.model_dump(mode="json", by_alias=True), storage_url, cfg.storage, cfg.tracking.uri)
        record.write_study(study, {
            record.CONFIG: config, record.CONFIG_HASH: cfg.fingerprint(), record.OPTIMIZER: cfg.optimizer.name,
            record.ARCHITECTURE: problem.architecture, record.SIGNATURE: problem.signature,
            record.PARAMETER_GROUPS: problem.parameter_groups, record.LOSS: problem.loss, record.TASK: problem.task,
            record.STEPS: problem.steps, record.METRIC: cfg.training.metric, record.SPLIT: problem.split,
            record.SPACE: describe(space)})
        study.set_metric_names(cfg.objectives)
    record.write_study(study, {record.VERSIONS: record.versions()})
    return study


@contextlib.contextmanager
def setup_lock(storage_url: str, study_name: str) -> Iterator[None]:
    """Serialise setting a study up (create the schema and the study, record its config, create its MLflow
    parent run) across ``kfac-tune search`` processes that start at the same moment, as a cluster's workers or
    two shells do.

    Each step is check-then-create, so two processes on a fresh study would otherwise both create the schema
    (one fails: "table ... already exists") or each create an MLflow parent run and split the trials between
    them. On PostgreSQL a session-level advisory lock keyed on the study name does it (released on
    disconnect, so a worker that dies holding it blocks no one); on SQLite an exclusive lock on a file beside
    the database (:mod:`kfac_tune.filelock`, released by the kernel if the holder dies).
    """
    import zlib

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    try:
        postgres = make_url(storage_url).get_backend_name() == "postgresql"
    except Exception:  # not an SQLAlchemy URL: RDBStorage will say so
        postgres = False
    if not postgres:
        with sqlite_setup_lock(storage_url):
            yield
        return
    key = zlib.crc32(f"kfac-tune setup {study_name}".encode())
    engine = create_engine(storage_url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
    finally:
        engine.dispose()


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail the RUNNING trials whose worker died and re-enqueue them per ``search.max_retry``.

    A worker died when its trial's heartbeat is older than the grace period, or when the trial started longer
    ago than that and never beat: a worker killed between taking a trial and its heartbeat thread's first write
    (found by a 20-run loop of the lifecycle tests under load), which Optuna never fails because it looks only at
    trials that have a heartbeat. Optuna fails stale trials only when a worker is about to start one, which
    never happens once the budget is met, so a killed trial would stay RUNNING forever: every ``search`` does it
    when it starts and when it ends, whatever the budget."""
    optuna.storages.fail_stale_trials(study)
    storage = study._storage  # optuna.storages.fail_stale_trials reads it the same way
    rdb = getattr(storage, "_backend", storage)  # the RDBStorage behind Optuna's cache
    if not isinstance(rdb, optuna.storages.RDBStorage) or rdb.heartbeat_interval is None:
        return
    grace = timedelta(seconds=rdb.grace_period or 2 * rdb.heartbeat_interval)
    started = datetime.now() - grace  # datetime_start is the worker's local clock, as here
    old = {t._trial_id for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
           if t.datetime_start is not None and t.datetime_start < started}
    failed = [trial_id for trial_id in old - _trials_with_a_heartbeat(rdb, old) if _fail(storage, trial_id)]
    retry = storage.get_heartbeat_stale_trial_callback()
    for trial_id in failed if retry is not None else []:
        retry(study, storage.get_trial(trial_id))


def _trials_with_a_heartbeat(storage: optuna.storages.RDBStorage, trial_ids: set[int]) -> set[int]:
    """Which of ``trial_ids`` have ever recorded a heartbeat (Optuna offers no public query for it)."""
    if not trial_ids:
        return set()
    from optuna.storages._rdb.models import TrialHeartbeatModel
    from sqlalchemy.orm import Session

    with Session(storage.engine) as session:
        rows = session.query(TrialHeartbeatModel.trial_id).filter(TrialHeartbeatModel.trial_id.in_(trial_ids))
        return {trial_id for (trial_id,) in rows}


def _fail(storage: optuna.storages.BaseStorage, trial_id: int) -> bool:
    """Mark a RUNNING trial FAIL; False when another process finished or failed it first."""
    try:
        return storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def enqueue(study: optuna.Study, points: list[dict[str, Any]], recipe_path: str | None = None) -> None:
    """Enqueue warm-start points once (``skip_if_exists`` makes a resume a no-op), marked as warm starts (from
    ``recipe_path`` when given)."""
    for point in points:
        study.enqueue_trial(point, user_attrs=record.warm_start_attrs(recipe_path), skip_if_exists=True)
