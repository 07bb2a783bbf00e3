"""Optional per-phase timing of K-FAC's work, for benchmarks and for users who want to know where time goes.

Disabled by default: then every ``phase`` is a no-op and nothing synchronises.  Enabled, the device is
synchronised around each outermost phase so that GPU time is attributed to the phase that queued it.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch

PHASES = ("statistics", "inverses", "precondition", "update")


class PhaseTimer:
    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled = enabled
        self.device = device
        self.totals: dict[str, float] = defaultdict(float)
        self._depth = 0

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled or self._depth:
            yield
            return
        self._sync()
        start = time.perf_counter()
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            self._sync()
            self.totals[name] += time.perf_counter() - start

    def reset(self) -> None:
        self.totals.clear()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
