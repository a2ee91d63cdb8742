"""deploy/docker/healthcheck.py: the role comes from PID 1's argv, and each role gets the right probe."""

from __future__ import annotations

import importlib.util
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import ModuleType

import pytest

from shared.settings import Settings
from tests.unit.deploy.files import REPO


@pytest.fixture(scope="module")
def healthcheck() -> ModuleType:
    path = REPO / "deploy" / "docker" / "healthcheck.py"
    spec = importlib.util.spec_from_file_location("facefarm_healthcheck", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's hook name
        self.send_response(200 if self.path == "/healthz" else 503)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature of the base
        return


@pytest.fixture
def health_server() -> Iterator[int]:
    server = HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("argv", "role"),
    [
        (
            ["/opt/facefarm/.venv/bin/python", "/opt/facefarm/.venv/bin/facefarm", "worker", "--gpus", "all"],
            "worker",
        ),
        (["/sbin/docker-init", "--", "facefarm", "api"], "api"),
        (["facefarm", "flower"], "flower"),
        (["nvidia-cuda-mps-control", "-f"], ""),
        (["facefarm"], ""),
    ],
)
def test_role_is_the_subcommand_after_facefarm(healthcheck: ModuleType, argv: list[str], role: str) -> None:
    assert healthcheck.role_of(argv) == role


def test_api_and_flower_probe_their_own_ports_and_workers_probe_the_broker(healthcheck: ModuleType) -> None:
    settings = Settings(api_port=8123, flower_port=5666)
    assert healthcheck.health_url("api", settings) == "http://127.0.0.1:8123/healthz"
    assert healthcheck.health_url("flower", settings) == "http://127.0.0.1:5666/healthcheck"
    assert healthcheck.health_url("worker", settings) is None
    assert healthcheck.health_url("reconciler", settings) is None


def test_http_probe_needs_a_2xx_answer(healthcheck: ModuleType, health_server: int) -> None:
    assert healthcheck.probe_http(f"http://127.0.0.1:{health_server}/healthz", 2.0)
    assert not healthcheck.probe_http(f"http://127.0.0.1:{health_server}/other", 2.0)


def test_broker_probe_fails_when_nothing_listens(healthcheck: ModuleType) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert not healthcheck.probe_broker(f"redis://127.0.0.1:{port}/0", 0.5)
