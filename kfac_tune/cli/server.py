"""``kfac-tune ui``: serve the MLflow UI on a tracking store until stopped."""
from __future__ import annotations

from pathlib import Path

import click

from kfac_tune.cli.common import handle_errors, optional_config_argument, resolve, tracking_uri_option


@click.command(epilog="""\b
Examples:
  kfac-tune ui
  kfac-tune ui examples/digits_mlp.yaml   # the config's tracking.uri
  kfac-tune ui --tracking-uri sqlite:///runs/mlflow.db --port 5001
  kfac-tune ui --host 0.0.0.0   # reachable from other machines: the server has no authentication""")
@optional_config_argument
@tracking_uri_option
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True, help="Port to listen on.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (local only by default).")
@handle_errors
def ui(config: Path | None, tracking_uri: str | None, port: int, host: str) -> None:
    """Serve the MLflow UI on a local tracking store and wait (Ctrl-C, SIGTERM or SIGHUP stops it). The store:
    --tracking-uri, else $MLFLOW_TRACKING_URI, else CONFIG's tracking.uri, else the default."""
    from kfac_tune import processes
    from kfac_tune.secrets import display_url
    from kfac_tune.tracking import experiment_url, serve_ui

    uri = resolve(config, tracking_uri=tracking_uri)[1].tracking_uri
    process = serve_ui(uri, host=host, port=port)
    try:
        base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        click.echo(f"MLflow UI for {display_url(uri)} at {base}")
        from mlflow import MlflowClient

        for experiment in MlflowClient(uri).search_experiments():
            click.echo(f"  {experiment.name}: {experiment_url(base, experiment.experiment_id)}")
        process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        processes.stop([process])
