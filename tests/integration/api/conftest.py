"""Real services for the API tests: a private redis-server per module and an app on top of it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from dispatcher.app import create_app
from dispatcher.auth import hash_token
from shared.settings import Settings
from tests.support.services import redis_server, serve_app

TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-9876543210"}


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
def api_settings(redis_url: str, tmp_path: Path) -> Settings:
    storage = tmp_path / "storage"
    storage.mkdir()
    return Settings(
        redis_url=redis_url,
        storage_url=storage.as_uri(),
        api_tokens={hash_token(token): owner for owner, token in TOKENS.items()},
    )


@contextmanager
def serve_in_thread(app: FastAPI) -> Iterator[httpx.Client]:
    """A real uvicorn server on a free port in a thread, and an httpx client pointed at it."""
    with serve_app(app) as base_url, httpx.Client(base_url=base_url, timeout=30) as client:
        yield client


@pytest.fixture
def api(api_settings: Settings) -> Iterator[httpx.Client]:
    with serve_in_thread(create_app(api_settings)) as client:
        yield client


def auth(owner: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[owner]}"}
