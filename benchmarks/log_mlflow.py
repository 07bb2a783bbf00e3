"""Log an autoencoder benchmark (its ``results.json`` and plots) to MLflow, to compare the arms in the UI.

One parent run per benchmark output directory (params: the script's arguments; tags: the machine; note: the
summary tables; artifacts: the plots, the log and ``results.json``) and one child run per arm and seed:
the arm's hyperparameters as params, and its test and training loss as metrics against the iteration.  Each
point's timestamp is the run's start plus the arm's *training* seconds at that point, so MLflow's "relative time"
x-axis shows loss against training time (evaluation excluded), the benchmark's second plot; ``train_seconds`` is
also logged as a metric, for charts that put one metric against another.

    PYTHONPATH=. python benchmarks/log_mlflow.py benchmarks/out/c1 --tracking-uri sqlite:///mlflow.db
    kfac-tune ui --tracking-uri sqlite:///mlflow.db

``benchmarks/autoencoder.py --mlflow URI`` calls this at the end of a run.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Optional, Sequence

MAX_PARAM = 500  # MLflow's limit on a param value's length, in characters
MAX_BATCH = 1000  # MLflow's limit on metrics per log_batch call


def log_results(out: Path, tracking_uri: str, experiment: str = "kfac-tune-benchmarks") -> str:
    """Log ``out/results.json`` (and the PNGs next to it); return the parent run's id."""
    from mlflow.entities import Metric, Param, RunTag

    from kfac_tune.tracking.server import get_or_create_experiment, open_client

    results = json.loads((out / "results.json").read_text())
    client = open_client(tracking_uri)
    # as kfac-tune's own runs: a local store keeps the artifacts next to its database, where `kfac-tune ui` serves
    # them (MLflow's default, ./mlruns of the working directory, scatters them wherever the script was started)
    experiment_id = get_or_create_experiment(client, tracking_uri, experiment)
    args = results["args"]
    parent = client.create_run(experiment_id, run_name=f"autoencoder-{args['experiment']}-{out.name}", tags={
        "benchmark": "autoencoder", "machine": results["machine"], "baseline": results["baseline"],
        "mlflow.note.content": f"```\n{results['summary']}\n\n{results['splits']}\n```",
    })
    parent_id = parent.info.run_id
    client.log_batch(parent_id, params=[Param(k, _short(v)) for k, v in sorted(args.items())])
    for path in [*sorted(out.glob("*.png")), out / "results.json", out / "log.txt"]:
        if path.exists():
            client.log_artifact(parent_id, str(path))
    hparams = {arm["name"]: arm for arm in results["arms"]}
    seeds = results.get("seeds", range(len(results["curves"])))
    for seed, curves in zip(seeds, results["curves"]):
        for curve in curves:
            child = client.create_run(experiment_id, run_name=f"{curve['arm']} seed {seed}", tags={
                "mlflow.parentRunId": parent_id, "seed": str(seed), "arm": curve["arm"],
                "diverged": str(curve["diverged"]).lower()})
            run_id = child.info.run_id
            arm = hparams.get(curve["arm"], {})
            params = [Param(f"hp.{k}", _short(v)) for k, v in sorted(arm.get("hparams", {}).items())]
            params += [Param(k, _short(arm.get(k))) for k in ("kind", "batch_size", "weight_norm")]
            ms_per_step = curve["split_ms"].get("total", math.nan)
            client.log_batch(run_id, params=params, tags=[RunTag("ms_per_step", f"{ms_per_step:.1f}")])
            metrics = _curve_metrics(curve, child.info.start_time)
            metrics += [Metric(f"split_ms.{k}", v, child.info.start_time, 0) for k, v in curve["split_ms"].items()]
            for start in range(0, len(metrics), MAX_BATCH):
                client.log_batch(run_id, metrics=metrics[start : start + MAX_BATCH])
            client.set_terminated(run_id)
    client.set_terminated(parent_id)
    return parent_id


def _curve_metrics(curve: dict[str, Any], start_ms: int) -> list[Any]:
    """``test_loss``/``train_loss``/``train_seconds`` per evaluated iteration, stamped at training time."""
    from mlflow.entities import Metric

    metrics = []
    for step, seconds, test, train in zip(curve["steps"], curve["seconds"], curve["test"], curve["train"]):
        stamp = start_ms + int(1000 * seconds)
        metrics += [Metric("test_loss", test, stamp, step), Metric("train_seconds", seconds, stamp, step),
                    Metric("train_loss", train, stamp, step)]
    return [m for m in metrics if math.isfinite(m.value)]  # the first point has no training loss yet


def _short(value: Any) -> str:
    return str(value)[:MAX_PARAM]


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="a benchmark output directory holding results.json")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    p.add_argument("--experiment", default="kfac-tune-benchmarks")
    args = p.parse_args(argv)
    started = time.time()
    run_id = log_results(args.out, args.tracking_uri, args.experiment)
    print(f"logged {args.out} to {args.tracking_uri} (experiment {args.experiment}, parent run {run_id}) "
          f"in {time.time() - started:.1f}s")


if __name__ == "__main__":
    main()
