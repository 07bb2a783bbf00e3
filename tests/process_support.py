"""Finding the processes a test started, from /proc: every process kfac-tune starts inherits the environment,
so a variable set before starting it marks all of them, grandchildren and orphans re-parented to PID 1
included (a parent-pid walk would lose those)."""
from __future__ import annotations

import os
import time
from pathlib import Path

SESSION_VARIABLE = "KFAC_TUNE_TEST_SESSION"
HAS_PROC = Path("/proc/self/environ").exists()


def _state(pid: int) -> str | None:
    """The process's state letter (``Z`` for a zombie), or None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    return _state(pid) not in (None, "Z")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def marked(variable: str, value: str) -> list[int]:
    """Live processes (other than this one) whose environment holds ``variable=value``."""
    needle = f"{variable}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0") and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def children(parent: int) -> list[int]:
    """Live direct children of ``parent``."""
    return [int(e.name) for e in Path("/proc").iterdir()
            if e.name.isdigit() and parent_of(int(e.name)) == parent and alive(int(e.name))]


def wait_gone(find, deadline_s: float = 60.0) -> list[int]:
    """Poll ``find()`` until it returns nothing or ``deadline_s`` passes (a liveness bound, not a speed target);
    what is still there."""
    deadline = time.monotonic() + deadline_s
    while (left := find()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


HOLD_VARIABLE = "KFAC_TUNE_TEST_HOLD"


def held_mlp(input_shape: tuple[int, ...], num_classes: int) -> object:
    """A ``model.callable``: a small MLP whose training forward pass waits forever in a process started with
    ``KFAC_TUNE_TEST_HOLD=1``, so a test can kill a search mid-trial without racing a trial's end, while the
    same config trains normally elsewhere (the variable is not part of the config). The preflight's forward pass
    runs in eval mode and goes through."""
    import math

    from torch import nn

    class Held(nn.Sequential):
        def forward(self, x):  # type: ignore[no-untyped-def]
            while os.environ.get(HOLD_VARIABLE) == "1" and self.training:
                time.sleep(0.1)
            return super().forward(x)

    return Held(nn.Flatten(), nn.Linear(math.prod(input_shape), 16), nn.ReLU(), nn.Linear(16, num_classes))
