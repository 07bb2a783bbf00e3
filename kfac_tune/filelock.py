"""An inter-process lock for setting up a SQLite database that several processes may open at the same moment.

Creating a fresh SQLite store is check-then-create (Optuna's and MLflow's schema creation and alembic stamps,
a study, its MLflow parent run): two ``kfac-tune search`` processes started together on the same new files each
see no table and both create it, and one fails ("table ... already exists"). An exclusive ``flock`` on a lock
file beside the database serialises them; the kernel releases it if the holder dies. The lock file is never
removed (removing it would let a third process lock a new file while the second holds the old one).
"""
from __future__ import annotations

import contextlib
import fcntl
import urllib.parse
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created, with its directory, if missing) for the ``with`` block.

    A directory that cannot hold the lock (read-only, not writable by this user, or a file where a directory
    should be) cannot hold the store either: ``FileError``, one paragraph naming it, before anything else is
    tried (it was a 30-line traceback)."""
    from kfac_tune.files import FileError

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+b")  # noqa: SIM115 - closed by the with below
    except OSError as error:
        raise FileError(f"cannot set up a store in {path.parent}: creating {path.name} there failed "
                        f"({error.strerror or error}); expected a directory you can write to: choose another "
                        f"with --storage or --tracking-uri, or make it writable") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` URL (relative to the working directory, as SQLAlchemy reads
    it), or None for other URLs and in-memory databases."""
    parsed = urllib.parse.urlparse(url)
    if not parsed.scheme.startswith("sqlite") or parsed.path in ("", "/", "/:memory:"):
        return None
    return Path(parsed.path[1:]).expanduser().resolve()


@contextlib.contextmanager
def sqlite_setup_lock(url: str) -> Iterator[None]:
    """For a ``sqlite:///`` URL, hold ``<database>.setup-lock`` for the block; for anything else, nothing."""
    database = sqlite_file(url)
    if database is None:
        yield
        return
    with locked(database.with_name(database.name + ".setup-lock")):
        yield
