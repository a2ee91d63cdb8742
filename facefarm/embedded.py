"""The embedded farm behind ``facefarm render`` without ``--api``: a whole private farm per run.

It starts a private ``redis-server`` (no persistence) in a temp dir, the API on a free port with an
ephemeral token (only its hash reaches the API), a CPU worker, a render worker and a CPU-only check worker, all configured by
``FACEFARM_*`` variables built from one settings dict; then it submits through ``FarmClient`` like
any user would, and always tears everything down: every child runs in its own process group, which
gets SIGTERM, then SIGKILL, also on Ctrl-C, SIGTERM or failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import httpx

from dispatcher.auth import create_token
from facefarm.client import FarmClient
from shared.errors import BrokerUnavailableError, ConfigError
from shared.names import CHECK_QUEUE, CPU_QUEUE, GPU_QUEUE
from shared.schemas import JobOptions, JobView
from shared.settings import Settings

EMBEDDED_OWNER = "local"
START_TIMEOUT_S = 60.0
STOP_GRACE_S = 8.0
START_ATTEMPTS = 3
LOG_TAIL_LINES = 20

# Fields whose embedded values replace the user's: the farm is private to this run.
_CLIENT_ONLY = ("api_url", "api_token")


# --- pure builders ------------------------------------------------------------------------------


def settings_env(values: Mapping[str, Any]) -> dict[str, str]:
    """``FACEFARM_*`` variables for a settings dict (JSON for lists and dicts, None left out)."""
    env: dict[str, str] = {}
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, dict | list | tuple):
            text = json.dumps(value, default=str)
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        env[f"FACEFARM_{name.upper()}"] = text
    return env


def embedded_settings(
    base: Settings, *, redis_port: int, api_port: int, storage_dir: Path, token_hash: str, device: str
) -> dict[str, Any]:
    """The one settings dict every child gets: the user's settings with the private farm's values."""
    values = base.model_dump(mode="json", exclude=set(_CLIENT_ONLY))
    values.update(
        redis_url=f"redis://127.0.0.1:{redis_port}/0",
        result_backend_url=None,
        require_redis_password=False,
        storage_url=storage_dir.resolve().as_uri(),
        s3_endpoint_url=None,
        api_host="127.0.0.1",
        api_port=api_port,
        api_tokens={token_hash: EMBEDDED_OWNER},
        device=device,
        environment="local",
    )
    return values


def redis_args(port: int, workdir: Path) -> list[str]:
    """A private, non-persistent redis-server bound to localhost."""
    return [
        "redis-server",
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(workdir),
        "--protected-mode", "yes",
    ]  # fmt: skip


def api_args(python: str = sys.executable) -> list[str]:
    """``facefarm api``: host, port and token hashes come from the FACEFARM_* environment."""
    return [python, "-m", "facefarm", "api"]


def celery_worker_args(app: str, queue: str, name: str, python: str = sys.executable) -> list[str]:
    """One prefork Celery worker with one process, consuming one queue."""
    return [
        python, "-m", "celery", "-A", app, "worker",
        "-Q", queue, "-P", "prefork", "-c", "1",
        "-n", f"{name}@%h",
        "--without-gossip", "--without-mingle",
        "--loglevel", "INFO",
    ]  # fmt: skip


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gpu_present() -> bool:
    """Cheap check for an NVIDIA device, without importing torch in the CLI process."""
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists()


# --- processes -----------------------------------------------------------------------------------


@dataclass
class Child:
    """A service process in its own process group, with its output in a log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def exited(self) -> int | None:
        return self.process.poll()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def last_line(self) -> str:
        meaningful = [ln.strip() for ln in self.log_tail(60).splitlines() if ln.strip()]
        return meaningful[-1] if meaningful else "(no output)"


@dataclass
class EmbeddedFarm:
    """A running private farm: where its API is, the token for it, and its processes."""

    workdir: Path
    api_url: str
    token: str
    children: list[Child] = field(default_factory=list)

    def check_alive(self) -> None:
        """Raise if any service died: a dead worker would otherwise leave the job waiting forever."""
        for child in self.children:
            code = child.exited()
            if code is not None:
                raise BrokerUnavailableError(
                    f"embedded {child.name} exited with code {code}: {child.last_line()}",
                    service=child.name,
                )

    def client(self) -> FarmClient:
        return FarmClient(self.api_url, self.token)


def start_child(
    name: str, args: list[str], *, env: Mapping[str, str], workdir: Path, inherit_output: bool
) -> Child:
    log_path = workdir / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log: IO[bytes] = log_path.open("ab")
    try:
        process = subprocess.Popen(
            args,
            env=dict(env),
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=None if inherit_output else log,
            stderr=None if inherit_output else subprocess.STDOUT,
            start_new_session=True,  # its own process group: Ctrl-C reaches us, we stop it in order
        )
    except FileNotFoundError as exc:
        raise ConfigError(f"cannot start the embedded {name}: {args[0]} not found on PATH") from exc
    finally:
        log.close()
    return Child(name, process, log_path)


def stop_children(children: list[Child], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every process group, wait up to ``grace_s``, then SIGKILL whatever is left."""
    for child in children:
        _signal_group(child, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.process.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            pass
    for child in children:
        _signal_group(child, signal.SIGKILL)  # also reaps forked pool children left in the group
        try:
            child.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _signal_group(child: Child, sig: signal.Signals) -> None:
    try:
        os.killpg(child.process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_for_redis(child: Child, port: int, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.exited() is not None:
            raise BrokerUnavailableError(f"embedded redis-server failed: {child.last_line()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise BrokerUnavailableError(f"embedded redis-server did not answer on port {port} in {timeout_s:g} s")


def wait_for_api(child: Child, api_url: str, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.exited() is not None:
            raise BrokerUnavailableError(f"embedded API failed to start: {child.last_line()}")
        try:
            if httpx.get(f"{api_url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise BrokerUnavailableError(f"embedded API did not become healthy at {api_url} in {timeout_s:g} s")


def port_taken(port: int) -> bool:
    """True if something else now listens on ``port`` (a service lost the race for it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def start_on_free_port(
    start: Callable[[int], Child],
    wait: Callable[[Child, int], None],
    children: list[Child],
    attempts: int = START_ATTEMPTS,
) -> int:
    """Start a listening service on a free port; if another process grabbed the port between our
    check and the service's bind, stop it and try a fresh port. Returns the port it listens on."""
    for attempt in range(1, attempts + 1):
        port = free_port()
        child = start(port)
        try:
            wait(child, port)
            return port
        except BrokerUnavailableError:
            stop_children([child])
            children.remove(child)
            if attempt == attempts or not port_taken(port):
                raise
    raise AssertionError("unreachable: the last attempt re-raises")


def child_env(farm_env: Mapping[str, str], project_root: Path) -> dict[str, str]:
    """The children's environment: ours without any FACEFARM_* of the caller, plus the farm's."""
    # Inherit PATH, HOME, locale, CUDA variables; the farm's configuration comes only from farm_env.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("FACEFARM_")}
    paths = [str(project_root), *filter(None, inherited.get("PYTHONPATH", "").split(os.pathsep))]
    return {**inherited, **farm_env, "PYTHONPATH": os.pathsep.join(paths)}


@contextmanager
def _terminate_on_signals() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt so the same teardown runs as for Ctrl-C."""

    def _raise(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    with _signals_set_to(_raise, (signal.SIGTERM, signal.SIGHUP)):
        yield


@contextmanager
def _signals_set_to(handler: Any, signals: tuple[signal.Signals, ...]) -> Iterator[None]:
    """Temporarily handle ``signals`` with ``handler`` (only the main thread may; others skip it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def run_embedded_farm(settings: Settings, *, use_gpu: bool, debug: bool = False) -> Iterator[EmbeddedFarm]:
    """Start a private farm, yield it, and always stop it and delete its temp dir."""
    if shutil.which("redis-server") is None:
        raise ConfigError("embedded mode needs redis-server on PATH (or pass --api URL --token T)")
    workdir = Path(tempfile.mkdtemp(prefix="facefarm-embedded-"))
    children: list[Child] = []
    try:
        with _terminate_on_signals():
            token, token_hash = create_token()
            device = "cuda" if use_gpu and gpu_present() else "cpu"
            (workdir / "storage").mkdir()
            (workdir / "tmp").mkdir()
            root = Path(__file__).resolve().parent.parent

            def env_for(redis_port: int, api_port: int) -> dict[str, str]:
                values = embedded_settings(
                    settings,
                    redis_port=redis_port,
                    api_port=api_port,
                    storage_dir=workdir / "storage",
                    token_hash=token_hash,
                    device=device,
                )
                # children's temp files (chunk scratch, multiprocessing's pymp-* dirs) live in the
                # workdir, so a child killed at teardown leaves nothing behind once it is removed
                return {**child_env(settings_env(values), root), "TMPDIR": str(workdir / "tmp")}

            def start(name: str, args: list[str], env: Mapping[str, str]) -> Child:
                child = start_child(name, args, env=env, workdir=workdir, inherit_output=debug)
                children.append(child)
                return child

            redis_port = start_on_free_port(
                lambda port: start("redis-server", redis_args(port, workdir), env_for(port, 0)),
                wait_for_redis,
                children,
            )
            api_port = start_on_free_port(
                lambda port: start("API", api_args(), env_for(redis_port, port)),
                lambda child, port: wait_for_api(child, f"http://127.0.0.1:{port}"),
                children,
            )
            env = env_for(redis_port, api_port)
            tag = uuid.uuid4().hex[:8]
            start("CPU worker", celery_worker_args("dispatcher.celery_app", CPU_QUEUE, f"cpu-{tag}"), env)
            start("render worker", celery_worker_args("worker.celery_app", GPU_QUEUE, f"render-{tag}"), env)
            check_env = {**env, "CUDA_VISIBLE_DEVICES": "", "FACEFARM_DEVICE": "cpu"}
            start(
                "check worker",
                celery_worker_args("worker.celery_app", CHECK_QUEUE, f"check-{tag}"),
                check_env,
            )
            api_url = f"http://127.0.0.1:{api_port}"
            farm = EmbeddedFarm(workdir=workdir, api_url=api_url, token=token, children=children)
            farm.check_alive()
            yield farm
    finally:
        # Workers first (they hold tasks), then the API, then Redis; a second Ctrl-C or a SIGTERM
        # cannot cut the (bounded) teardown short and leave strays.
        with _signals_set_to(signal.SIG_IGN, (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)):
            stop_children(list(reversed(children)))
            shutil.rmtree(workdir, ignore_errors=True)


def render_embedded(
    settings: Settings,
    *,
    video: Path,
    face: Path,
    output: Path,
    options: JobOptions,
    reference: Path | None = None,
    use_gpu: bool = True,
    progress: Callable[[JobView], None] | None = None,
    debug: bool = False,
    timeout_s: float | None = None,
) -> JobView:
    """Run one job on a private farm and write its output to ``output``."""
    with run_embedded_farm(settings, use_gpu=use_gpu, debug=debug) as farm, farm.client() as client:

        def watch(view: JobView) -> None:
            if not view.status.finished:
                farm.check_alive()
            if progress is not None:
                progress(view)

        job_id = client.submit(video, face, options, reference=reference)
        view = client.wait(job_id, progress=watch, timeout_s=timeout_s)
        client.download(job_id, output)
        return view
