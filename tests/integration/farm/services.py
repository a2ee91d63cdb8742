"""Real services for the farm tests: redis-server, moto's S3 server and Celery worker subprocesses."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[3]
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A private, non-persistent redis-server on a free port; yields its URL."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += ["--dir", str(workdir), "--maxmemory-policy", "noeviction"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
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


S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class CeleryWorker:
    """One ``celery worker`` subprocess with its own log file."""

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

    def stop(self, grace_s: float = 20.0) -> None:
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def start_celery_worker(
    app: str, queue: str, name: str, env: Mapping[str, str], log_dir: Path, *, concurrency: int = 1
) -> CeleryWorker:
    """``celery -A app worker -Q queue -P prefork -c N`` in its own process group."""
    log_path = log_dir / f"{name}.log"
    args = [sys.executable, "-m", "celery", "-A", app, "worker", "-Q", queue, "-P", "prefork"]
    args += ["-c", str(concurrency), "-n", f"{name}@%h", "-E", "--loglevel", "INFO"]
    args += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    full_env = {**os.environ, **env, "PYTHONPATH": str(PROJECT_ROOT)}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            args, cwd=PROJECT_ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return CeleryWorker(proc, log_path, name)
