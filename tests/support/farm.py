"""A farm of real processes for tests: redis-server, N render workers and one CPU worker.

Workers run on the CPU (``FACEFARM_DEVICE=cpu``) with the real pipeline and the shipped weights
from the test model store. The test process builds its ``Settings`` from the same values the
workers get in their environment, so both sides agree.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from shared.settings import Settings
from tests.support.services import CeleryWorker, redis_server, start_celery_worker

DEFAULT_TEST_MODEL_STORE = str(Path.home() / ".cache" / "facefarm" / "models")
RENDER_APP, RENDER_QUEUE = "worker.celery_app", "gpu"
CPU_APP, CPU_QUEUE = "dispatcher.celery_app", "cpu"
CHECK_QUEUE = "check"  # the face check before planning: the render app, on the CPU


def model_store_path() -> Path:
    """The session-wide model store (``FACEFARM_TEST_MODEL_STORE`` overrides), filled on first use."""
    from shared.model_store import ensure_store

    return ensure_store(Path(os.environ.get("FACEFARM_TEST_MODEL_STORE", DEFAULT_TEST_MODEL_STORE)))


def farm_env(
    redis_url: str, storage_url: str, inputs: Path, overrides: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The farm's settings as FACEFARM_* environment values: small, fast and deterministic."""
    return {
        "FACEFARM_REDIS_URL": redis_url,
        "FACEFARM_STORAGE_URL": storage_url,
        "FACEFARM_FILE_ROOTS": json.dumps([str(inputs)]),
        "FACEFARM_DEVICE": "cpu",
        "FACEFARM_MODEL_STORE": str(model_store_path()),
        "FACEFARM_BATCH_FRAMES": "4",
        "FACEFARM_CHUNK_FRAMES": "15",
        "FACEFARM_WARMUP_FRAMES": "2",
        "FACEFARM_HEARTBEAT_INTERVAL_S": "0.5",
        "FACEFARM_STALL_AFTER_S": "60",
        "FACEFARM_TASK_TIME_LIMIT_S": "600",
        "FACEFARM_TASK_SOFT_TIME_LIMIT_S": "570",
        "FACEFARM_VISIBILITY_TIMEOUT_S": "1200",
        "FACEFARM_ENCODER_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        **(overrides or {}),
    }


def settings_from(values: Mapping[str, str], **extra: object) -> Settings:
    """The ``Settings`` a process with ``values`` in its environment would build (plus ``extra``).

    Like pydantic-settings' environment source, list and dict values arrive as JSON text.
    """
    prefix = "FACEFARM_"
    fields: dict[str, object] = {}
    for key, value in values.items():
        if key.startswith(prefix):
            fields[key[len(prefix) :].lower()] = json.loads(value) if value.startswith(("[", "{")) else value
    return Settings(**{**fields, **extra})  # type: ignore[arg-type]


@dataclass
class FarmProcesses:
    """A running farm: its settings, the workers' environment, and the worker handles."""

    settings: Settings
    env: dict[str, str]
    inputs: Path
    render_workers: list[CeleryWorker]
    cpu_worker: CeleryWorker
    check_worker: CeleryWorker

    def worker_logs(self, tail_chars: int = 3000) -> str:
        return "\n".join(
            f"--- {w.name} ---\n{w.log()[-tail_chars:]}"
            for w in [*self.render_workers, self.cpu_worker, self.check_worker]
        )


def eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Whether ``condition()`` holds within ``timeout_s``, polled every 50 ms.

    For what the farm does just after a state a test waits for: the merge drops a job's chunks
    right after it records COMPLETED (so a crash in between keeps them), so a client that sees
    COMPLETED can still see the chunks for a moment.
    """
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def stop_all(workers: list[CeleryWorker]) -> None:
    """Signal every worker first, then wait for each: shutdowns overlap instead of queueing."""
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.stop()


@contextmanager
def run_farm(
    workdir: Path,
    storage_url: str,
    overrides: Mapping[str, str] | None = None,
    *,
    render_workers: int = 2,
) -> Iterator[FarmProcesses]:
    """redis-server + ``render_workers`` gpu-queue workers + 1 cpu-queue and 1 check-queue worker;
    all stopped on exit."""
    inputs = workdir / "inputs"
    inputs.mkdir()
    logs = workdir / "logs"
    logs.mkdir()
    with ExitStack() as stack:
        redis_url = stack.enter_context(redis_server(workdir))
        env = farm_env(redis_url, storage_url, inputs, overrides)
        workers: list[CeleryWorker] = []
        stack.callback(stop_all, workers)
        for i in range(render_workers):
            workers.append(start_celery_worker(RENDER_APP, RENDER_QUEUE, f"render{i}", env, logs))
        workers.append(start_celery_worker(CPU_APP, CPU_QUEUE, "cpu0", env, logs))
        workers.append(start_celery_worker(RENDER_APP, CHECK_QUEUE, "check0", env, logs))
        for worker in workers:
            worker.wait_ready()
        yield FarmProcesses(settings_from(env), env, inputs, workers[:-2], workers[-2], workers[-1])
