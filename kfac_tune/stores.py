"""Checks on the Optuna storage URL before anything opens it: one paragraph and exit 2 instead of a traceback.

A storage URL comes from ``--storage``, ``KFAC_TUNE_STORAGE`` or the YAML's ``storage``. Opened as is, a URL
whose database driver is not installed raises an ``ImportError`` from deep inside Optuna, and an SQLite file
that is also the MLflow tracking store gets MLflow's tables, after which Optuna reports a misleading "upgrade
optuna" schema error and the file can no longer hold the study. Both are refused here, up front.
"""
from __future__ import annotations

from pathlib import Path

from kfac_tune.secrets import display_url

# where a study and its tracking go when neither flag, environment nor config names a store (kfac_tune.settings)
DEFAULT_STORAGE = "sqlite:///kfac_tune.db"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
POSTGRES_EXTRA = "pip install 'kfac-tune[postgres]'"


class StoreError(ValueError):
    """A storage or tracking URL that cannot be used; the message is the whole paragraph."""


class StudyNotFound(LookupError):
    """``--study`` names no study in the storage (or it was omitted and the storage holds several)."""


def check_storage_url(url: str) -> None:
    """Raise ``StoreError`` if ``url`` is not an SQLAlchemy URL or its database driver is not installed."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    shown = display_url(url)
    check_database_file(url, "storage")
    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except NoSuchModuleError:  # before ArgumentError, its base class
        raise StoreError(f"storage {shown}: unknown database kind {parsed.drivername!r}; expected e.g. "
                         f"sqlite:///PATH or postgresql+psycopg2://USER@HOST/DB") from None
    except (ArgumentError, ValueError) as error:
        raise StoreError(f"storage {shown!r} is not a database URL ({error}); expected e.g. sqlite:///PATH or "
                         f"postgresql+psycopg2://USER@HOST/DB") from None
    try:
        dialect.import_dbapi()
    except ImportError as error:
        module = error.name or parsed.drivername
        if module == "psycopg2":
            how = POSTGRES_EXTRA
        elif parsed.get_backend_name() == "postgresql":
            how = f"pip install {module}, or write the URL as postgresql+psycopg2://... and {POSTGRES_EXTRA}"
        else:
            how = f"pip install {module}"
        raise StoreError(f"storage {shown} needs the Python database driver {module!r}, which is not installed: "
                         f"{how}") from None


def check_database_file(url: str, what: str) -> None:
    """Raise ``StoreError`` if ``url`` is ``sqlite:///PATH`` and PATH exists but is not a regular file (a
    directory, a FIFO, a device): SQLite cannot open it, and MLflow's store retried that for about 108 s before
    failing. ``what`` names the store in the message."""
    import stat

    path = _sqlite_file(url)
    if path is None:
        return
    try:
        mode = path.stat().st_mode
    except OSError:  # missing (created on first use), or its directory cannot be: the set-up lock says which
        return
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise StoreError(f"{what} {display_url(url)}: {path} is {kind}; expected sqlite:///PATH naming a database "
                         f"file (created if missing)")


def check_distinct_stores(storage_url: str, tracking_uri: str | None) -> None:
    """Refuse one SQLite file as both the Optuna storage and the MLflow tracking store: their schemas collide."""
    if tracking_uri is None:
        return
    storage_file, tracking_file = _sqlite_file(storage_url), _sqlite_file(tracking_uri)
    if storage_file is not None and storage_file == tracking_file:
        raise StoreError(f"the Optuna storage and the MLflow tracking store are the same SQLite file "
                         f"({storage_file}); their tables would collide and the file could no longer hold the "
                         f"study. Use two files, e.g. --storage sqlite:///kfac_tune.db --tracking-uri "
                         f"sqlite:///mlflow.db")


def _sqlite_file(url: str) -> Path | None:
    if not url.startswith("sqlite:///") or url.startswith("sqlite:///:memory:"):
        return None
    path = url.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path).expanduser().resolve() if path else None
