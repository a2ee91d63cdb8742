"""Worker lifecycle hooks: per-child resources, and the main process's liveness and self-block watch.

Children: resources are opened after fork and closed at exit. Opening is cheap (a Redis connection
pool and an S3 client, both lazy), well within the ``worker_proc_alive_timeout``; models and the CUDA
context are loaded later, on the first task.

Main process: a ``WorkerWatch`` thread heartbeats this worker into the state store (the live set the
render tasks consult to hand a chunk to another worker) and enforces the per-worker block that the
store sets after ``worker_block_after_failures`` failures in a row (research/renderfarm-celery.md
§1.2, Deadline's "a worker blocks itself"): a blocked worker stops consuming its queues
(``cancel_consumer``), says so in its heartbeat and its log, and consumes again once the block is
cleared (``facefarm worker --unblock``) or its TTL runs out.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from celery.signals import (
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)
from celery.utils.log import get_logger

from shared.cpus import format_cpu_list, pin_to
from shared.errors import FaceFarmError
from shared.names import GPU_QUEUE
from shared.settings import Settings, get_settings
from shared.state import JobStore
from worker.celery_app import app, close_resources, open_resources

log = get_logger("celery.worker.facefarm")


@worker_init.connect
def _pin_cpus(**_: Any) -> None:
    """Pin the main process to its CPU share before the pool forks: children inherit it."""
    cpus = pin_to(get_settings().cpu_affinity)
    if cpus is not None:
        log.info("pinned to CPUs %s (%d)", format_cpu_list(cpus), len(cpus))


@worker_process_init.connect
def _open_child_resources(**_: Any) -> None:
    open_resources()


@worker_process_shutdown.connect
def _close_child_resources(**_: Any) -> None:
    close_resources()


class WorkerWatch:
    """Heartbeat + block enforcement for one Celery worker (runs in its main process)."""

    def __init__(self, settings: Settings, name: str, queues: list[str]) -> None:
        self.settings = settings
        self.name = name
        self.queues = queues
        self.blocked = False
        self._stop = threading.Event()
        self._store = JobStore.from_settings(settings)
        self._thread = threading.Thread(target=self._loop, name=f"watch-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self._store.worker_gone(self.name)
        except FaceFarmError:
            pass
        self._store.close()

    @property
    def interval_s(self) -> float:
        return max(0.2, min(self.settings.heartbeat_interval_s, self.settings.worker_seen_ttl_s / 3))

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except FaceFarmError as exc:  # Redis down: keep trying; nothing to enforce meanwhile
                log.warning("worker watch: %s", exc)
            self._stop.wait(self.interval_s)

    def tick(self) -> None:
        """One heartbeat; stop or resume consuming when the block appears or goes away."""
        block = self._store.worker_block(self.name)
        if block is not None and not self.blocked:
            self.blocked = True
            for queue in self.queues:
                app.control.cancel_consumer(queue, destination=[self.name])
            log.warning(
                "worker %s is BLOCKED after %s failures in a row (last: %s): stopped consuming %s; "
                "resume with `facefarm worker --unblock` or wait %d s",
                self.name,
                block.get("failures", "repeated"),
                block.get("reason"),
                ",".join(self.queues),
                self.settings.worker_block_ttl_s,
            )
        elif block is None and self.blocked:
            self.blocked = False
            for queue in self.queues:
                app.control.add_consumer(queue, destination=[self.name])
            log.warning("worker %s is unblocked: consuming %s again", self.name, ",".join(self.queues))
        state = "blocked" if self.blocked else "ok"
        extra = {"pid": str(os.getpid()), "queues": ",".join(self.queues)}
        if block is not None:
            extra["blocked_reason"] = str(block.get("reason", ""))
        self._store.worker_seen(self.name, state=state, **extra)


_watch: list[WorkerWatch] = []


@worker_ready.connect
def _start_watch(sender: Any = None, **_: Any) -> None:
    name = getattr(sender, "hostname", None)
    if not name:
        return
    queues = sorted(sender.app.amqp.queues.consume_from)
    if GPU_QUEUE not in queues:  # a check-only process renders nothing: not a chunk's candidate
        return
    watch = WorkerWatch(get_settings(), name, queues)
    watch.start()
    _watch.append(watch)


@worker_shutdown.connect
def _stop_watch(**_: Any) -> None:
    while _watch:
        _watch.pop().stop()
