"""``facefarm.render_chunk``: the Celery shell around ``worker.pipeline.render_chunk``.

Claim the chunk (a fenced attempt, counted against ``max_attempts``), fetch the inputs, run the
pipeline while a background thread heartbeats progress, upload the output atomically to its
deterministic key, commit with a compare-and-set on the attempt id, and enqueue the merge if this
commit was the last. Errors are handled by class: retryable → retry (counted), permanent → chunk and
job FAILED, stale attempt → drop silently, cancelled → stop and hand the chunk back.

Poison handling (research/renderfarm-celery.md §1.2, §2.3): the store counts every delivery against
``max_attempts`` (a killed child's redelivery included), records which workers failed a chunk and
blocks a worker after ``worker_block_after_failures`` failures in a row; a worker that already failed
a chunk, or is blocked, hands it on to an eligible one, and a chunk with no eligible worker left
fails its job instead of waiting forever. ``worker.faults`` is a test hook (off in production).
"""

from __future__ import annotations

import importlib
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from shared.errors import (
    AttemptsExhaustedError,
    AvoidWorkerError,
    BrokerUnavailableError,
    FaceFarmError,
    JobCancelledError,
    PermanentError,
    RetryableError,
    StaleAttemptError,
)
from shared.names import CPU_QUEUE, GPU_QUEUE, MERGE_JOB, RENDER_CHUNK
from shared.schemas import ChunkSpec, ChunkStats
from shared.settings import Settings
from shared.state import JobStore
from shared.storage import Storage
from worker.celery_app import WorkerResources, app, get_resources
from worker.faults import chunk_faults, fire_before_render, slowed

RETRY_BACKOFF_S = (1.0, 5.0, 15.0, 30.0)
MAX_HOPS = 20  # hand-ons of one chunk before a worker that failed it tries again anyway
HAND_ON_PAUSE_S = 0.5


class Heartbeat:
    """A background thread that reports frames done and liveness every ``interval_s``.

    The pipeline only sets a number (``progress``) and asks ``should_stop``; all Redis traffic of the
    heartbeat happens here, so a slow store never stalls rendering.
    """

    def __init__(
        self,
        store: JobStore,
        job_id: str,
        index: int,
        attempt_id: str,
        interval_s: float,
        *,
        worker: str = "",
        telemetry: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self._store = store
        self._worker = worker
        self._telemetry = telemetry
        self._job_id = job_id
        self._index = index
        self._attempt_id = attempt_id
        self._interval_s = interval_s
        self._frames_done = 0
        self._wake = threading.Event()
        self._done = threading.Event()
        self.stale = threading.Event()
        self.cancelled = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{job_id}-{index}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._wake.set()
        self._thread.join(timeout=max(5.0, self._interval_s * 2))

    def progress(self, frames_done: int) -> None:
        self._frames_done = frames_done

    def should_stop(self) -> bool:
        """True once the job is cancelled or another attempt took the chunk (checked between batches)."""
        if self.stale.is_set() or self.cancelled.is_set():
            return True
        try:
            if self._store.is_cancelled(self._job_id):
                self.cancelled.set()
        except BrokerUnavailableError:
            return False
        return self.cancelled.is_set()

    def _beat(self) -> None:
        try:
            if not self._store.heartbeat(self._job_id, self._index, self._attempt_id, self._frames_done):
                self.cancelled.set()
        except StaleAttemptError:
            self.stale.set()
        except BrokerUnavailableError:
            pass  # the next beat tries again; the reconciler only acts after stall_after_s
        if self._telemetry is not None and self._worker:
            try:
                self._store.worker_runtime(self._worker, self._telemetry())
            except BrokerUnavailableError:
                pass

    def _loop(self) -> None:
        while not self._done.is_set():
            self._beat()
            self._wake.wait(self._interval_s)
        if not self.stale.is_set():
            self._beat()


def _runtime_stats(settings: Settings) -> dict[str, Any]:
    """The process's GPU telemetry (imported lazily: torch is loaded only by the render child)."""
    from worker.session import get_session

    return get_session(settings).stats()


def _key_of(uri: str) -> str:
    """The storage key of a chunk's output URI (``.../jobs/J/chunks/00003/output.mp4``)."""
    path = PurePosixPath(urlparse(uri).path)
    parts = path.parts
    start = len(parts) - 1 - list(reversed(parts)).index("jobs")
    return "/".join(parts[start:])


def _fetch(storage: Storage, uri: str, dest: Path) -> Path:
    where = storage.local_path_or_url(uri)
    return Path(where) if "://" not in where else storage.get_to_path(uri, dest)


def _suffix(uri: str, default: str) -> str:
    return PurePosixPath(urlparse(uri).path).suffix or default


def _render_attempt(
    res: WorkerResources,
    spec: ChunkSpec,
    attempt_id: str,
    heartbeat: Heartbeat,
    workdir: Path,
    on_progress: Callable[[int], None] | None = None,
) -> ChunkStats:
    from worker.pipeline import render_chunk as run_pipeline  # lazily: torch/CUDA only in the child

    storage, settings = res.storage, res.settings
    source = storage.local_path_or_url(spec.source_uri)
    face_path = _fetch(storage, spec.face_uri, workdir / f"face{_suffix(spec.face_uri, '.png')}")
    reference_path = None
    if spec.options.reference_uri:
        reference_path = _fetch(
            storage,
            spec.options.reference_uri,
            workdir / f"reference{_suffix(spec.options.reference_uri, '.png')}",
        )
    output_path = workdir / f"output{_suffix(spec.output_uri, '.mp4')}"

    def log(line: str) -> None:
        res.store.append_log(spec.job_id, f"chunk {spec.index}: {line}")

    stats = run_pipeline(
        spec,
        source=source,
        face_path=face_path,
        output_path=output_path,
        settings=settings,
        on_progress=on_progress or heartbeat.progress,
        should_stop=heartbeat.should_stop,
        log=log,
        reference_path=reference_path,
    )
    if heartbeat.stale.is_set():
        raise StaleAttemptError(f"chunk {spec.index} of job {spec.job_id} was taken over by another attempt")
    storage.put_file(_key_of(spec.output_uri), output_path)
    return stats


def _retry_countdown_s(delivery: int) -> float:
    return RETRY_BACKOFF_S[min(delivery - 1, len(RETRY_BACKOFF_S) - 1)]


def _hand_on(job_id: str, index: int, hops: int, why: str, store: JobStore) -> dict[str, Any]:
    """Put the chunk back on the gpu queue for another worker (a new message; this one is acked)."""
    store.append_log(job_id, f"chunk {index}: {why}; handed on")
    time.sleep(HAND_ON_PAUSE_S)  # let an idle worker's waiting BRPOP take it rather than us again
    app.send_task(
        RENDER_CHUNK,
        args=[job_id, index],
        kwargs={"hops": hops + 1},
        queue=GPU_QUEUE,
        task_id=f"render-{job_id}-{index:05d}-{uuid.uuid4().hex[:8]}",
        argsrepr=f"job={job_id} chunk={index} hop={hops + 1}",
    )
    return {"job_id": job_id, "index": index, "handed_on": why}


def _eligible_others(res: WorkerResources, worker: str) -> list[str]:
    """Live render workers other than this one that are not blocked."""
    live = [w for w in res.store.live_workers(res.settings.worker_seen_ttl_s) if w != worker]
    blocked = res.store.blocked_workers(live)
    return [w for w in live if w not in blocked]


@app.task(name=RENDER_CHUNK, bind=True)
def render_chunk(self: Task, job_id: str, index: int, hops: int = 0) -> dict[str, Any]:
    """Render chunk ``index`` of ``job_id`` as one fenced attempt.

    Before claiming it: a blocked worker hands the chunk on (or, if no other worker is left, fails
    the job rather than let it hang); a worker that already failed this chunk hands it to one that
    has not (at most ``MAX_HOPS`` times, then it tries itself while attempts remain).
    """
    res = get_resources()
    store, settings = res.store, res.settings
    worker = self.request.hostname or socket.gethostname()
    importlib.import_module("worker.pipeline")  # a new child's heavy imports, before the chunk is claimed

    try:
        others = _eligible_others(res, worker)
        block = store.worker_block(worker)
        if block is not None:
            if others or hops >= MAX_HOPS:
                return _hand_on(job_id, index, hops, f"{worker} is blocked ({block.get('reason')})", store)
            error = AttemptsExhaustedError(
                f"chunk {index} has no eligible worker left: {worker} is blocked after repeated failures "
                f"({block.get('reason')}) and no other render worker is live; fix it and run "
                "`facefarm worker --unblock`, then `facefarm retry JOB`"
            )
            if store.fail_job(job_id, error):
                store.append_log(job_id, f"chunk {index}: {error}")
            return {"job_id": job_id, "index": index, "failed": str(error)}
        started = store.start_attempt(
            job_id,
            index,
            worker,
            task_id=self.request.id or "",
            duplicate_guard_s=settings.stall_after_s,
            other_workers=others if hops < MAX_HOPS else (),
        )
    except AvoidWorkerError as exc:
        return _hand_on(job_id, index, hops, str(exc), store)
    except (StaleAttemptError, JobCancelledError) as exc:
        return {"job_id": job_id, "index": index, "dropped": str(exc)}
    except AttemptsExhaustedError as exc:
        store.append_log(job_id, f"chunk {index}: {exc}")
        return {"job_id": job_id, "index": index, "failed": str(exc)}

    attempt_id, spec = started.attempt_id, started.spec
    store.append_log(job_id, f"chunk {index}: attempt {started.delivery} started on {worker}")
    t0 = time.monotonic()
    heartbeat = Heartbeat(
        store,
        job_id,
        index,
        attempt_id,
        settings.heartbeat_interval_s,
        worker=worker,
        telemetry=lambda: _runtime_stats(settings),
    )
    try:
        injected = chunk_faults(settings, store, job_id, index, worker)  # a test hook; normally []
        with tempfile.TemporaryDirectory(prefix=f"ff-{job_id}-{index:05d}-") as tmp, heartbeat:
            fire_before_render(injected, f"chunk {index} of job {job_id} on {worker}")
            progress = slowed(heartbeat.progress, injected)
            stats = _render_attempt(res, spec, attempt_id, heartbeat, Path(tmp), progress)
        is_last = store.commit_chunk(job_id, index, attempt_id, stats)
    except StaleAttemptError:
        return {"job_id": job_id, "index": index, "dropped": "stale attempt"}
    except JobCancelledError:
        if heartbeat.stale.is_set():
            return {"job_id": job_id, "index": index, "dropped": "stale attempt"}
        store.release_attempt(job_id, index, attempt_id, "cancelled")
        store.append_log(job_id, f"chunk {index}: stopped, the job was cancelled")
        return {"job_id": job_id, "index": index, "cancelled": True}
    except SoftTimeLimitExceeded as exc:
        error: FaceFarmError = RetryableError(
            f"chunk {index} exceeded the soft time limit of {res.settings.task_soft_time_limit_s} s"
        )
        return _fail(self, store, job_id, index, attempt_id, started.delivery, error, exc)
    except FaceFarmError as exc:
        return _fail(self, store, job_id, index, attempt_id, started.delivery, exc, exc)
    except Exception as exc:  # an unexpected bug still counts as a (limited) retryable failure
        error = RetryableError(f"{type(exc).__name__}: {exc}")
        return _fail(self, store, job_id, index, attempt_id, started.delivery, error, exc)

    seconds = time.monotonic() - t0
    store.append_log(
        job_id, f"chunk {index}: committed {stats.frames} frames in {seconds:.1f} s on {stats.device}"
    )
    if is_last:
        store.append_log(job_id, "all chunks committed; merge enqueued")
        app.send_task(
            MERGE_JOB,
            args=[job_id],
            queue=CPU_QUEUE,
            task_id=f"merge-{job_id}-{uuid.uuid4().hex[:8]}",
            argsrepr=f"job={job_id}",
        )
    return {"job_id": job_id, "index": index, "frames": stats.frames, "last": is_last}


def _fail(
    task: Task,
    store: JobStore,
    job_id: str,
    index: int,
    attempt_id: str,
    delivery: int,
    error: FaceFarmError,
    exc: BaseException,
) -> dict[str, Any]:
    """Record the failed attempt; retry retryable errors while attempts remain, else end the job FAILED."""
    if not isinstance(error, PermanentError | RetryableError):
        error = RetryableError(str(error))
    try:
        will_retry = store.fail_chunk(job_id, index, attempt_id, error)
    except StaleAttemptError:
        return {"job_id": job_id, "index": index, "dropped": "stale attempt"}
    store.append_log(job_id, f"chunk {index}: attempt {delivery} failed: {error}")
    if will_retry:
        raise task.retry(exc=exc, countdown=_retry_countdown_s(delivery), max_retries=None)
    return {"job_id": job_id, "index": index, "failed": str(error)}
