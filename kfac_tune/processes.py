"""Child processes that live and die with kfac-tune: one mechanism for the UI server, search workers and ranks.

Every process kfac-tune starts (the ``mlflow server`` behind ``kfac-tune ui`` and its uvicorn worker, the
``search --jobs N`` workers, the ranks of a data-parallel trial) follows three rules, so that nothing outlives
the command that started it:

* **Its own process group.** The child leads a new group and everything it starts joins it, so
  :func:`stop` reaches grandchildren too (``mlflow server`` starts uvicorn itself), and a Ctrl-C at the
  terminal reaches kfac-tune alone, which then stops its groups in order (workers first fail their running
  trials) instead of every process receiving it at once.
* **It dies with its parent.** :func:`die_with_parent` asks the kernel (``PR_SET_PDEATHSIG``) to signal the
  child when its parent dies, SIGKILL included; a watchdog thread polling the parent's pid does it where
  ``prctl`` does not exist. The death signal fires when the parent *thread* that started the child exits, so
  children are started from the thread that waits for them.
* **SIGTERM and SIGHUP mean Ctrl-C.** :func:`interrupt_on_signals` turns them into ``KeyboardInterrupt`` in
  kfac-tune and its workers, so a process manager's SIGTERM or a closed terminal's SIGHUP runs the same
  clean-up as Ctrl-C: running trials are failed and every group started is stopped.

An external program (``mlflow server``) cannot run that code itself, so it runs under a small supervisor,
``python -m kfac_tune.processes PARENT_PID -- COMMAND...`` (:func:`supervised`), which applies the rules and
stops the whole group when it is told to or when kfac-tune dies.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from types import FrameType
from typing import Any, Protocol

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1
_WATCHDOG_POLL_S = 0.5
_STOP_GRACE_S = 30.0


class Child(Protocol):
    """A started child: a ``subprocess.Popen`` or a ``multiprocessing.Process``."""

    pid: Any


# ------------------------------------------------------------------------------------------------ child side
def die_with_parent(parent: int, signum: int = signal.SIGTERM, grace_s: float = _STOP_GRACE_S) -> None:
    """In a child, first thing: receive ``signum`` as soon as ``parent`` dies, however it dies.

    The request is made after the child started, so the parent may already be gone (the child is then
    re-parented): the pid is checked again after the request and the signal sent at once if so. A signal the
    child handles (SIGTERM as Ctrl-C: fail the running trial, then exit) could leave it stuck with no one left
    to insist, so a watchdog thread also notices the parent's death and, ``grace_s`` later, SIGKILLs the
    child's group (or the child alone); where ``prctl`` does not exist the watchdog sends ``signum`` as well.
    """
    linux = sys.platform.startswith("linux")
    if linux:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    if signum != signal.SIGKILL or not linux:
        threading.Thread(target=_watch_parent, args=(parent, signum, not linux, grace_s), daemon=True,
                         name="kfac-tune-watchdog").start()
    if os.getppid() != parent:
        os.kill(os.getpid(), signum)


def _watch_parent(parent: int, signum: int, send: bool, grace_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(_WATCHDOG_POLL_S)
    if send:
        os.kill(os.getpid(), signum)
    time.sleep(grace_s)
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def adopt(parent: int, signum: int = signal.SIGTERM, *, interrupt: bool = True) -> None:
    """A child kfac-tune started, first thing: lead a new process group and die with ``parent``; with
    ``interrupt``, treat SIGTERM and SIGHUP as Ctrl-C (a worker fails its running trial before it exits)."""
    try:
        os.setpgid(0, 0)
    except PermissionError:  # already a session leader (started with start_new_session)
        pass
    if interrupt:
        interrupt_on_signals()
    die_with_parent(parent, signum)


# Set by every interrupt handler before it raises. Python runs a signal handler at the next bytecode of the main
# thread, which can be inside a gc or weakref callback (SQLAlchemy's, for one) whose exceptions the interpreter
# prints and drops: the ``KeyboardInterrupt`` is then lost. Long work polls :func:`interrupt_pending` at safe
# points (each evaluation of a trial) and raises it again, so one Ctrl-C is enough whatever it lands in.
_pending = False


def note_interrupt(pending: bool = True) -> None:
    """Record (or clear, at the start of a command) that an interrupt was raised in this process."""
    global _pending
    _pending = pending


def _drop_silently(unraisable: Any) -> None:
    """``sys.unraisablehook`` that keeps a dropped ``KeyboardInterrupt`` off the terminal (it is re-raised at the
    next safe point, see :func:`interrupt_pending`) and reports anything else as Python does."""
    if not isinstance(unraisable.exc_value, KeyboardInterrupt):
        sys.__unraisablehook__(unraisable)


def note_interrupts() -> None:
    """Start a command that re-raises dropped interrupts: clear the record and silence the drop's report."""
    note_interrupt(False)
    sys.unraisablehook = _drop_silently


def interrupt_pending() -> bool:
    """Whether an interrupt was raised in this process (perhaps swallowed where it landed)."""
    return _pending


def _interrupt(signum: int, frame: FrameType | None) -> None:
    note_interrupt()
    raise KeyboardInterrupt(signal.Signals(signum).name)


def interrupt_on_signals() -> None:
    """Turn SIGTERM and SIGHUP into ``KeyboardInterrupt`` in this process (main thread only), as SIGINT is."""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, _interrupt)


@contextlib.contextmanager
def second_interrupt_ignored() -> Iterator[None]:
    """Let the first Ctrl-C interrupt a search and ignore the ones after it.

    The first one makes Optuna fail the running trial and the command print how to resume; a second one a moment
    later would land inside that clean-up (Optuna's ``tell``, the storage's commit) and end the command with
    Optuna's traceback, or skip the resume message. Once interrupted, SIGINT stays ignored until the process
    exits.
    """
    interrupted = False

    def on_interrupt(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupted
        interrupted = True
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # in the kernel: holds through interpreter shutdown too
        note_interrupt()  # re-raised at the next evaluation if it lands where Python drops it
        raise KeyboardInterrupt

    note_interrupts()
    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        if not interrupted:
            signal.signal(signal.SIGINT, previous)


# ------------------------------------------------------------------------------------------------ exiting
# A finished command's process ends in os._exit once the atexit handlers have run, skipping Python's teardown of
# torch, MLflow and Optuna's modules (about 2 s after a search). Signal handlers are reset to the kernel's default
# during that teardown, so a Ctrl-C then killed the process by the signal, without a word, exit status -2, after
# a search whose recipe was already written. None: no command has finished (an import, a test): exit as Python does.
_finished_status: int | None = None


def exit_fast_when_done() -> None:
    """Register the process's last atexit handler (call before anything imports torch or MLflow, whose handlers
    must run first: atexit runs them in reverse order); it ends the process once :func:`command_finished` said so."""
    atexit.register(_exit_without_teardown)


def command_finished(status: int) -> None:
    """The command is done with ``status``: from here a Ctrl-C interrupts nothing; it is told so, not killed."""
    global _finished_status
    _finished_status = status
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, _after_the_command)


def _after_the_command(signum: int, frame: FrameType | None) -> None:
    print(f"{signal.Signals(signum).name} after the command had finished: nothing was interrupted, its results "
          f"are kept.", file=sys.stderr, flush=True)


def _exit_without_teardown() -> None:
    if _finished_status is None:
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: nothing left to say
            stream.flush()
    os._exit(_finished_status)


# ------------------------------------------------------------------------------------------------ parent side
def start(command: Sequence[str], **popen: Any) -> subprocess.Popen[Any]:
    """Start an external ``command`` under the supervisor: in its own group, stopped with kfac-tune."""
    supervisor = [sys.executable, "-m", "kfac_tune.processes", str(os.getpid()), "--", *command]
    return subprocess.Popen(supervisor, start_new_session=True, **popen)


def signal_group(child: Child, signum: int) -> None:
    """Send ``signum`` to the group ``child`` leads, or to ``child`` alone while it has not made its group yet
    (a spawned interpreter is still starting): never to kfac-tune's own group."""
    if child.pid is None:
        return
    try:
        if os.getpgid(child.pid) == child.pid:
            os.killpg(child.pid, signum)
        else:
            os.kill(child.pid, signum)
    except ProcessLookupError:
        _kill_group_remains(child)


def _kill_group_remains(child: Child) -> None:
    """SIGKILL what is left of the group ``child`` led after it exited (a server's worker it did not stop)."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait(child: Child, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for ``child`` to exit (reaping it); whether it did."""
    if isinstance(child, subprocess.Popen):
        try:
            child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True
    child.join(timeout_s)
    return not child.is_alive()


def stop(children: Iterable[Child], signum: int = signal.SIGTERM, grace_s: float = _STOP_GRACE_S) -> None:
    """Stop ``children`` and their groups: ``signum`` to every group at once, up to ``grace_s`` for them to exit
    on their own (a worker fails its running trial), then SIGKILL for every group member still there.

    A second Ctrl-C, SIGTERM or SIGHUP while this waits cuts the grace short instead of abandoning the stop
    half-way (which would leave the groups running).
    """
    children = [c for c in children if c.pid is not None]
    with _hurry_on_signals() as hurry:
        for child in children:
            if not _wait(child, 0):
                signal_group(child, signum)
        deadline = time.monotonic() + grace_s
        for child in children:
            while not _wait(child, 0.2):
                if hurry.is_set() or time.monotonic() >= deadline:
                    signal_group(child, signal.SIGKILL)
                    _wait(child, _STOP_GRACE_S)
                    break
            _kill_group_remains(child)


@contextlib.contextmanager
def _hurry_on_signals() -> Iterator[threading.Event]:
    """While stopping children: the stop signals set an event instead of raising (main thread only)."""
    hurry = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield hurry
        return
    previous = {signum: signal.signal(signum, lambda *_: hurry.set()) for signum in STOP_SIGNALS}
    try:
        yield hurry
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# ------------------------------------------------------------------------------------------------ supervisor
def supervised(parent: int, command: Sequence[str]) -> int:
    """Run ``command`` in this process's group and stop the whole group when told to (SIGINT, SIGTERM, SIGHUP)
    or when ``parent`` dies; return the command's exit code.

    Runs as ``python -m kfac_tune.processes PARENT -- COMMAND...``, started by :func:`start`.
    """
    stopping = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    for signum in STOP_SIGNALS:
        signal.signal(signum, request_stop)
    die_with_parent(parent, signal.SIGTERM)
    child = subprocess.Popen(command)
    while child.poll() is None and not stopping.is_set() and os.getppid() == parent:
        stopping.wait(_WATCHDOG_POLL_S)
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)  # this process is in the group it signals
    os.killpg(0, signal.SIGTERM)  # the command, and whatever it started that is still there
    try:
        child.wait(timeout=_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    if os.getppid() != parent:  # no one is left to clean up after this process: take the group down with it
        os.killpg(0, signal.SIGKILL)
    return child.returncode if child.returncode is not None else 1


def _main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m kfac_tune.processes PARENT_PID -- COMMAND...", file=sys.stderr)
        return 2
    return supervised(int(argv[0]), argv[2:])


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
