"""Helpers shared by the benchmark scripts: the machine line, device clocks, K-FAC's per-phase split, the
Fashion-MNIST autoencoder data, and plots.

Every timing helper synchronises the device before reading the clock, so GPU work is charged to the step that
queued it.  K-FAC's split comes from ``KFAC(..., profile=True)``: ``opt.timer.totals`` holds seconds per phase
(statistics, inverses, precondition, update); the gradient is the closure's time minus the statistics work done
inside it (the capture hooks and the sampled backward pass run during the closure's backward).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

KFAC_PHASES = ("gradient", "statistics", "inverses", "precondition", "update")


# ---------------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform's best guess)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(device: torch.device) -> str:
    """One line naming the hardware and software a number was measured on."""
    parts = [f"cpu={cpu_model()} ({os.cpu_count()} cores)", f"threads={torch.get_num_threads()}",
             f"torch={torch.__version__}", f"device={device}"]
    if device.type == "cuda":
        parts.append(f"gpu={torch.cuda.get_device_name(device)}")
        parts.append(f"tf32={torch.backends.cuda.matmul.allow_tf32}")
    try:
        parts.append(f"load1={os.getloadavg()[0]:.1f}")
    except OSError:
        pass
    return "machine: " + ", ".join(parts)


def setup(device_name: str, threads: int, seed: int = 0) -> torch.device:
    """Pin the thread count, seed torch and return the device (a clear error when CUDA is missing)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    device = torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available on this machine")
    return device


# ----------------------------------------------------------------------------------------------- clocks
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Accumulates the time spent inside ``with watch:`` blocks (device-synchronised at both ends)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.total = 0.0
        self._start = 0.0

    def __enter__(self) -> "Stopwatch":
        sync(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        sync(self.device)
        self.total += time.perf_counter() - self._start


def median(values: Iterable[float]) -> float:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else float("nan")


# ------------------------------------------------------------------------------------------ K-FAC split
@dataclass
class KfacSplit:
    """Per-phase seconds of a profiled K-FAC optimizer over some steps.

    Wrap each closure with :meth:`timed` so the gradient time can be separated from the statistics work that
    the hooks do inside the closure; then :meth:`per_step` gives seconds per step for every phase plus ``other``
    (whatever the step's wall time does not attribute: Python overhead, momentum bookkeeping).
    """

    opt: Any  # a KFAC built with profile=True
    device: torch.device
    closure_seconds: float = 0.0
    stats_in_closure: float = 0.0
    steps: int = 0
    step_seconds: float = 0.0

    def reset(self) -> None:
        self.opt.timer.reset()
        self.closure_seconds = self.stats_in_closure = self.step_seconds = 0.0
        self.steps = 0

    def timed(self, closure: Callable[[], Tensor]) -> Callable[[], Tensor]:
        def wrapped() -> Tensor:
            before = self.opt.timer.totals.get("statistics", 0.0)
            sync(self.device)
            start = time.perf_counter()
            loss = closure()
            sync(self.device)
            self.closure_seconds += time.perf_counter() - start
            self.stats_in_closure += self.opt.timer.totals.get("statistics", 0.0) - before
            return loss

        return wrapped

    def record_step(self, seconds: float) -> None:
        self.steps += 1
        self.step_seconds += seconds

    def per_step(self) -> dict[str, float]:
        n = max(self.steps, 1)
        totals = self.opt.timer.totals
        out = {"gradient": (self.closure_seconds - self.stats_in_closure) / n}
        for phase in KFAC_PHASES[1:]:
            out[phase] = totals.get(phase, 0.0) / n
        out["other"] = self.step_seconds / n - sum(out.values())
        out["total"] = self.step_seconds / n
        return out


# ------------------------------------------------------------------------------------------------- data
def fashion_mnist_autoencoder_data(train_size: int, test_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Bulatov's split on Fashion-MNIST: train = images [0, train_size), test = the next ``test_size`` training
    images; flattened to (N, 784) in [0, 1] and moved to ``device`` once."""
    from kfac_tune.zoo import load_dataset

    data = load_dataset("fashion_mnist", train_size=train_size, test_size=test_size, test_from_train=True)
    return data.train_x.flatten(1).to(device), data.test_x.flatten(1).to(device)


# ------------------------------------------------------------------------------------------------ output
def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table (readable in a terminal too)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            if v != v:
                return "–"
            if abs(v) >= 100:
                return f"{v:.0f}"
            if abs(v) >= 1:
                return f"{v:.2f}"
            return f"{v:.3g}"
        return "–" if v is None else str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join(lines)


def write_json(path: Optional[str], payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=float))


@dataclass
class Series:
    """One curve of a plot: x values, y values, a label."""

    label: str
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)


def plot_series(series: Sequence[Series], path: Path, *, xlabel: str, ylabel: str, title: str,
                logx: bool = True, hline: Optional[float] = None) -> None:
    """A line plot saved as PNG (matplotlib's Agg backend; no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in series:
        ax.plot(s.x, s.y, label=s.label, linewidth=1.3)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle=":", linewidth=1, label=f"matched target {hline:.3g}")
    if logx:
        ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
