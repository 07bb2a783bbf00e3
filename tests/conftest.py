"""Shared fixtures: small real data sets, float64 helpers, and the checks that no test leaves a process behind
or a file in the checkout."""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis.configuration import set_hypothesis_home_dir

from tests.checkout_support import CHECKOUT, file_changes, repository_files
from tests.process_support import HAS_PROC, SESSION_VARIABLE, cmdline, marked, parent_of, wait_gone


# Hypothesis keeps its example database and caches (from collection on) in ./.hypothesis of the working directory,
# the checkout; this run's temporary directory holds them instead (a failing example prints its seed to rerun).
HYPOTHESIS_HOME = Path(tempfile.mkdtemp(prefix="kfac-tune-tests-hypothesis-"))


def pytest_configure(config: pytest.Config) -> None:
    set_hypothesis_home_dir(HYPOTHESIS_HOME)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(HYPOTHESIS_HOME, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def no_test_writes_into_the_checkout() -> Iterator[None]:
    """Fail the run if a file of the checkout was created, changed or removed while the tests ran: a command run
    without ``-o`` or from the checkout's directory writes its recipe, store or plot there, where it is mistaken
    for a shipped file (and committed: ``recipes/model.yaml`` once was). Tests write into ``tmp_path``.
    Editing the repository while the suite runs trips it too; rerun then."""
    before = repository_files(CHECKOUT)
    yield
    changes = file_changes(before, repository_files(CHECKOUT))
    assert not changes, "the tests wrote into the checkout (write into tmp_path instead):\n" + "\n".join(changes)


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_session():
    """Fail the run if a process started by a test (a CLI, a server, a worker, a rank, a browser) is still
    alive at the end: they all inherit a variable unique to this session, so orphans are found too.

    The multiprocessing resource tracker of this pytest process is the one exception: it is the interpreter's
    own helper (started by the first ``multiprocessing`` queue) and ends when pytest does.
    """
    token = uuid.uuid4().hex
    os.environ[SESSION_VARIABLE] = token
    yield
    if not HAS_PROC:
        return

    def left() -> list[int]:
        return [pid for pid in marked(SESSION_VARIABLE, token)
                if not (parent_of(pid) == os.getpid() and "resource_tracker" in cmdline(pid))]

    survivors = wait_gone(left, deadline_s=30)
    described = [f"{pid}: {cmdline(pid)[:200]}" for pid in survivors]
    for pid in survivors:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not survivors, "processes started by tests are still running:\n" + "\n".join(described)


@pytest.fixture(autouse=True)
def settings_environment_is_left_as_found() -> Iterator[None]:
    """The environment outranks a config's YAML (``kfac_tune.settings``), so a command that leaves
    ``MLFLOW_TRACKING_URI`` or ``KFAC_TUNE_STORAGE`` in ``os.environ`` (MLflow's fluent API exports the former)
    silently redirects every later command in the process. Fail the test that leaks one, not a later victim."""
    from kfac_tune.settings import STORAGE_ENV, TRACKING_URI_ENV

    before = {name: os.environ.get(name) for name in (STORAGE_ENV, TRACKING_URI_ENV)}
    yield
    after = {name: os.environ.get(name) for name in before}
    assert after == before, f"the test changed the environment that settings read: {before} -> {after}"


@pytest.fixture(scope="session")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits, flattened to 64 features in [0, 1]: real data, always offline."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target, dtype=torch.long)


@pytest.fixture
def float64_default():
    """Exactness is checked in float64; the default dtype is restored so other tests see float32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny networks train fastest (and least disturbed by other jobs) on one torch thread; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
