"""The job store: the truth about jobs, chunks and attempts, kept in Redis.

Celery only carries "run chunk X"; who owns a chunk, how often it was delivered, how far it got and
whether it is committed lives here. Every multi-step change is one Lua script, so the fencing
(compare-and-set on the attempt id), the delivery cap and the "exactly one attempt commits the last
chunk" counter stay atomic across any number of workers. This is the only module that imports redis.

Layout (``shared.names``): ``ff:job:{id}`` hash, ``ff:job:{id}:chunk:{i}`` hashes,
``ff:job:{id}:committed`` set, ``ff:job:{id}:log`` list, ``ff:owner:{owner}:jobs`` zset,
``ff:jobs:active`` set, ``ff:jobs:finished`` zset (score = finish time), ``ff:lock:{name}`` strings.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import redis
import redis.exceptions

from shared import state_scripts as scripts
from shared.errors import (
    AttemptsExhaustedError,
    AvoidWorkerError,
    BrokerUnavailableError,
    DuplicateDeliveryError,
    FaceFarmError,
    JobCancelledError,
    NotFoundError,
    PermanentError,
    StaleAttemptError,
)
from shared.names import KEY_PREFIX, chunk_key, job_key
from shared.schemas import ChunkSpec, ChunkStats, ChunkStatus, JobOptions, JobStatus, JobView
from shared.settings import Settings

LOG_LINES_MAX = 1000
ERROR_MAX_CHARS = 500

# Which statuses a job may come FROM to reach each status (retry re-enters QUEUED or RENDERING).
ALLOWED_FROM: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.FAILED, JobStatus.CANCELLED}),
    JobStatus.PLANNING: frozenset({JobStatus.QUEUED}),
    JobStatus.RENDERING: frozenset({JobStatus.PLANNING, JobStatus.FAILED, JobStatus.CANCELLED}),
    JobStatus.MERGING: frozenset({JobStatus.RENDERING}),
    JobStatus.COMPLETED: frozenset({JobStatus.MERGING}),
    JobStatus.FAILED: frozenset(
        {JobStatus.QUEUED, JobStatus.PLANNING, JobStatus.RENDERING, JobStatus.MERGING}
    ),
    JobStatus.CANCELLED: frozenset(
        {JobStatus.QUEUED, JobStatus.PLANNING, JobStatus.RENDERING, JobStatus.MERGING}
    ),
}

P = ParamSpec("P")
R = TypeVar("R")


def _translated(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn redis-py failures into ``BrokerUnavailableError`` (retryable) at this one boundary."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise BrokerUnavailableError(
                f"the state store (Redis) is not reachable: {exc}; check FACEFARM_REDIS_URL and that redis-server runs"
            ) from exc
        except redis.exceptions.RedisError as exc:
            raise BrokerUnavailableError(f"the state store (Redis) refused an operation: {exc}") from exc

    return wrapper


# --- key helpers -----------------------------------------------------------------------------


def _committed_key(job_id: str) -> str:
    return f"{job_key(job_id)}:committed"


def _log_key(job_id: str) -> str:
    return f"{job_key(job_id)}:log"


def _owner_key(owner: str) -> str:
    return f"{KEY_PREFIX}:owner:{owner}:jobs"


ACTIVE_KEY = f"{KEY_PREFIX}:jobs:active"
WORKERS_KEY = f"{KEY_PREFIX}:workers"  # zset: render worker name -> last seen (epoch s)
WORKER_PREFIX = f"{KEY_PREFIX}:worker:"  # + name: hash (state, counters); + name + ":blocked": string, TTL


def _worker_key(name: str) -> str:
    return f"{WORKER_PREFIX}{name}"


def _blocked_key(name: str) -> str:
    return f"{WORKER_PREFIX}{name}:blocked"


def _faults_key(job_id: str) -> str:
    return f"{job_key(job_id)}:faults"


FINISHED_KEY = f"{KEY_PREFIX}:jobs:finished"


def _lock_key(name: str) -> str:
    return f"{KEY_PREFIX}:lock:{name}"


# --- records -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """One try at a chunk: which worker, when, and how it ended."""

    attempt_id: str
    worker: str
    start: float
    end: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class ChunkRecord:
    index: int
    spec: ChunkSpec
    status: ChunkStatus
    frame_count: int
    attempt_id: str
    worker: str
    heartbeat_at: float
    frames_done: int  # of the current attempt
    hwm: int  # the most frames any attempt of this chunk reported; never decreases
    deliveries: int
    attempts: tuple[Attempt, ...]
    error: str
    stats: ChunkStats | None
    failed_workers: tuple[str, ...] = ()  # workers whose attempt at this chunk failed or died

    @property
    def progress_frames(self) -> int:
        return self.frame_count if self.status is ChunkStatus.COMMITTED else min(self.hwm, self.frame_count)


@dataclass(frozen=True)
class JobRecord:
    """A job as stored; the tasks read inputs, options and plan facts from it."""

    job_id: str
    owner: str
    status: JobStatus
    options: JobOptions
    video_uri: str
    face_uri: str
    reference_uri: str | None
    output_uri: str | None
    error: str | None
    error_kind: str | None
    created_at: float
    updated_at: float
    finished_at: float | None
    frames_total: int
    chunks_total: int
    cancelled: bool
    video_info: dict[str, Any] | None
    encoder: dict[str, Any] | None
    audit: dict[str, Any]
    fields: Mapping[str, str] = field(repr=False, default_factory=dict)


@dataclass(frozen=True)
class StartedAttempt:
    attempt_id: str
    delivery: int
    spec: ChunkSpec


@dataclass(frozen=True)
class RetryPlan:
    """What ``reset_for_retry`` decided: plan again, render these chunks, or only merge."""

    action: str  # "replan" | "render" | "merge"
    indices: tuple[int, ...] = ()


@dataclass(frozen=True)
class StalledChunk:
    job_id: str
    index: int
    attempt_id: str
    heartbeat_at: float


def _f(value: str | None, default: float = 0.0) -> float:
    return float(value) if value not in (None, "") else default


def _i(value: str | None, default: int = 0) -> int:
    return int(float(value)) if value not in (None, "") else default


def _json(value: str | None) -> Any:
    return json.loads(value) if value else None


def _as_list(value: Any) -> list[Any]:
    # Lua's cjson encodes an empty table as {}; treat that as an empty list.
    return value if isinstance(value, list) else []


# --- the store ---------------------------------------------------------------------------------


class JobStore:
    """Redis-backed job → chunks → attempts store; every method is safe to call from many processes."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        max_attempts: int,
        log_lines_max: int = LOG_LINES_MAX,
        block_after_failures: int = 0,
        block_ttl_s: int = 3600,
    ) -> None:
        self._r: Any = client  # decode_responses=True: replies are str (the type hints cannot tell)
        self.max_attempts = max_attempts
        self.block_after_failures = block_after_failures  # 0 = never block a worker
        self.block_ttl_s = block_ttl_s
        self.log_lines_max = log_lines_max
        self._scripts = {
            name: client.register_script(src)
            for name, src in {
                "set_status": scripts.SET_STATUS,
                "cancel": scripts.REQUEST_CANCEL,
                "plan": scripts.RECORD_PLAN,
                "start": scripts.START_ATTEMPT,
                "heartbeat": scripts.HEARTBEAT,
                "commit": scripts.COMMIT,
                "fail": scripts.FAIL_CHUNK,
                "release": scripts.RELEASE,
                "retry": scripts.RESET_FOR_RETRY,
                "complete": scripts.COMPLETE,
                "lock": scripts.LOCK,
                "unlock": scripts.UNLOCK,
            }.items()
        }

    @classmethod
    def from_url(
        cls,
        redis_url: str,
        *,
        max_attempts: int,
        socket_timeout_s: float = 10.0,
        block_after_failures: int = 0,
        block_ttl_s: int = 3600,
    ) -> JobStore:
        client = redis.Redis.from_url(
            redis_url,
            decode_responses=True,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            health_check_interval=25,
            retry_on_timeout=True,
        )
        return cls(
            client,
            max_attempts=max_attempts,
            block_after_failures=block_after_failures,
            block_ttl_s=block_ttl_s,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> JobStore:
        return cls.from_url(
            settings.redis_url,
            max_attempts=settings.max_attempts,
            block_after_failures=settings.worker_block_after_failures,
            block_ttl_s=settings.worker_block_ttl_s,
        )

    def close(self) -> None:
        self._r.close()

    @_translated
    def ping(self) -> bool:
        return bool(self._r.ping())

    # --- jobs ------------------------------------------------------------------------------

    @_translated
    def create_job(
        self,
        job_id: str,
        *,
        owner: str,
        options: JobOptions,
        video_uri: str,
        face_uri: str,
        reference_uri: str | None = None,
        input_sha256: Mapping[str, str] | None = None,
        input_names: Mapping[str, str] | None = None,
        now: float | None = None,
    ) -> JobView:
        """Record a new QUEUED job; the inputs are already in storage."""
        now = time.time() if now is None else now
        audit = {
            "job_id": job_id,
            "owner": owner,
            "inputs": {"video": video_uri, "face": face_uri, "reference": reference_uri},
            "input_sha256": dict(input_sha256 or {}),
            "input_names": dict(input_names or {}),
            "options": options.model_dump(mode="json"),
            "created_at": now,
        }
        mapping = {
            "job_id": job_id,
            "owner": owner,
            "status": JobStatus.QUEUED.value,
            "options": options.model_dump_json(),
            "video_uri": video_uri,
            "face_uri": face_uri,
            "reference_uri": reference_uri or "",
            "output_uri": "",
            "error": "",
            "error_kind": "",
            "created_at": repr(now),
            "updated_at": repr(now),
            "frames_total": "0",
            "chunks_total": "0",
            "cancel": "0",
            "audit": json.dumps(audit),
        }
        if not self._r.hsetnx(job_key(job_id), "job_id", job_id):
            raise PermanentError(f"job {job_id} already exists", job_id=job_id)
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(job_key(job_id), mapping=mapping)
        pipe.zadd(_owner_key(owner), {job_id: now})
        pipe.sadd(ACTIVE_KEY, job_id)
        pipe.execute()
        return self.view(job_id, now=now)

    @_translated
    def exists(self, job_id: str) -> bool:
        return bool(self._r.exists(job_key(job_id)))

    @_translated
    def get_job(self, job_id: str) -> JobRecord:
        raw = self._r.hgetall(job_key(job_id))
        if not raw or "status" not in raw:
            raise NotFoundError(f"no job {job_id!r}", job_id=job_id)
        return self._job_record(raw)

    @staticmethod
    def _job_record(raw: Mapping[str, str]) -> JobRecord:
        return JobRecord(
            job_id=raw["job_id"],
            owner=raw["owner"],
            status=JobStatus(raw["status"]),
            options=JobOptions.model_validate_json(raw["options"]),
            video_uri=raw["video_uri"],
            face_uri=raw["face_uri"],
            reference_uri=raw.get("reference_uri") or None,
            output_uri=raw.get("output_uri") or None,
            error=raw.get("error") or None,
            error_kind=raw.get("error_kind") or None,
            created_at=_f(raw.get("created_at")),
            updated_at=_f(raw.get("updated_at")),
            finished_at=_f(raw["finished_at"]) if raw.get("finished_at") else None,
            frames_total=_i(raw.get("frames_total")),
            chunks_total=_i(raw.get("chunks_total")),
            cancelled=raw.get("cancel") == "1",
            video_info=_json(raw.get("video_info")),
            encoder=_json(raw.get("encoder")),
            audit=_json(raw.get("audit")) or {},
            fields=dict(raw),
        )

    @_translated
    def list_jobs(self, owner: str, *, now: float | None = None) -> list[JobView]:
        """The owner's jobs, newest first."""
        ids = self._r.zrevrange(_owner_key(owner), 0, -1)
        views = []
        for job_id in ids:
            try:
                views.append(self.view(job_id, now=now))
            except NotFoundError:
                continue
        return views

    @_translated
    def set_status(
        self,
        job_id: str,
        status: JobStatus,
        *,
        error: FaceFarmError | str | None = None,
        error_kind: str | None = None,
        now: float | None = None,
    ) -> bool:
        """Move the job to ``status`` if ``ALLOWED_FROM`` permits it from where it is; True if it moved."""
        message, kind = _error_fields(error, error_kind)
        allowed = sorted(s.value for s in ALLOWED_FROM[status])
        ok, _ = self._scripts["set_status"](
            keys=[job_key(job_id), ACTIVE_KEY, FINISHED_KEY],
            args=[status.value, repr(_now(now)), job_id, message, kind, *allowed],
        )
        return bool(ok)

    @_translated
    def fail_job(self, job_id: str, error: FaceFarmError | str, *, now: float | None = None) -> bool:
        """End the job FAILED with ``error`` (from any unfinished status)."""
        return self.set_status(job_id, JobStatus.FAILED, error=error, now=now)

    @_translated
    def record_video_info(self, job_id: str, video_info_json: str) -> None:
        self._r.hset(job_key(job_id), "video_info", video_info_json)

    @_translated
    def record_plan(
        self,
        job_id: str,
        specs: Sequence[ChunkSpec],
        *,
        frames_total: int,
        video_info_json: str,
        now: float | None = None,
    ) -> bool:
        """Store the chunks and move PLANNING → RENDERING; False if the job was cancelled meanwhile."""
        if not specs:
            raise ValueError("a plan needs at least one chunk")
        encoder = specs[0].encoder.model_dump_json()
        keys = [job_key(job_id), ACTIVE_KEY, FINISHED_KEY, *(chunk_key(job_id, s.index) for s in specs)]
        args = [repr(_now(now)), job_id, str(frames_total), video_info_json, encoder]
        args += [s.model_dump_json() for s in specs]
        return bool(self._scripts["plan"](keys=keys, args=args))

    @_translated
    def request_cancel(self, job_id: str, *, now: float | None = None) -> bool:
        """Set the cancel flag and end the job CANCELLED; False if it had already finished."""
        result = self._scripts["cancel"](
            keys=[job_key(job_id), ACTIVE_KEY, FINISHED_KEY], args=[repr(_now(now)), job_id]
        )
        if result == -1:
            raise NotFoundError(f"no job {job_id!r}", job_id=job_id)
        return result == 1

    @_translated
    def is_cancelled(self, job_id: str) -> bool:
        return self._r.hget(job_key(job_id), "cancel") == "1"

    @_translated
    def reset_for_retry(self, job_id: str, *, now: float | None = None) -> RetryPlan:
        """Put a FAILED/CANCELLED job back to work; committed chunks are kept, the rest start over."""
        total = self._chunks_total(job_id)
        keys = [job_key(job_id), ACTIVE_KEY, FINISHED_KEY, *(chunk_key(job_id, i) for i in range(total))]
        result = self._scripts["retry"](keys=keys, args=[repr(_now(now)), job_id])
        action = result[0]
        if action == "missing":
            raise NotFoundError(f"no job {job_id!r}", job_id=job_id)
        if action == "refused":
            raise PermanentError(
                f"job {job_id} is {result[1]}; only FAILED or CANCELLED jobs can be retried", job_id=job_id
            )
        return RetryPlan(action=action, indices=tuple(int(i) for i in result[1:]))

    @_translated
    def complete_job(
        self, job_id: str, *, output_uri: str, output_sha256: str, now: float | None = None
    ) -> bool:
        """MERGING → COMPLETED with the output's URI and digest; False if the job was not merging."""
        return bool(
            self._scripts["complete"](
                keys=[job_key(job_id), ACTIVE_KEY, FINISHED_KEY],
                args=[repr(_now(now)), job_id, output_uri, output_sha256],
            )
        )

    @_translated
    def mark(self, job_id: str, **values: str) -> None:
        """Set bookkeeping fields on the job (e.g. retention marks)."""
        self._r.hset(job_key(job_id), mapping=values)

    def _chunks_total(self, job_id: str) -> int:
        raw = self._r.hget(job_key(job_id), "chunks_total")
        if raw is None:
            raise NotFoundError(f"no job {job_id!r}", job_id=job_id)
        return int(raw)

    # --- chunks -----------------------------------------------------------------------------

    @_translated
    def get_chunk(self, job_id: str, index: int) -> ChunkRecord:
        raw = self._r.hgetall(chunk_key(job_id, index))
        if not raw:
            raise NotFoundError(f"job {job_id} has no chunk {index}", job_id=job_id, chunk_index=index)
        return _chunk_record(raw)

    @_translated
    def chunks(self, job_id: str) -> list[ChunkRecord]:
        total = self._chunks_total(job_id)
        pipe = self._r.pipeline(transaction=False)
        for i in range(total):
            pipe.hgetall(chunk_key(job_id, i))
        return [_chunk_record(raw) for raw in pipe.execute() if raw]

    @_translated
    def start_attempt(
        self,
        job_id: str,
        index: int,
        worker: str,
        *,
        task_id: str = "",
        duplicate_guard_s: float | None = None,
        other_workers: Sequence[str] = (),
        now: float | None = None,
    ) -> StartedAttempt:
        """Claim the chunk for a new attempt and count the delivery.

        A RUNNING attempt that never ended is taken over: its worker is recorded as having failed
        the chunk ("lost"), and the failure counts towards that worker's block. Except: with
        ``duplicate_guard_s``, a message other than the one that started the running attempt
        (``task_id``), for a chunk another worker heartbeat within that many seconds, is a
        duplicate (``DuplicateDeliveryError``). The same message again is Celery's redelivery after
        its process died, so that attempt is lost.
        ``other_workers`` are the live, unblocked workers that could take the chunk instead; if
        this worker already failed it and one of them has not, ``AvoidWorkerError`` says so.

        Raises ``JobCancelledError`` (cancelled), ``StaleAttemptError`` (job not rendering, chunk
        already committed or failed) or ``AttemptsExhaustedError`` (beyond ``max_attempts``; the
        chunk and the job are FAILED with the reason).
        """
        attempt_id = uuid.uuid4().hex
        result = self._scripts["start"](
            keys=[job_key(job_id), ACTIVE_KEY, FINISHED_KEY, chunk_key(job_id, index)],
            args=[
                attempt_id,
                worker,
                repr(_now(now)),
                str(self.max_attempts),
                job_id,
                str(index),
                task_id,
                "" if duplicate_guard_s is None else repr(float(duplicate_guard_s)),
                WORKER_PREFIX,
                str(self.block_after_failures),
                str(self.block_ttl_s),
                *other_workers,
            ],
        )
        verdict = result[0]
        ctx = {"job_id": job_id, "chunk_index": index}
        if verdict == "ok":
            spec = ChunkSpec.model_validate_json(self._r.hget(chunk_key(job_id, index), "spec") or "{}")
            return StartedAttempt(attempt_id=attempt_id, delivery=int(result[1]), spec=spec)
        if verdict == "cancelled":
            raise JobCancelledError(f"job {job_id} was cancelled", **ctx)
        if verdict == "missing":
            raise StaleAttemptError(f"job {job_id} has no chunk {index}", **ctx)
        if verdict == "inactive":
            raise StaleAttemptError(f"job {job_id} is {result[1]}, not rendering", **ctx)
        if verdict == "done":
            raise StaleAttemptError(f"chunk {index} of job {job_id} is already {result[1]}", **ctx)
        if verdict == "busy":
            raise DuplicateDeliveryError(
                f"chunk {index} of job {job_id} is being rendered by {result[1]}; duplicate dropped", **ctx
            )
        if verdict == "avoid":
            raise AvoidWorkerError(
                f"{worker} already failed chunk {index} of job {job_id}; {result[1]} has not", **ctx
            )
        raise AttemptsExhaustedError(result[1], **ctx)

    @_translated
    def heartbeat(
        self, job_id: str, index: int, attempt_id: str, frames_done: int, *, now: float | None = None
    ) -> bool:
        """Record liveness and progress; False once the job is cancelled (progress is then frozen).

        Raises ``StaleAttemptError`` if another attempt owns the chunk now.
        """
        result = self._scripts["heartbeat"](
            keys=[job_key(job_id), chunk_key(job_id, index)],
            args=[attempt_id, str(int(frames_done)), repr(_now(now))],
        )
        if result == -1:
            raise StaleAttemptError(
                f"chunk {index} of job {job_id} belongs to another attempt", job_id=job_id, chunk_index=index
            )
        return result == 1

    @_translated
    def commit_chunk(
        self, job_id: str, index: int, attempt_id: str, stats: ChunkStats, *, now: float | None = None
    ) -> bool:
        """Mark the chunk COMMITTED if ``attempt_id`` still owns it; True for exactly one commit: the last."""
        result = self._scripts["commit"](
            keys=[job_key(job_id), chunk_key(job_id, index), _committed_key(job_id)],
            args=[attempt_id, stats.model_dump_json(), repr(_now(now)), str(index), WORKER_PREFIX],
        )
        ctx = {"job_id": job_id, "chunk_index": index}
        if result == -1:
            raise StaleAttemptError(f"chunk {index} of job {job_id} belongs to another attempt", **ctx)
        if result == -2:
            raise JobCancelledError(f"job {job_id} was cancelled", **ctx)
        return result == 1

    @_translated
    def fail_chunk(
        self,
        job_id: str,
        index: int,
        attempt_id: str,
        error: FaceFarmError,
        *,
        now: float | None = None,
    ) -> bool:
        """End the attempt with ``error``; True if the chunk should be retried.

        A permanent error, or a retryable one on the last allowed attempt, fails the chunk and the job.
        Raises ``StaleAttemptError`` if another attempt owns the chunk.
        """
        message, kind = _error_fields(error, None)
        result = self._scripts["fail"](
            keys=[job_key(job_id), ACTIVE_KEY, FINISHED_KEY, chunk_key(job_id, index)],
            args=[
                attempt_id,
                repr(_now(now)),
                job_id,
                str(index),
                message,
                kind,
                "1" if error.permanent else "0",
                str(self.max_attempts),
                WORKER_PREFIX,
                str(self.block_after_failures),
                str(self.block_ttl_s),
            ],
        )
        if result == -1:
            raise StaleAttemptError(
                f"chunk {index} of job {job_id} belongs to another attempt", job_id=job_id, chunk_index=index
            )
        return result == 1

    @_translated
    def release_attempt(
        self,
        job_id: str,
        index: int,
        attempt_id: str,
        reason: str,
        *,
        stale_before: float | None = None,
        now: float | None = None,
    ) -> bool:
        """Give the chunk back (PENDING, no owner) if ``attempt_id`` still runs it.

        With ``stale_before`` only if its last heartbeat is older than that time (the reconciler's
        check-and-set against a heartbeat racing in).
        """
        return bool(
            self._scripts["release"](
                keys=[chunk_key(job_id, index)],
                args=[
                    attempt_id,
                    repr(_now(now)),
                    reason,
                    "" if stale_before is None else repr(stale_before),
                    WORKER_PREFIX,
                    str(self.block_after_failures),
                    str(self.block_ttl_s),
                ],
            )
        )

    # --- progress -----------------------------------------------------------------------------

    @_translated
    def view(self, job_id: str, *, now: float | None = None) -> JobView:
        """What clients see: status, frames done (never decreasing), fps and ETA."""
        job = self.get_job(job_id)
        chunks = self.chunks(job_id) if job.chunks_total else []
        now = _now(now)
        frames_done = sum(c.progress_frames for c in chunks)
        chunks_done = sum(1 for c in chunks if c.status is ChunkStatus.COMMITTED)
        end = job.finished_at if job.finished_at is not None else now
        t0 = _f(job.fields.get("rate_t0"), end)
        f0 = _i(job.fields.get("rate_f0"))
        elapsed = max(end - t0, 1e-6)
        fps = max(frames_done - f0, 0) / elapsed if job.chunks_total else 0.0
        remaining = max(job.frames_total - frames_done, 0)
        if job.status is JobStatus.COMPLETED:
            eta: float | None = 0.0
        elif fps > 0 and not job.status.finished:
            eta = remaining / fps
        else:
            eta = None
        stats: dict[str, float | int | str] = {
            "chunks_running": sum(1 for c in chunks if c.status is ChunkStatus.RUNNING),
            "deliveries": sum(c.deliveries for c in chunks),
            "faces": sum(c.stats.faces for c in chunks if c.stats),
        }
        return JobView(
            job_id=job.job_id,
            owner=job.owner,
            status=job.status,
            error=job.error,
            error_kind=job.error_kind,
            frames_done=frames_done,
            frames_total=job.frames_total,
            chunks_total=job.chunks_total,
            chunks_done=chunks_done,
            fps=round(fps, 3),
            eta_s=None if eta is None else round(eta, 1),
            created_at=job.created_at,
            updated_at=job.updated_at,
            output_uri=job.output_uri,
            options=job.options,
            stats=stats,
        )

    @_translated
    def all_committed(self, job_id: str) -> bool:
        total = self._chunks_total(job_id)
        return total > 0 and self._r.scard(_committed_key(job_id)) == total

    # --- logs ----------------------------------------------------------------------------------

    @_translated
    def append_log(self, job_id: str, line: str, *, now: float | None = None) -> None:
        """Append one line to the job's log (capped at ``log_lines_max``)."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(_now(now)))
        pipe = self._r.pipeline(transaction=True)
        pipe.rpush(_log_key(job_id), f"{stamp}Z {line}")
        pipe.ltrim(_log_key(job_id), -self.log_lines_max, -1)
        pipe.execute()

    @_translated
    def logs(self, job_id: str) -> list[str]:
        return list(self._r.lrange(_log_key(job_id), 0, -1))

    # --- reconciler queries ---------------------------------------------------------------------

    @_translated
    def active_job_ids(self) -> list[str]:
        return sorted(self._r.smembers(ACTIVE_KEY))

    @_translated
    def stalled_chunks(self, now: float, stall_after_s: float) -> list[StalledChunk]:
        """RUNNING chunks of RENDERING jobs whose last heartbeat is older than ``stall_after_s``."""
        stalled = []
        for job_id in self.active_job_ids():
            if self._r.hget(job_key(job_id), "status") != JobStatus.RENDERING.value:
                continue
            for chunk in self.chunks(job_id):
                if chunk.status is ChunkStatus.RUNNING and now - chunk.heartbeat_at > stall_after_s:
                    stalled.append(StalledChunk(job_id, chunk.index, chunk.attempt_id, chunk.heartbeat_at))
        return stalled

    @_translated
    def merges_due(self, now: float, grace_s: float) -> list[str]:
        """Jobs whose chunks are all committed but whose merge never ran (or died without its lock)."""
        due = []
        for job_id in self.active_job_ids():
            fields = self._r.hmget(job_key(job_id), "status", "updated_at")
            status, updated = fields[0], _f(fields[1])
            if now - updated < grace_s:
                continue
            if status == JobStatus.RENDERING.value and self.all_committed(job_id):
                due.append(job_id)
            elif status == JobStatus.MERGING.value and not self._r.exists(_lock_key(f"merge:{job_id}")):
                due.append(job_id)
        return due

    @_translated
    def finished_before(self, cutoff: float) -> list[str]:
        """Jobs that finished before ``cutoff`` (epoch seconds), oldest first."""
        return list(self._r.zrangebyscore(FINISHED_KEY, "-inf", cutoff))

    @_translated
    def queue_lengths(self, queues: Sequence[str]) -> dict[str, int]:
        """Messages waiting in each Celery queue (the broker's Redis list of that name), for metrics."""
        pipe = self._r.pipeline(transaction=False)
        for queue in queues:
            pipe.llen(queue)
        return {queue: int(n) for queue, n in zip(queues, pipe.execute(), strict=True)}

    # --- render workers: liveness, failure streaks, blocks ---------------------------------------

    @_translated
    def worker_seen(self, name: str, *, state: str, now: float | None = None, **info: str) -> None:
        """A render worker's heartbeat: it is alive, and says what it is doing (``ok``/``blocked``)."""
        now = _now(now)
        pipe = self._r.pipeline(transaction=True)
        pipe.zadd(WORKERS_KEY, {name: now})
        pipe.hset(_worker_key(name), mapping={"seen_at": repr(now), "state": state, **info})
        pipe.execute()

    @_translated
    def worker_runtime(self, name: str, stats: dict[str, Any]) -> None:
        """The render child's GPU telemetry (budget, reserved, peak, OOM recoveries, bytes paged,
        utilisation) beside the worker's heartbeat, as ``runtime_<key>`` fields."""
        fields = {f"runtime_{key}": "" if value is None else str(value) for key, value in stats.items()}
        if fields:
            self._r.hset(_worker_key(name), mapping=fields)

    @_translated
    def worker_gone(self, name: str) -> None:
        """A worker that shuts down cleanly leaves the live set at once."""
        pipe = self._r.pipeline(transaction=True)
        pipe.zrem(WORKERS_KEY, name)
        pipe.hset(_worker_key(name), "state", "stopped")
        pipe.execute()

    @_translated
    def live_workers(self, ttl_s: float, *, now: float | None = None) -> list[str]:
        """Render workers seen within ``ttl_s``."""
        return sorted(self._r.zrangebyscore(WORKERS_KEY, _now(now) - ttl_s, "+inf"))

    @_translated
    def worker_block(self, name: str) -> dict[str, Any] | None:
        """Why and since when ``name`` is blocked, or None."""
        raw = self._r.get(_blocked_key(name))
        return dict(json.loads(raw)) if raw else None

    @_translated
    def blocked_workers(self, names: Sequence[str]) -> set[str]:
        if not names:
            return set()
        values = self._r.mget([_blocked_key(n) for n in names])
        return {n for n, v in zip(names, values, strict=True) if v}

    @_translated
    def block_worker(self, name: str, reason: str, *, ttl_s: float | None = None) -> None:
        """Block ``name`` now (operators; tests); it expires after ``ttl_s`` (default the store's)."""
        ttl = int(ttl_s if ttl_s is not None else self.block_ttl_s)
        self._r.set(_blocked_key(name), json.dumps({"reason": reason, "at": time.time()}), ex=max(ttl, 1))

    @_translated
    def unblock_worker(self, name: str) -> bool:
        """Clear the block and the failure streak (``facefarm worker --unblock``); True if it was blocked."""
        pipe = self._r.pipeline(transaction=True)
        pipe.delete(_blocked_key(name))
        pipe.hset(_worker_key(name), "consecutive_failures", "0")
        return bool(pipe.execute()[0])

    @_translated
    def worker_status(self, name: str) -> dict[str, Any]:
        """The worker's heartbeat hash plus its block (if any) and remaining block seconds."""
        status: dict[str, Any] = dict(self._r.hgetall(_worker_key(name)))
        status["block"] = self.worker_block(name)
        status["block_ttl_s"] = max(int(self._r.ttl(_blocked_key(name))), 0)
        return status

    @_translated
    def count_fault(self, job_id: str, fault_name: str) -> int:
        """Occurrences so far of a test fault in this job (``shared.faults``, ``times=K``)."""
        return int(self._r.hincrby(_faults_key(job_id), fault_name, 1))

    # --- locks ---------------------------------------------------------------------------------

    @_translated
    def acquire_lock(self, name: str, token: str, ttl_s: float) -> bool:
        """Take (or extend, if ``token`` holds it) a named lock that expires after ``ttl_s``."""
        return bool(self._scripts["lock"](keys=[_lock_key(name)], args=[token, str(int(ttl_s * 1000))]))

    @_translated
    def release_lock(self, name: str, token: str) -> bool:
        return bool(self._scripts["unlock"](keys=[_lock_key(name)], args=[token]))

    @contextmanager
    def lock(self, name: str, ttl_s: float) -> Iterator[bool]:
        """``with store.lock("merge:J", 600) as held:`` runs the body either way; ``held`` says who won."""
        token = uuid.uuid4().hex
        held = self.acquire_lock(name, token, ttl_s)
        try:
            yield held
        finally:
            if held:
                self.release_lock(name, token)


def _chunk_record(raw: Mapping[str, str]) -> ChunkRecord:
    attempts = tuple(
        Attempt(
            attempt_id=a.get("id", ""),
            worker=a.get("worker", ""),
            start=float(a.get("start", 0.0)),
            end=a.get("end"),
            error=a.get("error"),
        )
        for a in _as_list(_json(raw.get("attempts")))
    )
    stats = raw.get("stats")
    return ChunkRecord(
        index=_i(raw.get("index")),
        spec=ChunkSpec.model_validate_json(raw["spec"]),
        status=ChunkStatus(raw["status"]),
        frame_count=_i(raw.get("frame_count")),
        attempt_id=raw.get("attempt_id", ""),
        worker=raw.get("worker", ""),
        heartbeat_at=_f(raw.get("heartbeat_at")),
        frames_done=_i(raw.get("frames_done")),
        hwm=_i(raw.get("hwm")),
        deliveries=_i(raw.get("deliveries")),
        attempts=attempts,
        error=raw.get("error", ""),
        stats=ChunkStats.model_validate_json(stats) if stats else None,
        failed_workers=tuple(str(w) for w in _as_list(_json(raw.get("failed_workers")))),
    )


def _error_fields(error: FaceFarmError | str | None, kind: str | None) -> tuple[str, str]:
    if error is None:
        return "", ""
    if isinstance(error, FaceFarmError):
        return _one_line(str(error)), kind or error.kind
    return _one_line(error), kind or "FaceFarmError"


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line[:ERROR_MAX_CHARS]


def _now(now: float | None) -> float:
    return time.time() if now is None else now
