"""Real services for tests: redis-server, moto's S3 server, Celery worker subprocesses and uvicorn.

Every starter is a context manager (or returns a handle with ``stop``) that cleans up after itself,
also when the test fails. A missing system tool is a hard failure naming the fix, never a skip:
CI installs ``redis-server`` and ``ffmpeg``, so their absence is a broken environment.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0
S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
INSTALL_HINTS = {
    "redis-server": "apt-get install redis-server",
    "redis-cli": "apt-get install redis-tools",
    "ffmpeg": "apt-get install ffmpeg",
    "ffprobe": "apt-get install ffmpeg",
}


def require_tool(name: str) -> str:
    """The path of system tool ``name``; fails the test (not skips) when it is missing."""
    path = shutil.which(name)
    if path is None:
        hint = INSTALL_HINTS.get(name, f"install {name}")
        pytest.fail(f"{name} is not installed or not on PATH; these tests need it ({hint})", pytrace=False)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_args(port: int, workdir: Path) -> list[str]:
    """A private, non-persistent redis-server bound to localhost (pure)."""
    return [
        "redis-server",
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(workdir),
        "--maxmemory-policy", "noeviction",
    ]  # fmt: skip


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A private redis-server on a free port; yields its URL and stops it on exit."""
    require_tool("redis-server")
    port = free_port()
    proc = subprocess.Popen(
        redis_server_args(port, workdir), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 10
        while not _redis_answers(port):
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {proc.returncode} on port {port}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer PING on port {port} within 10 s")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextmanager
def moto_s3_server() -> Iterator[str]:
    """moto's S3 as a real HTTP server on a free port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def use_s3_test_credentials() -> None:
    """boto3 in this process (API thread, test assertions) signs with moto's dummy keys."""
    for key, value in S3_TEST_ENV.items():
        os.environ.setdefault(key, value)


class CeleryWorker:
    """One ``celery worker`` subprocess (own process group) with its own log file."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path, name: str) -> None:
        self.proc = proc
        self.log_path = log_path
        self.name = name

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while " ready." not in self.log():
            if self.proc.poll() is not None:
                raise RuntimeError(f"celery worker {self.name} exited:\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"celery worker {self.name} not ready in {timeout_s} s:\n{self.log()[-4000:]}"
                )
            time.sleep(0.1)

    def child_pids(self) -> list[int]:
        """The prefork pool's children (where tasks run)."""
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return [int(pid) for pid in path.read_text().split()]
        except OSError:
            return []

    def terminate(self) -> None:
        """Ask the worker to shut down (warm shutdown) without waiting; ``stop`` waits."""
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the whole process group (main + pool children), SIGKILL after ``grace_s``."""
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        # Pool children outlive a main process that died first; they are in its group.
        _signal_group(self.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _group_alive(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def celery_worker_args(app: str, queue: str, name: str, concurrency: int = 1) -> list[str]:
    """``celery -A app worker -Q queue -P prefork -c N`` with task events on (pure)."""
    args = [sys.executable, "-m", "celery", "-A", app, "worker", "-Q", queue, "-P", "prefork"]
    args += ["-c", str(concurrency), "-n", f"{name}@%h", "-E", "--loglevel", "INFO"]
    args += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    return args


def start_celery_worker(
    app: str, queue: str, name: str, env: Mapping[str, str], log_dir: Path, *, concurrency: int = 1
) -> CeleryWorker:
    """Start a Celery worker subprocess in its own process group; call ``wait_ready`` before use."""
    log_path = log_dir / f"{name}.log"
    full_env = {**os.environ, **env, "PYTHONPATH": str(PROJECT_ROOT)}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            celery_worker_args(app, queue, name, concurrency),
            cwd=PROJECT_ROOT,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return CeleryWorker(proc, log_path, name)


@contextmanager
def serve_app(app: Any, *, start_timeout_s: float = 20.0) -> Iterator[str]:
    """A real uvicorn server for ``app`` on a free port in a thread; yields its base URL.

    A real server (not Starlette's TestClient) so clients go through real HTTP and the lifespan.
    """
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True, name=f"uvicorn-{port}")
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout_s
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError(f"uvicorn exited before it started on port {port}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on port {port} within {start_timeout_s} s")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
