"""A throwaway PostgreSQL server for the many-workers test and the storage benchmark.

The cluster is Debian's ``postgresql`` binaries run by hand (``initdb`` + ``pg_ctl``), not the system service: a
temp data directory, 127.0.0.1 on a free port and the unix socket inside the temp directory, so nothing on the
machine is touched and parallel runs never collide. ``initdb`` refuses to run as root, so as root the cluster runs
as the ``postgres`` system user (which the Debian package creates).

Connections from 127.0.0.1 need a password (scram-sha-256); the URL carries none and clients read ``PGPASSWORD``,
the way the README tells users to run workers, so that path is exercised too.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from kfac_tune.launch import free_port

USER, PASSWORD = "kfac", "kfac-test-password"
START_TIMEOUT_S = 120  # pg_ctl -w waits this long: a loaded 2-core machine can take a while


class PostgresUnavailable(RuntimeError):
    """The binaries or the user to run them as are missing: callers skip (tests) or leave PostgreSQL out."""


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    password: str
    directory: Path

    def url(self, database: str = USER) -> str:
        """SQLAlchemy URL without the password (libpq takes it from ``PGPASSWORD``)."""
        return f"postgresql+psycopg2://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create ``name`` (owned by the test user) and return its URL."""
        _check([str(bin_dir() / "createdb"), "-h", self.host, "-p", str(self.port), "-U", self.user, name],
               env={**os.environ, "PGPASSWORD": self.password})
        return self.url(name)


def bin_dir() -> Path:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding ``initdb``, else ``pg_ctl``'s directory on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise PostgresUnavailable("no PostgreSQL server binaries (initdb): apt-get install postgresql")


def _as_owner() -> list[str]:
    """Prefix running a command as the cluster's owner: ``postgres`` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailable("running as root and there is no 'postgres' user to own the cluster") from None
    runuser = shutil.which("runuser")
    if runuser is None:
        raise PostgresUnavailable("running as root and runuser is missing")
    return [runuser, "-u", "postgres", "--"]


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """Start a fresh cluster with a database named like its user; stop it and delete its files on exit.

    Raises :class:`PostgresUnavailable` before touching anything when it cannot run here.
    """
    tools, owner = bin_dir(), _as_owner()
    directory = Path(tempfile.mkdtemp(prefix="kfac-pg-"))
    data, log, password_file = directory / "data", directory / "server.log", directory / "password"
    password_file.write_text(PASSWORD)
    if owner:
        os.chmod(directory, 0o700)
        shutil.chown(directory, "postgres", "postgres")
        shutil.chown(password_file, "postgres", "postgres")
    port = free_port()
    started = False
    try:
        _check([*owner, str(tools / "initdb"), "-D", str(data), "-U", USER, f"--pwfile={password_file}",
                "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync", "--no-instructions"])
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {directory} -c max_connections=200"
        _check([*owner, str(tools / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w",
                "-t", str(START_TIMEOUT_S), "start"], log=log)
        started = True
        server = PostgresServer("127.0.0.1", port, USER, PASSWORD, directory)
        server.create_database(USER)
        yield server
    finally:
        if started:
            subprocess.run([*owner, str(tools / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                           check=False, capture_output=True, timeout=START_TIMEOUT_S)
        shutil.rmtree(directory, ignore_errors=True)


def _check(command: list[str], log: Path | None = None, env: dict[str, str] | None = None) -> None:
    """Run a server tool; on failure raise with its output and the server log's tail (why it did not start).
    The working directory is /tmp because the ``postgres`` user may not be able to read ours."""
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=START_TIMEOUT_S,
                          cwd=tempfile.gettempdir(), env=env)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}{done.stderr}{tail}")


@pytest.fixture
def postgres(monkeypatch: pytest.MonkeyPatch) -> Iterator[PostgresServer]:
    """A running throwaway server, ``PGPASSWORD`` set for this process and its children; skips where PostgreSQL
    cannot run (binaries or the ``postgres`` user missing) or the psycopg2 driver is not installed."""
    pytest.importorskip("psycopg2", reason="the postgres extra is not installed: pip install '.[postgres]'")
    try:
        with postgres_server() as server:
            monkeypatch.setenv("PGPASSWORD", server.password)
            yield server
    except PostgresUnavailable as reason:
        pytest.skip(str(reason))
