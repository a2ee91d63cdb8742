"""The embedded farm's pure parts: the settings every child gets, and the command lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dispatcher.auth import hash_token
from facefarm.embedded import (
    EMBEDDED_OWNER,
    celery_worker_args,
    child_env,
    embedded_settings,
    free_port,
    redis_args,
    settings_env,
)
from shared.settings import Settings


def test_settings_env_round_trips_through_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    base = Settings(max_attempts=7, file_roots=[tmp_path], chunk_frames=12, api_token="client-only")
    values = embedded_settings(
        base, redis_port=6400, api_port=8400, storage_dir=tmp_path / "s", token_hash="ab" * 32, device="cpu"
    )
    env = settings_env(values)
    assert all(name.startswith("FACEFARM_") for name in env)
    assert "FACEFARM_API_TOKEN" not in env  # client-side values never reach the farm
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    rebuilt = Settings()
    assert rebuilt.redis_url == "redis://127.0.0.1:6400/0"
    assert rebuilt.api_port == 8400 and rebuilt.api_host == "127.0.0.1"
    assert rebuilt.storage_url == (tmp_path / "s").resolve().as_uri()
    assert rebuilt.api_tokens == {"ab" * 32: EMBEDDED_OWNER}
    assert rebuilt.device == "cpu"
    assert (rebuilt.max_attempts, rebuilt.file_roots, rebuilt.chunk_frames) == (7, [tmp_path], 12)


def test_only_the_token_hash_is_in_the_childrens_settings() -> None:
    token = "the-ephemeral-token"
    values = embedded_settings(
        Settings(),
        redis_port=1,
        api_port=2,
        storage_dir=Path("/tmp/x"),
        token_hash=hash_token(token),
        device="cpu",
    )
    assert token not in json.dumps(settings_env(values))


def test_child_env_replaces_the_callers_facefarm_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACEFARM_REDIS_URL", "redis://production:6379/0")
    monkeypatch.setenv("FACEFARM_STRAY", "x")
    env = child_env({"FACEFARM_REDIS_URL": "redis://127.0.0.1:1/0"}, Path("/proj"))
    assert env["FACEFARM_REDIS_URL"] == "redis://127.0.0.1:1/0"
    assert "FACEFARM_STRAY" not in env
    assert env["PYTHONPATH"].split(":")[0] == "/proj"
    assert "PATH" in env


def test_redis_is_private_and_not_persistent() -> None:
    args = redis_args(6399, Path("/tmp/r"))
    assert args[0] == "redis-server"
    pairs = dict(zip(args[1::2], args[2::2], strict=True))
    assert pairs == {
        "--port": "6399",
        "--bind": "127.0.0.1",
        "--save": "",
        "--appendonly": "no",
        "--dir": "/tmp/r",
        "--protected-mode": "yes",
    }


def test_workers_are_prefork_with_one_process_on_their_queue() -> None:
    args = celery_worker_args("worker.celery_app", "gpu", "render-1", python="py")
    assert args[:6] == ["py", "-m", "celery", "-A", "worker.celery_app", "worker"]
    assert args[args.index("-Q") + 1] == "gpu"
    assert args[args.index("-P") + 1] == "prefork"
    assert args[args.index("-c") + 1] == "1"
    assert args[args.index("-n") + 1] == "render-1@%h"


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
