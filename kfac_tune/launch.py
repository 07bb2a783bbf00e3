"""Run a training function in N local processes, as ``torchrun --nproc-per-node N`` would.

A trial that asks for N processes calls :func:`run_local`: it spawns N fresh interpreters with the torchrun
environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``),
initialises one process group in each, runs the function and returns every rank's result.  The function itself is
written for torchrun: under a real ``torchrun`` it can open the same group with :func:`process_group_from_env`, so
one training function serves both launchers.

A trial also needs to talk to its ranks while they train: the parent reports every evaluation to the pruner and to
MLflow, and must be able to stop the ranks when the pruner says so.  ``run_local(..., serve=handler)`` gives rank 0
a :class:`Channel` for that: rank 0 asks, the parent's ``handler`` answers, rank 0 waits for the answer (and shares
it with the other ranks itself, through the process group).
"""
from __future__ import annotations

import gc
import multiprocessing.connection
import os
import pickle
import queue
import signal
import socket
import sys
import tempfile
import time
import traceback
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kfac_tune.processes import adopt, stop

DEFAULT_TIMEOUT_S = 300.0
_TEARDOWN_S = 30.0  # for ranks that reported to leave the group and exit, before they are stopped


def default_backend(local_world_size: int) -> str:
    """NCCL when every local rank can have its own GPU, gloo otherwise."""
    if torch.cuda.is_available() and dist.is_nccl_available() and torch.cuda.device_count() >= local_world_size:
        return "nccl"
    return "gloo"


@contextmanager
def process_group_from_env(backend: Optional[str] = None,
                           timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[None]:
    """Open the default process group from the torchrun environment and close it on exit.

    With NCCL each process takes the GPU of its ``LOCAL_RANK``.  ``timeout_s`` bounds every collective, so that
    ranks that disagree fail instead of hanging a trial.
    """
    backend = backend or default_backend(int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the usual, slightly racy, way to pick one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Channel:
    """Rank 0's line to the process that launched the group: one question, one answer, in turn.

    Made by :func:`run_local` in the parent and inherited by rank 0.  ``ask`` blocks until the parent answers, but
    not forever: if the parent dies (a search worker killed with SIGKILL), the rank notices within a second and
    raises, so no orphaned rank keeps a GPU or a core busy.
    """

    POLL_S = 1.0

    def __init__(self, context: Any) -> None:
        self._questions, self._answers = context.Queue(), context.Queue()
        self._parent = os.getpid()

    def ask(self, question: Any) -> Any:
        """Rank 0: send ``question`` to the parent and return its answer."""
        self._questions.put(question)
        while True:
            try:
                return self._answers.get(timeout=self.POLL_S)
            except queue.Empty:
                if os.getppid() != self._parent:
                    raise RuntimeError("the process that launched this rank is gone") from None

    def serve_pending(self, handler: Callable[[Any], Any], timeout_s: float) -> bool:
        """Parent: answer one question if one arrives within ``timeout_s``; whether one did."""
        try:
            question = self._questions.get(timeout=timeout_s)
        except queue.Empty:
            return False
        self._answers.put(handler(question))
        return True


class RankDied(RuntimeError):
    """A rank exited (killed, crashed) without reporting a result or an exception."""


@dataclass
class _Report:
    """What a rank hands back before it tears its process group down: its result or its exception.

    Written to a file, renamed into place, before the rank leaves the group, so that what a rank raised always
    reaches the parent, whatever happens to the rank afterwards (a crash while a native library shuts down, the
    parent stopping it) and whatever order the ranks exit in. ``at_ns`` (the system-wide monotonic clock)
    orders the exceptions of several ranks: the first one raised is the cause, the others its consequences (a
    peer left a collective).
    """

    ok: bool
    value: Any
    at_ns: int


def run_local(fn: Callable[..., Any], nprocs: int, *args: Any, backend: Optional[str] = None,
              timeout_s: float = DEFAULT_TIMEOUT_S, serve: Optional[Callable[[Any], Any]] = None) -> list[Any]:
    """Run ``fn(*args)`` as ranks ``0..nprocs-1`` of one process group on this machine; return their results.

    ``fn`` and ``args`` must be picklable (``fn`` defined at module level): the processes are spawned, not
    forked, so that CUDA and the parent's threads are safe.  An exception raised by ``fn`` in any rank is
    re-raised here as itself (a rank's traceback is added to it as a note; an exception that cannot be
    pickled arrives as a ``RuntimeError`` carrying its text); when several ranks raise, the first one raised
    wins.  A rank that dies without a word raises :class:`RankDied`.  Either way, and on an exception in the
    parent (Ctrl-C included), every rank is stopped before this returns.  Ranks live in their own process
    group and die with this process (:mod:`kfac_tune.processes`).  Results travel through files, so that
    large ones cannot block a pipe.

    With ``serve``, ``fn`` is called as ``fn(channel, *args)``: rank 0 gets a :class:`Channel` whose questions
    ``serve`` answers here, in the parent, while the ranks run; the other ranks get ``None``.
    """
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(nprocs),
           "LOCAL_WORLD_SIZE": str(nprocs)}
    context = mp.get_context("spawn")
    channel = Channel(context) if serve is not None else None
    with tempfile.TemporaryDirectory(prefix="kfac-tune-launch-") as tmp:
        ranks = [context.Process(target=_rank_main, name=f"kfac-tune-rank-{rank}",
                                 args=(rank, fn, args, env, backend, timeout_s, tmp, channel, os.getpid()))
                 for rank in range(nprocs)]
        try:
            for process in ranks:
                process.start()
            reports = _await_reports(ranks, Path(tmp), channel, serve)
            for process in ranks:  # they reported; let them leave the group and exit on their own
                process.join(_TEARDOWN_S)
        finally:
            stop(ranks, signal.SIGTERM, grace_s=_TEARDOWN_S)
        return [report.value for report in reports]


def _await_reports(ranks: list[Any], results: Path, channel: Optional[Channel],
                   serve: Optional[Callable[[Any], Any]]) -> list[_Report]:
    """Serve rank 0's questions until every rank reported a result; raise what went wrong first otherwise
    (:func:`_raise_verdict`)."""
    while True:
        if channel is not None and serve is not None:
            channel.serve_pending(serve, timeout_s=0.05)
        else:
            multiprocessing.connection.wait([process.sentinel for process in ranks], timeout=1.0)
        exited, reports = _observe(ranks, results)
        failed = [r for r in reports if r is not None and not r.ok]
        if failed and all(_lost_peer(r.value) for r in failed):
            exited, reports = _settle(ranks, results)
        if failed or any(reports[rank] is None for rank in exited):
            _raise_verdict(ranks, reports, exited)
        if all(r is not None for r in reports):
            return reports  # type: ignore[return-value]


_LOST_PEER = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")
_SETTLE_S = 10.0  # how long the other ranks get to report or exit once one reports a lost peer


def _observe(ranks: list[Any], results: Path) -> tuple[list[int], list[Optional[_Report]]]:
    """The ranks that have exited and every rank's report, exits read first: a rank seen exited has had its
    chance to report."""
    exited = [rank for rank, process in enumerate(ranks) if process.exitcode is not None]
    return exited, [_read_report(results, rank) for rank in range(len(ranks))]


def _lost_peer(error: BaseException) -> bool:
    """A collective that failed because another rank left the group: a consequence, never the cause."""
    return isinstance(error, dist.DistNetworkError) or any(text in str(error) for text in _LOST_PEER)


def _settle(ranks: list[Any], results: Path) -> tuple[list[int], list[Optional[_Report]]]:
    """Only lost peers were reported: find out why. A peer killed by a signal closes its sockets while it dies,
    so its survivor's report can reach the parent before the death does: wait (at most ``_SETTLE_S``) until
    every rank has reported or exited."""
    deadline = time.monotonic() + _SETTLE_S
    while True:
        exited, reports = _observe(ranks, results)
        if time.monotonic() >= deadline or all(r is not None or rank in exited for rank, r in enumerate(reports)):
            return exited, reports
        multiprocessing.connection.wait([process.sentinel for process in ranks], timeout=0.1)


def _raise_verdict(ranks: list[Any], reports: list[Optional[_Report]], exited: list[int]) -> NoReturn:
    """Raise, in order: the first exception raised that is not a lost peer, :class:`RankDied` for a rank that
    exited without a word, or the first lost peer."""
    raised = sorted((r for r in reports if r is not None and not r.ok), key=lambda r: r.at_ns)
    causes = [r.value for r in raised if not _lost_peer(r.value)]
    if causes:
        raise causes[0]
    lost = raised[0].value if raised else None
    for rank in exited:
        if reports[rank] is None:
            raise RankDied(f"rank {rank} of {len(ranks)} {_describe_exit(ranks[rank].exitcode)} without "
                           f"reporting a result") from lost
    raise raised[0].value  # called only when a rank raised or died without a word


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _report_path(results: Path, rank: int) -> Path:
    return results / f"{rank}.pkl"


def _read_report(results: Path, rank: int) -> Optional[_Report]:
    try:
        return pickle.loads(_report_path(results, rank).read_bytes())
    except FileNotFoundError:
        return None


def _write_report(results: Path, rank: int, report: _Report) -> None:
    try:
        data = pickle.dumps(report)
    except Exception as error:  # an unpicklable result or exception: its text still reaches the parent
        data = pickle.dumps(_Report(False, RuntimeError(f"rank {rank}: {report.value!r} could not be sent to the "
                                                        f"parent ({error})"), report.at_ns))
    partial = results / f"{rank}.partial"
    partial.write_bytes(data)
    os.replace(partial, _report_path(results, rank))


def _rank_main(rank: int, fn: Callable[..., Any], args: tuple[Any, ...], env: dict[str, str],
               backend: Optional[str], timeout_s: float, results: str, channel: Optional[Channel],
               parent: int) -> None:
    """One rank: report ``fn``'s result or exception, then leave the group.

    After a result every rank waits for the others (a barrier) and destroys the group, with nothing of the
    run (a DistributedDataParallel reducer holding the group, its pending work) left alive: leaving that to
    interpreter shutdown is what aborts a process in gloo's threads ("terminate called without an active
    exception").  After an exception the others may be blocked in a collective this rank will never join, so
    it leaves at once, without a barrier or Python's shutdown; the parent stops the others.
    """
    adopt(parent, signal.SIGKILL, interrupt=False)  # a rank has nothing to clean up
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    group = ExitStack()
    try:
        # joining fails too when a peer has already left and closed the store ("Connection reset by peer"); that
        # is reported like fn's own exceptions, not left to look like a silent death
        group.enter_context(process_group_from_env(backend, timeout_s))
    except Exception as error:
        _fail(results, rank, error)
    with group:
        try:
            value = fn(*((channel if rank == 0 else None,) if channel else ()), *args)
            if isinstance(value, BaseException):  # its traceback would keep the run (and the group) alive
                value = value.with_traceback(None)
            report = _Report(True, value, 0)
        except Exception as error:
            _fail(results, rank, error)
        _write_report(Path(results), rank, report)
        del report, value
        gc.collect()
        dist.barrier()


def _fail(results: str, rank: int, error: Exception) -> NoReturn:
    """Report this rank's exception (with where it was raised) and leave at once, without a barrier or Python's
    shutdown: the others may be blocked in a collective this rank will never join, and the parent stops them."""
    if hasattr(error, "add_note"):  # Python 3.11+
        error.add_note(f"(raised in rank {rank}:\n{''.join(traceback.format_exception(error)).rstrip()})")
    _write_report(Path(results), rank, _Report(False, error.with_traceback(None), time.monotonic_ns()))
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(1)
