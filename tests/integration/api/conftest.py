"""Real services for the API tests: a private redis-server per module and an app on top of it."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from dispatcher.app import create_app
from dispatcher.auth import hash_token
from facefarm.embedded import free_port, redis_args
from shared.settings import Settings

TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-9876543210"}


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    workdir = tmp_path_factory.mktemp("redis")
    port = free_port()
    proc = subprocess.Popen(redis_args(port, workdir), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while (
            subprocess.run(
                ["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True
            ).stdout.strip()
            != "PONG"
        ):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


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
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@pytest.fixture
def api(api_settings: Settings) -> Iterator[httpx.Client]:
    with serve_in_thread(create_app(api_settings)) as client:
        yield client


def auth(owner: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[owner]}"}
