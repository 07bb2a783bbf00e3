"""Every form of credential, through every route, is masked in every output (issue 13).

A real PostgreSQL server (``tests/postgres_support.py``) requires a password; each scenario gives it in one form
(URL userinfo, a ``?Password=`` query parameter, ``PGPASSWORD`` alone) through one route (``--storage``,
``KFAC_TUNE_STORAGE``, the YAML's ``storage``), runs a real tracked search in a subprocess, and looks for the
password in the command's output, the study's attributes (``config`` included), the trials' attributes, the
MLflow runs' tags, params and YAML artifacts, and the recipe. A real ``mlflow server`` takes a tracking URI with
``user:password@`` (basic auth), and a study whose trials all fail prints its "inspect failures" hint with a
password URL.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml

from kfac_tune.secrets import mask
from tests.faults.conftest import FAULT_MODELS, fault_config, mlflow_server, mlflow_store_of
from tests.postgres_support import PostgresServer, PostgresUnavailable, postgres_server
from tests.search_support import REPO

pytestmark = pytest.mark.slow
FORMS = ("userinfo", "query", "PGPASSWORD")
ROUTES = ("flag", "env", "yaml")


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    pytest.importorskip("psycopg2", reason="the postgres extra is not installed: pip install '.[postgres]'")
    try:
        with postgres_server() as running:
            yield running
    except PostgresUnavailable as reason:
        pytest.skip(str(reason))


def storage_url(server: PostgresServer, form: str, database: str) -> str:
    base = f"{server.host}:{server.port}/{database}"
    if form == "userinfo":
        return f"postgresql+psycopg2://{server.user}:{server.password}@{base}"
    if form == "query":
        return f"postgresql+psycopg2://{server.user}@{base}?sslmode=disable&password={server.password}"
    return f"postgresql+psycopg2://{server.user}@{base}"  # the password only in PGPASSWORD


def run_cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("PGPASSWORD", "KFAC_TUNE_STORAGE", "MLFLOW_TRACKING_URI")}
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**base, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", **env})


def assert_written_nowhere(password: str, output: str, storage: str, env: dict[str, str], directory: Path) -> None:
    from mlflow import MlflowClient

    assert "Traceback" not in output
    assert password not in output
    os.environ.update(env)  # optuna reads the database with the same credentials the command had
    try:
        study = optuna.load_study(study_name="model", storage=storage)
        assert password not in json.dumps(study.user_attrs, default=str)
        assert all(password not in json.dumps(t.user_attrs, default=str) for t in study.trials)
    finally:
        for key in env:
            os.environ.pop(key, None)
    for recipe in (directory / "recipes").glob("*.yaml"):
        assert password not in recipe.read_text()
    client = MlflowClient(mlflow_store_of(directory))
    runs = client.search_runs([client.get_experiment_by_name("model").experiment_id])
    assert runs, "the search was tracked"
    for run in runs:
        assert password not in json.dumps([run.data.tags, run.data.params])
        for artifact in client.list_artifacts(run.info.run_id):
            if artifact.path.endswith(".yaml"):
                text = Path(client.download_artifacts(run.info.run_id, artifact.path, str(directory / "dl")))
                assert password not in text.read_text(), artifact.path


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("form", FORMS)
def test_a_storage_password_is_masked_everywhere(server: PostgresServer, tmp_path: Path, form: str,
                                                 route: str) -> None:
    database = f"{form.lower()}_{route}"
    server.create_database(database)
    url = storage_url(server, form, database)
    config = fault_config(tmp_path, trials=1, tracking=True)
    env = {"PGPASSWORD": server.password} if form == "PGPASSWORD" else {}
    args = ["search", str(config)]
    if route == "flag":
        args += ["--storage", url]
    elif route == "env":
        env["KFAC_TUNE_STORAGE"] = url
    else:
        text = yaml.safe_load(config.read_text())
        config.write_text(yaml.safe_dump({**text, "storage": url}, sort_keys=False))
    result = run_cli(*args, cwd=tmp_path, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert mask(url) in output.replace("\n", ""), "the banner names the storage, masked (rich may wrap it)"
    assert_written_nowhere(server.password, output, url, {"PGPASSWORD": server.password}, tmp_path)
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_store_of(tmp_path))
    parent = [r for r in client.search_runs([client.get_experiment_by_name("model").experiment_id])
              if "storage" in r.data.tags]
    assert [r.data.tags["storage"] for r in parent] == [mask(url)]


def test_the_inspect_failures_hint_masks_the_password_and_is_shell_quoted(server: PostgresServer,
                                                                           tmp_path: Path) -> None:
    server.create_database("hint")
    url = storage_url(server, "query", "hint")
    config = fault_config(tmp_path, "failing_mlp", trials=1)
    named = config.rename(tmp_path / "my model; touch X.yaml")  # a study name must be a plain file name: --study
    result = run_cli("search", str(named), "--study", "hint", "--storage", url, cwd=tmp_path, env={})
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output and server.password not in output
    hint = next(line for line in output.splitlines() if "Inspect failures with:" in line)
    command = hint.split("Inspect failures with: ", 1)[1]
    assert command == f"kfac-tune show --study hint --storage '{mask(url)}'"  # the URL's ?, & and = quoted


def test_the_mask_covers_every_form(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPASSWORD", "env-secret-1")
    cases = {
        "postgresql+psycopg2://tuner:s3cr3t@db:5432/kfac": "postgresql+psycopg2://tuner:***@db:5432/kfac",
        "postgresql://u@db/x?sslmode=require&PASSWORD=s3cr3t&a=1": "postgresql://u@db/x?sslmode=require&PASSWORD=***&a=1",
        "postgresql://u@db/x?passwd=s3cr3t": "postgresql://u@db/x?passwd=***",
        "http://me:t0k3n@mlflow:5000/": "http://me:***@mlflow:5000/",
        "https://host/api?token=abcdef": "https://host/api?token=***",
        "libpq said: password env-secret-1 rejected": "libpq said: password *** rejected",
        "postgresql://u:p@ss@db/x, again p@ss and p%40ss": "postgresql://u:***@db/x, again *** and ***",
        "sqlite:///runs/study.db": "sqlite:///runs/study.db",
        "http://user@host:5000": "http://user@host:5000",
        "not a url": "not a url",
    }
    for text, masked in cases.items():
        assert mask(text) == masked
    assert mask("storage: postgresql://u:p%40ss@db/x  # p@ss, token t0k3n", "http://me:t0k3n@mlflow:5000") == \
        "storage: postgresql://u:***@db/x  # ***, token ***"


# A password SQLAlchemy takes raw: each character here ended the old pattern's match and printed the rest.
ODD_PASSWORD = "pw#1 2'3/4?5@6"
ODD_PIECES = ("pw#1", "2'3", "4?5", "5@6", "1 2")  # no part of it may show either


def assert_no_odd_password(text: str) -> None:
    assert not [piece for piece in ODD_PIECES if piece in text], text


def test_the_mask_parses_urls_whose_password_has_any_character(monkeypatch: pytest.MonkeyPatch) -> None:
    from kfac_tune import secrets
    from kfac_tune.secrets import display_url, mask_data, url_credentials
    from kfac_tune.tracking import flatten

    monkeypatch.setattr(secrets, "_remembered", set())  # as in a search worker, which resolved no URL itself

    database = f"postgresql+psycopg2://tuner:{ODD_PASSWORD}@db.example:5432/kfac"
    assert display_url(database) == "postgresql+psycopg2://tuner:***@db.example:5432/kfac"
    assert display_url(f"postgresql://tuner@db/kfac?sslmode=require&password={ODD_PASSWORD}") == \
        "postgresql://tuner@db/kfac?sslmode=require&password=***"
    http = f"https://me:{ODD_PASSWORD}@mlflow.example:5000/"
    assert display_url(http) == "https://me:***@mlflow.example:5000/"
    assert url_credentials(http) == ("https://mlflow.example:5000/", ("me", ODD_PASSWORD))
    for char in "# '/?@":  # each alone, too
        assert display_url(f"postgresql://u:ab{char}cd@h/db") == "postgresql://u:***@h/db", char
    message = f"Could not parse SQLAlchemy URL from string '{database}'; {ODD_PASSWORD!r} was refused"
    assert_no_odd_password(mask(message, database))
    stored = mask_data({"storage": database, "tracking": {"uri": http}, "note": f"pw is {ODD_PASSWORD}"}, database,
                       http)
    assert_no_odd_password(json.dumps(stored))
    assert stored["storage"] == display_url(database)
    params = flatten({"storage": database, "tracking": {"uri": http}})  # a trial run's MLflow params
    assert params == {"storage": display_url(database), "tracking.uri": display_url(http)}


def test_an_unreachable_storage_with_an_odd_password_is_never_shown(tmp_path: Path) -> None:
    pytest.importorskip("psycopg2", reason="the postgres extra is not installed: pip install '.[postgres]'")
    config = fault_config(tmp_path, trials=1)
    url = f"postgresql+psycopg2://tuner:{ODD_PASSWORD}@127.0.0.1:1/kfac"
    for command in (["search", str(config), "--storage", url], ["show", "--storage", url]):
        result = run_cli(*command, cwd=tmp_path, env={})
        output = result.stdout + result.stderr
        assert result.returncode == 1, output
        assert "Traceback" not in output and output.startswith("Error: "), output
        assert_no_odd_password(output)
        assert '"6@' not in output  # SQLAlchemy connects to host "6@127.0.0.1": the driver names the tail


def test_a_tracking_uri_with_an_odd_password_is_not_stored_with_the_study(tmp_path: Path) -> None:
    uri = f"http://tuner:{ODD_PASSWORD}@mlflow.example:5000"
    config = fault_config(tmp_path, trials=1, tracking=False)
    text = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**text, "tracking": {"enabled": False, "uri": uri}}, sort_keys=False))
    result = run_cli("search", str(config), cwd=tmp_path, env={})
    assert result.returncode == 0, result.stdout + result.stderr
    assert_no_odd_password(result.stdout + result.stderr)
    study = optuna.load_study(study_name="model", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert_no_odd_password(json.dumps(study.user_attrs))
    assert "tuner:***@mlflow.example:5000" in json.dumps(study.user_attrs)


def test_the_ui_hands_the_server_its_password_outside_the_command_line(server: PostgresServer,
                                                                       tmp_path: Path) -> None:
    """`ps` shows every local user each process's command line; the supervisor and the mlflow server (and its
    uvicorn workers) must get the tracking store's URL, password included, through their environment."""
    import time
    import uuid

    from kfac_tune.launch import free_port
    from tests.process_support import HAS_PROC, cmdline, marked

    if not HAS_PROC:
        pytest.skip("reads the process table from /proc")
    server.create_database("ui_store")
    uri = storage_url(server, "userinfo", "ui_store")
    mark = uuid.uuid4().hex
    port = free_port()
    log = tmp_path / "ui.log"
    base = {k: v for k, v in os.environ.items() if k not in ("PGPASSWORD", "MLFLOW_TRACKING_URI")}
    with log.open("w") as output:
        ui = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "ui", "--tracking-uri", uri, "--port", str(port)],
                              cwd=tmp_path, stdout=output, stderr=subprocess.STDOUT, text=True,
                              env={**base, "PYTHONPATH": str(REPO), "KFAC_TUNE_TEST_MARK": mark})
    try:
        deadline = time.monotonic() + 600
        while "MLflow UI for" not in log.read_text():
            assert ui.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        started = marked("KFAC_TUNE_TEST_MARK", mark)
        lines = [cmdline(pid) for pid in started if pid != ui.pid]  # the user gave kfac-tune's own argv
        assert any("mlflow" in line and "server" in line for line in lines), lines
        assert all(server.password not in line for line in lines), lines
        assert server.password not in log.read_text()
    finally:
        ui.terminate()
        ui.wait(timeout=120)


@pytest.mark.parametrize("route", ["--tracking-uri", "--set", "yaml"])
def test_a_refused_url_with_an_odd_password_is_quoted_masked(tmp_path: Path, route: str) -> None:
    """A tracking URI refused before any store is resolved (file://, an unknown scheme) is quoted in the error, and
    --set repeats its item: both masked by parsing the URL, whole, before the quote is cut short."""
    from tests.faults.conftest import invoke

    uri = f"file://tuner:{ODD_PASSWORD}@host/x"
    config = fault_config(tmp_path, trials=1)
    if route == "yaml":
        text = yaml.safe_load(config.read_text())
        config.write_text(yaml.safe_dump({**text, "tracking": {"enabled": True, "uri": uri}}, sort_keys=False))
    args = {"--tracking-uri": ["--tracking-uri", uri], "--set": ["--set", f"tracking.uri={uri}"], "yaml": []}[route]
    result = invoke("search", str(config), *args)
    assert result.exit_code == 2, result.output
    assert "tracking.uri" in result.output and "tuner:***@host" in result.output
    assert_no_odd_password(result.output)


def test_an_http_tracking_uri_with_basic_auth_works_on_a_live_server(tmp_path: Path) -> None:
    """A password with any character (#, space, ', /, ?, @): MLflow's client parses the URI itself and cut a raw #
    or / of it (sending the rest as the host), so the credentials go to it as its basic-auth variables and the URI
    without them; the runs log through it, and no piece of the password shows in the output, the runs' tags and
    params, or the error once the server is gone."""
    config = fault_config(tmp_path, trials=1, tracking=True)
    with mlflow_server(mlflow_store_of(tmp_path)) as (base, port, _):
        uri = base.replace("http://", f"http://tuner:{ODD_PASSWORD}@")
        result = run_cli("search", str(config), "--tracking-uri", uri, cwd=tmp_path, env={})
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert "Warning: MLflow tracking" not in output and "Traceback" not in output
        assert_no_odd_password(output)
        from mlflow import MlflowClient

        client = MlflowClient(base)
        runs = client.search_runs([client.get_experiment_by_name("model").experiment_id])
        assert len(runs) == 2  # the parent run and the trial's run, logged through the authenticated URI
        assert_no_odd_password(json.dumps([[r.data.tags, r.data.params] for r in runs]))
    closed = run_cli("search", str(config), "--tracking-uri", uri, cwd=tmp_path, env={})
    assert closed.returncode == 1, closed.stdout + closed.stderr
    assert_no_odd_password(closed.stdout + closed.stderr)
    assert "Traceback" not in closed.stderr and f"tuner:***@127.0.0.1:{port}" in closed.stderr
