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

from shared.errors import (
    AttemptsExhaustedError,
    BrokerUnavailableError,
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
FINISHED_KEY = f"{KEY_PREFIX}:jobs:finished"


def _lock_key(name: str) -> str:
    return f"{KEY_PREFIX}:lock:{name}"


# --- Lua ---------------------------------------------------------------------------------------
# Common prelude: finish a job (status + index bookkeeping). KEYS[1]=job, KEYS[2]=active, KEYS[3]=finished.
_LUA_PRELUDE = """
local function set_job_status(jobkey, activekey, finishedkey, jobid, status, now, err, kind)
  redis.call('HSET', jobkey, 'status', status, 'updated_at', now)
  if err ~= nil then redis.call('HSET', jobkey, 'error', err, 'error_kind', kind) end
  if status == 'COMPLETED' or status == 'FAILED' or status == 'CANCELLED' then
    redis.call('SREM', activekey, jobid)
    redis.call('ZADD', finishedkey, now, jobid)
    redis.call('HSET', jobkey, 'finished_at', now)
  else
    redis.call('SADD', activekey, jobid)
    redis.call('ZREM', finishedkey, jobid)
  end
end
local function is_finished(status)
  return status == 'COMPLETED' or status == 'FAILED' or status == 'CANCELLED'
end
local function end_attempt(chunkkey, attempt_id, now, err)
  local raw = redis.call('HGET', chunkkey, 'attempts')
  local attempts = {}
  if raw and raw ~= '' then attempts = cjson.decode(raw) end
  for i = #attempts, 1, -1 do
    if attempts[i]['id'] == attempt_id then
      attempts[i]['end'] = tonumber(now)
      if err ~= nil then attempts[i]['error'] = err end
      break
    end
  end
  if #attempts > 0 then redis.call('HSET', chunkkey, 'attempts', cjson.encode(attempts)) end
end
"""

# KEYS: job, active, finished. ARGV: new status, now, job id, error or '', kind or '', allowed-from...
_SET_STATUS = (
    _LUA_PRELUDE
    + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {0, ''} end
local ok = false
for i = 6, #ARGV do if ARGV[i] == cur then ok = true end end
if not ok then return {0, cur} end
local err = nil
if ARGV[4] ~= '' then err = ARGV[4] end
set_job_status(KEYS[1], KEYS[2], KEYS[3], ARGV[3], ARGV[1], ARGV[2], err, ARGV[5])
return {1, cur}
"""
)

# KEYS: job, active, finished. ARGV: now, job id.
_REQUEST_CANCEL = (
    _LUA_PRELUDE
    + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return -1 end
if is_finished(cur) then return 0 end
redis.call('HSET', KEYS[1], 'cancel', '1')
set_job_status(KEYS[1], KEYS[2], KEYS[3], ARGV[2], 'CANCELLED', ARGV[1], 'cancelled by the owner', 'JobCancelledError')
return 1
"""
)

# KEYS: job, active, finished, chunk keys... ARGV: now, job id, frames_total, video_info, encoder, specs...
_RECORD_PLAN = (
    _LUA_PRELUDE
    + """
local cur = redis.call('HGET', KEYS[1], 'status')
if cur ~= 'PLANNING' or redis.call('HGET', KEYS[1], 'cancel') == '1' then return 0 end
local n = #KEYS - 3
for i = 1, n do
  local spec = cjson.decode(ARGV[5 + i])
  redis.call('HSET', KEYS[3 + i], 'spec', ARGV[5 + i], 'index', spec['index'], 'status', 'PENDING',
    'frame_count', spec['end_frame'] - spec['start_frame'], 'attempt_id', '', 'worker', '',
    'heartbeat_at', '0', 'frames_done', '0', 'hwm', '0', 'deliveries', '0', 'attempts', '[]', 'error', '')
end
redis.call('HSET', KEYS[1], 'chunks_total', n, 'frames_total', ARGV[3], 'video_info', ARGV[4],
  'encoder', ARGV[5], 'rate_t0', ARGV[1], 'rate_f0', '0')
set_job_status(KEYS[1], KEYS[2], KEYS[3], ARGV[2], 'RENDERING', ARGV[1], nil, nil)
return 1
"""
)

# KEYS: job, active, finished, chunk. ARGV: attempt id, worker, now, max attempts, job id, index.
_START_ATTEMPT = (
    _LUA_PRELUDE
    + """
local job = redis.call('HMGET', KEYS[1], 'status', 'cancel')
if job[1] == false then return {'missing'} end
if job[2] == '1' then return {'cancelled'} end
if job[1] ~= 'RENDERING' then return {'inactive', job[1]} end
local chunk = redis.call('HMGET', KEYS[4], 'status', 'error')
if chunk[1] == false then return {'missing'} end
if chunk[1] == 'COMMITTED' or chunk[1] == 'FAILED' then return {'done', chunk[1]} end
local n = redis.call('HINCRBY', KEYS[4], 'deliveries', 1)
if n > tonumber(ARGV[4]) then
  local last = chunk[2] or ''
  local reason = 'chunk ' .. ARGV[6] .. ' failed after ' .. ARGV[4] .. ' attempts'
  if last ~= '' then reason = reason .. ': ' .. last end
  redis.call('HSET', KEYS[4], 'status', 'FAILED', 'attempt_id', '', 'error', reason)
  set_job_status(KEYS[1], KEYS[2], KEYS[3], ARGV[5], 'FAILED', ARGV[3], reason, 'AttemptsExhaustedError')
  return {'exhausted', reason}
end
local raw = redis.call('HGET', KEYS[4], 'attempts')
local attempts = {}
if raw and raw ~= '' then attempts = cjson.decode(raw) end
table.insert(attempts, {id = ARGV[1], worker = ARGV[2], start = tonumber(ARGV[3])})
redis.call('HSET', KEYS[4], 'status', 'RUNNING', 'attempt_id', ARGV[1], 'worker', ARGV[2],
  'heartbeat_at', ARGV[3], 'frames_done', '0', 'attempts', cjson.encode(attempts))
if redis.call('HGET', KEYS[1], 'render_started_at') == false then
  redis.call('HSET', KEYS[1], 'render_started_at', ARGV[3])
end
return {'ok', tostring(n)}
"""
)

# KEYS: job, chunk. ARGV: attempt id, frames done, now. -> 1 recorded, 2 cancelled (not recorded), -1 stale
_HEARTBEAT = """
if redis.call('HGET', KEYS[2], 'attempt_id') ~= ARGV[1] then return -1 end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return 2 end
local done = tonumber(ARGV[2])
local count = tonumber(redis.call('HGET', KEYS[2], 'frame_count'))
if done > count then done = count end
if done < 0 then done = 0 end
redis.call('HSET', KEYS[2], 'heartbeat_at', ARGV[3], 'frames_done', done)
if done > tonumber(redis.call('HGET', KEYS[2], 'hwm')) then redis.call('HSET', KEYS[2], 'hwm', done) end
return 1
"""

# KEYS: job, chunk, committed. ARGV: attempt id, stats json, now, index. -> 1 last, 0 not last, -1 stale, -2 cancelled
_COMMIT = (
    _LUA_PRELUDE
    + """
if redis.call('HGET', KEYS[2], 'attempt_id') ~= ARGV[1] then return -1 end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return -2 end
if redis.call('HGET', KEYS[2], 'status') == 'COMMITTED' then return 0 end
local count = redis.call('HGET', KEYS[2], 'frame_count')
redis.call('HSET', KEYS[2], 'status', 'COMMITTED', 'stats', ARGV[2], 'frames_done', count, 'hwm', count,
  'committed_at', ARGV[3], 'heartbeat_at', ARGV[3], 'error', '')
end_attempt(KEYS[2], ARGV[1], ARGV[3], nil)
redis.call('HSET', KEYS[1], 'updated_at', ARGV[3])
local added = redis.call('SADD', KEYS[3], ARGV[4])
local total = tonumber(redis.call('HGET', KEYS[1], 'chunks_total'))
if added == 1 and redis.call('SCARD', KEYS[3]) == total then return 1 end
return 0
"""
)

# KEYS: job, active, finished, chunk. ARGV: attempt id, now, job id, index, message, kind, permanent, max attempts
# -> 1 will retry, 0 failed for good, -1 stale
_FAIL_CHUNK = (
    _LUA_PRELUDE
    + """
if redis.call('HGET', KEYS[4], 'attempt_id') ~= ARGV[1] then return -1 end
end_attempt(KEYS[4], ARGV[1], ARGV[2], ARGV[5])
local deliveries = tonumber(redis.call('HGET', KEYS[4], 'deliveries'))
if ARGV[7] == '0' and deliveries < tonumber(ARGV[8]) then
  redis.call('HSET', KEYS[4], 'status', 'PENDING', 'attempt_id', '', 'error', ARGV[5])
  return 1
end
local reason = 'chunk ' .. ARGV[4] .. ': ' .. ARGV[5]
local kind = ARGV[6]
if ARGV[7] == '0' then
  reason = 'chunk ' .. ARGV[4] .. ' failed after ' .. ARGV[8] .. ' attempts: ' .. ARGV[5]
  kind = 'AttemptsExhaustedError'
end
redis.call('HSET', KEYS[4], 'status', 'FAILED', 'attempt_id', '', 'error', reason)
local cur = redis.call('HGET', KEYS[1], 'status')
if not is_finished(cur) then
  set_job_status(KEYS[1], KEYS[2], KEYS[3], ARGV[3], 'FAILED', ARGV[2], reason, kind)
end
return 0
"""
)

# KEYS: chunk. ARGV: attempt id, now, reason, stale-before (or '' for unconditional). -> 1 released, 0 not
_RELEASE = (
    _LUA_PRELUDE
    + """
local c = redis.call('HMGET', KEYS[1], 'attempt_id', 'status', 'heartbeat_at')
if c[1] ~= ARGV[1] or c[2] ~= 'RUNNING' then return 0 end
if ARGV[4] ~= '' and tonumber(c[3]) >= tonumber(ARGV[4]) then return 0 end
end_attempt(KEYS[1], ARGV[1], ARGV[2], ARGV[3])
redis.call('HSET', KEYS[1], 'status', 'PENDING', 'attempt_id', '')
return 1
"""
)

# KEYS: job, active, finished, chunk keys... ARGV: now, job id.
# -> {'replan'} | {'render', idx...} | {'merge'} | {'refused', status}
_RESET_FOR_RETRY = (
    _LUA_PRELUDE
    + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {'missing'} end
if cur ~= 'FAILED' and cur ~= 'CANCELLED' then return {'refused', cur} end
redis.call('HSET', KEYS[1], 'cancel', '0', 'error', '', 'error_kind', '')
redis.call('HDEL', KEYS[1], 'finished_at')
local n = #KEYS - 3
if n == 0 then
  set_job_status(KEYS[1], KEYS[2], KEYS[3], ARGV[2], 'QUEUED', ARGV[1], nil, nil)
  return {'replan'}
end
local todo = {'render'}
local done_frames = 0
for i = 1, n do
  local c = redis.call('HMGET', KEYS[3 + i], 'status', 'hwm', 'index')
  done_frames = done_frames + tonumber(c[2])
  if c[1] ~= 'COMMITTED' then
    redis.call('HSET', KEYS[3 + i], 'status', 'PENDING', 'attempt_id', '', 'deliveries', '0', 'error', '')
    table.insert(todo, c[3])
  end
end
redis.call('HSET', KEYS[1], 'rate_t0', ARGV[1], 'rate_f0', done_frames)
set_job_status(KEYS[1], KEYS[2], KEYS[3], ARGV[2], 'RENDERING', ARGV[1], nil, nil)
if #todo == 1 then return {'merge'} end
return todo
"""
)

# KEYS: job, active, finished. ARGV: now, job id, output uri, output sha256. -> 1 done, 0 not merging
_COMPLETE = (
    _LUA_PRELUDE
    + """
if redis.call('HGET', KEYS[1], 'status') ~= 'MERGING' then return 0 end
redis.call('HSET', KEYS[1], 'output_uri', ARGV[3], 'output_sha256', ARGV[4], 'error', '', 'error_kind', '')
set_job_status(KEYS[1], KEYS[2], KEYS[3], ARGV[2], 'COMPLETED', ARGV[1], nil, nil)
return 1
"""
)

# KEYS: lock. ARGV: token, ttl ms. Acquire or extend a lock we already hold.
_LOCK = """
local cur = redis.call('GET', KEYS[1])
if cur == false then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
if cur == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""

_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


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

    def __init__(self, client: redis.Redis, *, max_attempts: int, log_lines_max: int = LOG_LINES_MAX) -> None:
        self._r = client
        self.max_attempts = max_attempts
        self.log_lines_max = log_lines_max
        self._scripts = {
            name: client.register_script(src)
            for name, src in {
                "set_status": _SET_STATUS,
                "cancel": _REQUEST_CANCEL,
                "plan": _RECORD_PLAN,
                "start": _START_ATTEMPT,
                "heartbeat": _HEARTBEAT,
                "commit": _COMMIT,
                "fail": _FAIL_CHUNK,
                "release": _RELEASE,
                "retry": _RESET_FOR_RETRY,
                "complete": _COMPLETE,
                "lock": _LOCK,
                "unlock": _UNLOCK,
            }.items()
        }

    @classmethod
    def from_url(cls, redis_url: str, *, max_attempts: int, socket_timeout_s: float = 10.0) -> JobStore:
        client = redis.Redis.from_url(
            redis_url,
            decode_responses=True,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            health_check_interval=25,
        )
        return cls(client, max_attempts=max_attempts)

    @classmethod
    def from_settings(cls, settings: Settings) -> JobStore:
        return cls.from_url(settings.redis_url, max_attempts=settings.max_attempts)

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
        self, job_id: str, index: int, worker: str, *, now: float | None = None
    ) -> StartedAttempt:
        """Claim the chunk for a new attempt (fencing out older ones) and count the delivery.

        Raises ``JobCancelledError`` (cancelled), ``StaleAttemptError`` (job not rendering, chunk
        already committed or failed) or ``AttemptsExhaustedError`` (beyond ``max_attempts``; the
        chunk and the job are FAILED with the reason).
        """
        attempt_id = uuid.uuid4().hex
        result = self._scripts["start"](
            keys=[job_key(job_id), ACTIVE_KEY, FINISHED_KEY, chunk_key(job_id, index)],
            args=[attempt_id, worker, repr(_now(now)), str(self.max_attempts), job_id, str(index)],
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
            args=[attempt_id, stats.model_dump_json(), repr(_now(now)), str(index)],
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
