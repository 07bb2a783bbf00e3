"""``kfac-tune compare`` in MLflow: one finished run per comparison (summary metrics, mean curves, files)."""
from __future__ import annotations

import time
from pathlib import Path

from kfac_tune import record
from kfac_tune.tracking.server import (
    MAX_METRICS_PER_BATCH, MAX_PARAM_CHARS, get_or_create_experiment, open_client, prepare_store)


def log_comparison(tracking_uri: str, experiment: str, run_name: str, *, params: dict[str, str],
                   summary: dict[str, float], curves: dict[str, list[tuple[int, float]]], files: list[Path]) -> str:
    """One finished run holding a ``kfac-tune compare``: summary metrics, mean curves by step, the plot and table.

    Not retried like trial logging: a comparison is logged once at its end, and the CLI reports a failure.
    """
    from mlflow.entities import Metric, Param, RunTag

    prepare_store(tracking_uri)
    client = open_client(tracking_uri)
    experiment_id = get_or_create_experiment(client, tracking_uri, experiment)
    run = client.create_run(experiment_id, run_name=run_name, tags={record.TAG_KIND: record.KIND_COMPARE})
    now = int(time.time() * 1000)
    metrics = [Metric(key, value, now, 0) for key, value in summary.items()]
    metrics += [Metric(key, value, now, step) for key, points in curves.items() for step, value in points]
    for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run.info.run_id, metrics=metrics[start : start + MAX_METRICS_PER_BATCH])
    client.log_batch(run.info.run_id, params=[Param(k, v[:MAX_PARAM_CHARS]) for k, v in params.items()],
                     tags=[RunTag(record.TAG_RECIPES, params.get("recipes", ""))])
    for path in files:
        client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id)
    return run.info.run_id
