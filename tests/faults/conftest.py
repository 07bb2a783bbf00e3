"""Helpers shared by the fault scenarios: tiny configs, the CLI in-process and as a process, bounded waits,
a real MLflow server, storage inspection.

Every wait is bounded and polls state (the study's trials, a file, a port) instead of sleeping for a fixed time,
because the machines that run this suite are small and shared: a scenario may be slow, never flaky.
"""
from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import optuna
import pytest
from click.testing import CliRunner, Result

from kfac_tune.cli import cli
from kfac_tune.launch import free_port
from tests.faults import fault_models
from tests.search_support import load_study, stop, write_config


T = TypeVar("T")
FAULT_MODELS = "tests.faults.fault_models"
WAIT_S = 240.0  # the longest any scenario waits for a state: generous for a loaded 2-core machine

optuna.logging.set_verbosity(optuna.logging.WARNING)


def fault_config(tmp_path: Path, factory: str | None = None, *, trials: int = 2, tracking: bool = False,
                 **sections: Any) -> Path:
    """The digits MLP test config with ``model.callable`` set to one of :mod:`fault_models` (``factory`` plus its
    kwargs in ``model_kwargs``), no pruner (only faults end trials early) and ``trials`` finished trials."""
    model_kwargs = sections.pop("model_kwargs", {})
    if factory is not None:
        sections["model"] = {"callable": f"{FAULT_MODELS}:{factory}", "kwargs": model_kwargs}
    search = {"trials": trials, "pruner": "none", **sections.pop("search", {})}
    return write_config(tmp_path, search=search, tracking={"enabled": tracking}, **sections)


def storage_of(tmp_path: Path) -> str:
    """The Optuna storage ``fault_config`` points at."""
    return f"sqlite:///{tmp_path / 'study.db'}"


def mlflow_store_of(tmp_path: Path) -> str:
    """The MLflow store ``fault_config`` points at."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def invoke(*args: str) -> Result:
    """Run the CLI in this process (faster than a subprocess; module globals of fault models are visible)."""
    fault_models.reset()
    return CliRunner().invoke(cli, list(args))


def trials_of(tmp_path: Path, study: str = "model") -> list[optuna.trial.FrozenTrial]:
    return load_study(storage_of(tmp_path), study).get_trials()


def wait_for(probe: Callable[[], T | None], what: str, timeout_s: float = WAIT_S,
             alive: subprocess.Popen[str] | None = None) -> T:
    """Poll ``probe`` until it returns something truthy; fail (never hang) after ``timeout_s`` or when ``alive``
    exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if alive is not None and alive.poll() is not None:
            output = alive.stdout.read() if alive.stdout else ""
            raise AssertionError(f"the process ended (exit {alive.returncode}) before {what}:\n{output[-3000:]}")
        try:
            found = probe()
        except Exception:  # the storage or study may not exist yet
            found = None
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def states_seen(tmp_path: Path, *wanted: str) -> bool:
    """Whether the study holds trials in every state of ``wanted`` (e.g. COMPLETE and RUNNING)."""
    states = {t.state.name for t in trials_of(tmp_path)}
    return set(wanted) <= states


def listening_addresses(port: int) -> set[str]:
    """IPv4 addresses with a socket listening on ``port`` (from /proc/net/tcp; state 0A is LISTEN)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            address, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:
                continue
            if len(address) == 8:  # little-endian IPv4
                found.add(".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0)))
            else:
                found.add("::" if set(address) == {"0"} else address)
    return found


@contextmanager
def mlflow_server(store_uri: str) -> Iterator[tuple[str, int, subprocess.Popen[bytes]]]:
    """A real ``mlflow server`` (kfac-tune's ``serve_ui``, default host) on a free port; stopped on exit."""
    from kfac_tune.tracking import serve_ui

    port = free_port()
    process = serve_ui(store_uri, port=port)
    try:
        yield f"http://127.0.0.1:{port}", port, process
    finally:
        stop(process)


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in ``tmp_path`` (default recipes/ and stores land there) and return it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@contextmanager
def small_tmpfs(mount_point: Path, size: str = "64k") -> Iterator[Path]:
    """A tiny tmpfs at ``mount_point`` (a real filesystem that fills up or turns read-only on demand); skips the
    scenario where this process may not mount (not root, or no CAP_SYS_ADMIN in a container)."""
    mount_point.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                             capture_output=True, text=True, timeout=30)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)


def fill(directory: Path) -> None:
    """Write into ``directory`` until its filesystem reports ENOSPC."""
    with open(directory / "filler", "wb", buffering=0) as handle:  # unbuffered: close() has nothing to flush
        try:
            while handle.write(b"\0" * 4096):
                pass
        except OSError:
            pass


def remount_read_only(mount_point: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True, capture_output=True, timeout=30)
