"""Long-running service processes for the ops tests: each in its own process group with a log file.

``prefix`` runs a process somewhere else (``ip netns exec NS ...``); stopping always signals the
whole group, so nothing a service started outlives the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

from tests.integration.ops.compose import PROJECT_ROOT

START_TIMEOUT_S = 90.0


class Service:
    """One started process (a farm service, redis-server, moto) and its log."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path

    def log(self, tail_chars: int = 4000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-tail_chars:]

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the group (a warm shutdown), then SIGKILL whatever is left of the whole process tree.

        ``facefarm worker`` starts its Celery workers in their own sessions, so the tree is walked
        through ``/proc`` as well as the group.
        """
        tree = descendants(self.proc.pid)
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=grace_s)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
        for process in [*tree, *descendants(self.proc.pid)]:
            _kill(process)
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait(timeout=10)


def _start_time(pid: int) -> int | None:
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _kill(process: tuple[int, int]) -> None:
    """SIGKILL ``(pid, start time)`` only if that very process still runs (pids get reused)."""
    pid, started = process
    if _start_time(pid) != started:
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def descendants(pid: int) -> list[tuple[int, int]]:
    """Every live process below ``pid`` as ``(pid, start time)``, read from ``/proc``."""
    children: dict[int, list[tuple[int, int]]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append((int(stat.parent.name), int(fields[19])))
    found: list[tuple[int, int]] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def start_service(
    name: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    log_dir: Path,
    *,
    prefix: Sequence[str] = (),
    stdin_text: str | None = None,
) -> Service:
    """Start ``prefix + argv`` with exactly ``env`` (nothing inherited), output to ``log_dir/name.log``."""
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*prefix, *argv],
            cwd=PROJECT_ROOT,
            env=dict(env),
            stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    if stdin_text is not None:
        assert proc.stdin is not None
        proc.stdin.write(stdin_text.encode())
        proc.stdin.close()
    return Service(name, proc, log_path)


class Services:
    """The services of one test farm, stopped in reverse start order."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[Service] = []

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str], **kwargs: object) -> Service:
        service = start_service(name, argv, env, self.log_dir, **kwargs)  # type: ignore[arg-type]
        self.started.append(service)
        return service

    def logs(self) -> str:
        return "\n".join(f"--- {s.name} ---\n{s.log(2500)}" for s in self.started)

    def stop_all(self) -> None:
        for service in reversed(self.started):
            service.stop()


@contextmanager
def services(log_dir: Path) -> Iterator[Services]:
    log_dir.mkdir(parents=True, exist_ok=True)
    group = Services(log_dir)
    with ExitStack() as stack:
        stack.callback(group.stop_all)
        yield group


def wait_for(what: str, check: Callable[[], bool], timeout_s: float, *, on_fail: Callable[[], str]) -> None:
    """Poll ``check`` until it is true; fail with ``on_fail()`` (logs) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last_error = ""
    while True:
        try:
            if check():
                return
        except Exception as exc:  # not up yet: connection refused, auth not ready, ...
            last_error = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not ready after {timeout_s:.0f} s ({last_error})\n{on_fail()}")
        time.sleep(0.2)


def redis_config(port: int, password: str, workdir: Path, bind: str = "127.0.0.1") -> str:
    """redis-server settings for stdin (``redis-server -``): the password stays out of ``ps``."""
    return "\n".join(
        [
            f"port {port}",
            f"bind {bind}",
            f'requirepass "{password}"',
            'save ""',
            "appendonly no",
            f"dir {workdir}",
            "maxmemory-policy noeviction",
            "",
        ]
    )


def http_ok(url: str, **kwargs: object) -> bool:
    return httpx.get(url, timeout=2.0, **kwargs).status_code == 200  # type: ignore[arg-type]
