"""Models that misbehave on cue, named as ``model.callable`` by the fault scenarios.

Each factory is called once by the preflight (build 0) and once per trial (build 1, 2, ...) in the process that
runs the trials, so "build 1" is the first trial's model. Module globals record what the scenarios assert on;
they are per process, so only in-process (CliRunner) scenarios read them.
"""
from __future__ import annotations

import os
import time
import weakref
from itertools import count
from pathlib import Path

import torch
from torch import nn

_builds = count()
BUILT: list[weakref.ref[nn.Module]] = []
# For every build: which earlier models were still alive when it was made (all False = memory was released).
ALIVE_AT_BUILD: list[list[bool]] = []
NON_FINITE_PARAMETERS_SEEN: list[int] = []  # builds whose forward ever saw a non-finite parameter
FACTORY_CALLS: list[str] = []  # every call of exiting_mlp, including those that exit before building


class _FaultyMLP(nn.Module):
    """64 -> 16 -> classes MLP whose forward calls ``fault(call)`` on its hidden activations."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, build: int, fault) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        features = 1
        for size in input_shape:
            features *= size
        self.hidden, self.out = nn.Linear(features, 16), nn.Linear(16, num_classes)
        self.build, self.fault, self.calls = build, fault, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if not all(bool(torch.isfinite(p).all()) for p in self.parameters()):
            NON_FINITE_PARAMETERS_SEEN.append(self.build)
        h = torch.relu(self.hidden(x.flatten(1)))
        return self.out(self.fault(self, h))


def _make(input_shape: tuple[int, ...], num_classes: int, fault) -> nn.Module:  # type: ignore[no-untyped-def]
    build = next(_builds)
    ALIVE_AT_BUILD.append([ref() is not None for ref in BUILT])
    model = _FaultyMLP(input_shape, num_classes, build, fault)
    BUILT.append(weakref.ref(model))
    return model


def oom_mlp(input_shape: tuple[int, ...], num_classes: int, oom_build: int = 1, oom_call: int = 3) -> nn.Module:
    """Build ``oom_build`` raises CUDA's out-of-memory error on its ``oom_call``-th forward (mid-training), once."""

    def fault(model: _FaultyMLP, h: torch.Tensor) -> torch.Tensor:
        if model.build == oom_build and model.calls == oom_call:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
        return h

    return _make(input_shape, num_classes, fault)


def overflow_mlp(input_shape: tuple[int, ...], num_classes: int, overflow_build: int = 1,
                 overflow_call: int = 5) -> nn.Module:
    """From its ``overflow_call``-th forward on, build ``overflow_build``'s hidden activations overflow float32
    (inf statistics for K-FAC's factors, NaN/inf loss and gradients)."""

    def fault(model: _FaultyMLP, h: torch.Tensor) -> torch.Tensor:
        if model.build == overflow_build and model.calls >= overflow_call:
            return h * 1e30 * 1e30
        return h

    return _make(input_shape, num_classes, fault)


def gated_mlp(input_shape: tuple[int, ...], num_classes: int, gate: str = "", wait_s: float = 120.0) -> nn.Module:
    """From build 2 (the second trial) on, wait (bounded) until the file ``gate`` exists: lets a scenario act
    between two trials without racing the search. A process waiting there says so with the file
    ``<gate>.waiting.<pid>``, so a scenario knows which processes are mid-trial."""
    build_index = len(BUILT)
    if build_index >= 2 and gate:
        Path(f"{gate}.waiting.{os.getpid()}").touch()
        deadline = time.monotonic() + wait_s
        while not Path(gate).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    return _make(input_shape, num_classes, lambda model, h: h)


def failing_mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Every trial's model (build 1 on) raises on its first forward: a study in which no trial completes."""

    def fault(model: _FaultyMLP, h: torch.Tensor) -> torch.Tensor:
        if model.build >= 1:
            raise RuntimeError("injected failure")
        return h

    return _make(input_shape, num_classes, fault)


def exiting_mlp(input_shape: tuple[int, ...], num_classes: int, where: str = "build", exit_build: int = 1,
                code: int = 0) -> nn.Module:
    """Build ``exit_build`` calls ``sys.exit(code)``: while being built (``where: build``) or in its third forward
    (``where: forward``), as a script's model file might."""
    import sys

    FACTORY_CALLS.append(where)
    if where == "build" and len(FACTORY_CALLS) - 1 == exit_build:
        sys.exit(code)

    def fault(model: _FaultyMLP, h: torch.Tensor) -> torch.Tensor:
        if where == "forward" and model.build == exit_build and model.calls == (1 if exit_build == 0 else 3):
            sys.exit(code)
        return h

    return _make(input_shape, num_classes, fault)


def reset() -> None:
    """Forget earlier builds (each in-process scenario starts counting at the preflight)."""
    global _builds
    _builds = count()
    BUILT.clear()
    ALIVE_AT_BUILD.clear()
    NON_FINITE_PARAMETERS_SEEN.clear()
    FACTORY_CALLS.clear()


__all__ = ["oom_mlp", "overflow_mlp", "gated_mlp", "failing_mlp", "exiting_mlp", "reset"]
