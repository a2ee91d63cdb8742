"""Session fixtures for the deployment checks: compose parsed once, the kustomization rendered once."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.unit.deploy.files import (
    COMPOSE_FILE,
    K8S_DIR,
    interpolate,
    render_kustomization,
    required_variables,
)


@pytest.fixture(scope="session")
def compose_text() -> str:
    return COMPOSE_FILE.read_text()


@pytest.fixture(scope="session")
def compose(compose_text: str) -> dict[str, Any]:
    """The compose file as written (before interpolation): what the schema validates."""
    return yaml.safe_load(compose_text)


@pytest.fixture(scope="session")
def compose_resolved(compose_text: str) -> dict[str, Any]:
    """The compose file after interpolation, with every required variable given a sample value."""
    env = {name: f"sample-{name.lower()}" for name in required_variables(compose_text)}
    return yaml.safe_load(interpolate(compose_text, env))


@pytest.fixture(scope="session")
def k8s_docs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return render_kustomization(K8S_DIR, tmp_path_factory.mktemp("kustomize"))
