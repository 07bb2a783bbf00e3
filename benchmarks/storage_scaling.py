"""Trials per hour against the number of worker processes, for SQLite and PostgreSQL study storage.

Where does SQLite stop scaling? Each worker is a separate process that joins one study through kfac-tune's own
storage setup (``make_storage``: heartbeat on, SQLite's 30 s lock timeout, PostgreSQL's ``pool_pre_ping``) and runs
a short objective for a fixed wall-clock window; all workers start together after they have imported everything,
so start-up is not counted. The objective suggests four parameters and reports five intermediate values (the
storage writes a kfac-tune trial makes, minus training), then sleeps ``--objective-ms`` (0: pure storage
throughput; a sleep stands for training without competing for the CPU). The sampler is random, so the cost per
trial does not grow with the study as TPE's would.

PostgreSQL runs on a throwaway local server (tests/postgres_support.py) and is left out, with the reason, where
it cannot start. Storage errors (``database is locked``...) are counted, not fatal:

    PYTHONPATH=. python benchmarks/storage_scaling.py --seconds 20 --workers 1 2 4
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

STUDY = "bench"


@dataclass(frozen=True)
class Run:
    """One cell of the table: a storage, a worker count, what they achieved."""

    storage: str
    workers: int
    trials: int
    seconds: float
    errors: int

    @property
    def per_hour(self) -> float:
        return self.trials / self.seconds * 3600


def _config_path(root: Path) -> Path:
    """A minimal valid kfac-tune config: ``make_storage`` reads the heartbeat settings from it."""
    path = root / "bench.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name": "mlp"}, "data": {"name": "digits"}, "optimizer": "sgd",
        "search": {"heartbeat_interval": 60},
    }))
    return path


def _worker(config: str, url: str, seconds: float, objective_ms: float, start: Any, results: Any) -> None:
    """Join the study, say it is ready, wait for the common start (so that importing torch and optuna, seconds on
    a busy machine, is not charged to the storage), run trials until the window closes; report (trials, errors)."""
    import optuna

    from kfac_tune.config import load_config
    from kfac_tune.search.storage import make_storage
    from kfac_tune.search.workers import quiet

    quiet()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    cfg = load_config(config)
    study = optuna.load_study(study_name=STUDY, storage=make_storage(url, cfg),
                              sampler=optuna.samplers.RandomSampler(seed=os.getpid()))

    def objective(trial: optuna.Trial) -> float:
        values = [trial.suggest_float(name, 1e-4, 1.0, log=True) for name in ("lr", "damping", "momentum", "wd")]
        for step in range(5):
            trial.report(sum(values) / (step + 1), step)
        if objective_ms:
            time.sleep(objective_ms / 1000)
        return sum(values)

    results.put(None)  # ready
    start.wait()
    deadline, trials, errors = time.monotonic() + seconds, 0, 0
    while time.monotonic() < deadline:
        try:
            study.optimize(objective, n_trials=1)
            trials += 1
        except Exception:  # a storage error (lock timeout, lost connection): counted, the worker goes on
            errors += 1
    results.put((trials, errors))


def measure(label: str, url: str, config: Path, workers: int, seconds: float, objective_ms: float) -> Run:
    """Create the study once, then time ``workers`` processes on it for ``seconds``."""
    import optuna

    from kfac_tune.config import load_config
    from kfac_tune.search.storage import make_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(study_name=STUDY, storage=make_storage(url, load_config(config)))
    context = multiprocessing.get_context("spawn")
    start, results = context.Event(), context.Queue()
    processes = [context.Process(target=_worker, args=(str(config), url, seconds, objective_ms, start, results))
                 for _ in range(workers)]
    for process in processes:
        process.start()
    for _ in processes:
        results.get(timeout=600)  # every worker is ready
    began = time.monotonic()
    start.set()
    outcomes = [results.get(timeout=seconds + 300) for _ in processes]
    elapsed = time.monotonic() - began
    for process in processes:
        process.join(timeout=60)
    return Run(label, workers, sum(t for t, _ in outcomes), elapsed, sum(e for _, e in outcomes))


@contextmanager
def storages(root: Path, with_postgres: bool) -> Iterator[dict[str, object]]:
    """``{label: factory(name) -> fresh URL}`` for SQLite and, where it can run, a throwaway PostgreSQL."""
    found: dict[str, object] = {"sqlite": lambda name: f"sqlite:///{root / name}.db"}
    if not with_postgres:
        yield found
        return
    try:
        from tests.postgres_support import PostgresUnavailable, postgres_server
    except ImportError as error:
        print(f"PostgreSQL left out: {error}")
        yield found
        return
    try:
        with postgres_server() as server:
            os.environ["PGPASSWORD"] = server.password  # inherited by the spawned workers
            found["postgresql"] = server.create_database
            yield found
    except PostgresUnavailable as reason:
        print(f"PostgreSQL left out: {reason}")
        yield found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seconds", type=float, default=20.0, help="measurement window per cell")
    parser.add_argument("--objective-ms", type=float, default=0.0, help="sleep inside each trial")
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()

    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="kfac-tune-storage-") as tmp, \
            storages(Path(tmp), not args.no_postgres) as factories:
        config = _config_path(Path(tmp))
        for label, factory in factories.items():
            for workers in args.workers:
                url = factory(f"{label}_{workers}_{len(runs)}")  # type: ignore[operator]
                runs.append(measure(label, url, config, workers, args.seconds, args.objective_ms))
                print(f"  {label:<10} {workers} worker(s): {runs[-1].per_hour:>10,.0f} trials/h", flush=True)

    load = f", load1={os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"\n{os.cpu_count()} cores{load}; window {args.seconds:g} s per cell, "
          f"objective sleep {args.objective_ms:g} ms")
    print("| storage | workers | trials | trials/hour | per worker | errors |\n|---|---|---|---|---|---|")
    for run in runs:
        print(f"| {run.storage} | {run.workers} | {run.trials} | {run.per_hour:,.0f} | "
              f"{run.per_hour / run.workers:,.0f} | {run.errors} |")


if __name__ == "__main__":
    main()
