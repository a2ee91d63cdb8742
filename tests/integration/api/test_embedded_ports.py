"""The embedded farm survives losing a port race: another process binds the port it picked."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from facefarm import embedded
from facefarm.embedded import (
    Child,
    free_port,
    redis_args,
    start_child,
    start_on_free_port,
    stop_children,
    wait_for_redis,
)
from tests.support.services import require_tool

pytestmark = pytest.mark.integration


def test_a_service_whose_port_was_taken_is_restarted_on_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_tool("redis-server")
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    busy = squatter.getsockname()[1]
    ports = iter([busy, free_port()])
    monkeypatch.setattr(embedded, "free_port", lambda: next(ports))
    children: list[Child] = []

    def start(port: int) -> Child:
        child = start_child(
            "redis-server",
            redis_args(port, tmp_path),
            env={"PATH": os.environ["PATH"]},
            workdir=tmp_path,
            inherit_output=False,
        )
        children.append(child)
        return child

    try:
        port = start_on_free_port(start, wait_for_redis, children)
        assert port != busy
        assert len(children) == 1 and children[0].exited() is None
    finally:
        stop_children(children)
        squatter.close()
    assert all(c.exited() is not None for c in children)
