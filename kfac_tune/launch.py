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

import os
import pickle
import queue
import socket
import tempfile
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 300.0


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


def run_local(fn: Callable[..., Any], nprocs: int, *args: Any, backend: Optional[str] = None,
              timeout_s: float = DEFAULT_TIMEOUT_S, serve: Optional[Callable[[Any], Any]] = None) -> list[Any]:
    """Run ``fn(*args)`` as ranks ``0..nprocs-1`` of one process group on this machine; return their results.

    ``fn`` and ``args`` must be picklable (``fn`` defined at module level): the processes are spawned, not
    forked, so that CUDA and the parent's threads are safe.  An exception in any rank stops the others and is
    re-raised here (as ``torch.multiprocessing.ProcessRaisedException``); so does an exception in the parent
    (Ctrl-C included), after the ranks are terminated.  Results travel through files, so that large ones cannot
    block a pipe.

    With ``serve``, ``fn`` is called as ``fn(channel, *args)``: rank 0 gets a :class:`Channel` whose questions
    ``serve`` answers here, in the parent, while the ranks run; the other ranks get ``None``.
    """
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(nprocs),
           "LOCAL_WORLD_SIZE": str(nprocs)}
    channel = Channel(mp.get_context("spawn")) if serve is not None else None
    with tempfile.TemporaryDirectory(prefix="kfac-tune-launch-") as tmp:
        ranks = mp.start_processes(_rank_main, args=(fn, args, env, backend, timeout_s, tmp, channel),
                                   nprocs=nprocs, join=False, start_method="spawn")
        try:
            while not ranks.join(timeout=0 if channel else None):
                if channel is not None and serve is not None:
                    channel.serve_pending(serve, timeout_s=0.05)
        finally:
            for process in ranks.processes:
                if process.is_alive():
                    process.terminate()
                process.join()
        return [pickle.loads((Path(tmp) / f"{rank}.pkl").read_bytes()) for rank in range(nprocs)]


def _rank_main(rank: int, fn: Callable[..., Any], args: tuple[Any, ...], env: dict[str, str],
               backend: Optional[str], timeout_s: float, results: str, channel: Optional[Channel]) -> None:
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    with process_group_from_env(backend, timeout_s):
        result = fn(*((channel if rank == 0 else None,) if channel else ()), *args)
    (Path(results) / f"{rank}.pkl").write_bytes(pickle.dumps(result))
