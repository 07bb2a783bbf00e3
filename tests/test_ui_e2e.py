"""What a user sees: a real `kfac-tune search`, then `kfac-tune ui`, then the MLflow pages in headless Chromium."""
from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest

from tests.browser_support import chromium, free_port, has_chromium, visible_text
from tests.search_support import cli, cli_popen, stop, write_config


def _wait_healthy(base_url: str, process, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"the UI at {base_url} did not come up within {seconds} s")


@pytest.mark.slow
def test_search_then_ui_shows_parent_trials_and_params(tmp_path: Path) -> None:
    if not has_chromium():
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = write_config(tmp_path, tracking={"enabled": True, "uri": tracking_uri})
    result = cli("search", str(config), "--trials", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("model")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3

    port = free_port()
    server = cli_popen("ui", "--tracking-uri", tracking_uri, "--port", str(port), cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    shots = tmp_path / "screenshots"
    shots.mkdir()
    try:
        _wait_healthy(base, server)
        runs_page = f"{base}/#/experiments/{experiment.experiment_id}/runs"
        table = visible_text(chromium(runs_page, shots / "ui-e2e-runs.png"))
        parent_page = visible_text(chromium(f"{runs_page}/{parent.info.run_id}", shots / "ui-e2e-parent.png"))
        child = children[0]
        child_page = visible_text(chromium(f"{runs_page}/{child.info.run_id}", shots / "ui-e2e-trial.png"))
    finally:
        stop(server)  # SIGTERM: kfac-tune ui stops its mlflow server and uvicorn worker too
    assert parent.info.run_name in table
    for run in children:
        assert run.info.run_name in parent_page, parent_page[:2000]
    sampled = [name for name in ("lr", "damping", "mode", "beta1") if name in child.data.params]  # K-FAC's mode
    assert len(sampled) >= 2, child.data.params  # decides which of lr/momentum are sampled (automatic: neither)
    for name in sampled:
        assert f"{name} {child.data.params[name]}" in child_page, child_page[:3000]
    print(f"screenshots in {shots}")
