"""The reconciler: repairs what messages alone cannot, and applies retention. Exactly one runs at a time.

Celery's redelivery of long tasks hinges on the visibility timeout (hours); the heartbeat in the
state store is the faster, primary recovery path. Each pass: hand stalled chunks (heartbeat older
than ``stall_after_s``) back and re-enqueue them (the old attempt is fenced out), enqueue merges that
were never triggered (every chunk committed but still RENDERING, or MERGING without a live merge
lock), and delete inputs/outputs past their retention. A Redis lock with a TTL elects the one active
reconciler; another instance simply waits and takes over if the holder dies.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

from dispatcher.service import FarmContext, create_context, enqueue_merge, enqueue_renders
from shared.errors import AttemptsExhaustedError, FaceFarmError
from shared.names import CHECK_QUEUE
from shared.schemas import ChunkStatus, JobStatus
from shared.settings import Settings

LOCK_NAME = "reconciler"
log = logging.getLogger(__name__)


@dataclass
class Report:
    """What one pass did."""

    requeued: list[tuple[str, int]] = field(default_factory=list)
    merges: list[str] = field(default_factory=list)
    inputs_expired: list[str] = field(default_factory=list)
    outputs_expired: list[str] = field(default_factory=list)
    no_worker: list[str] = field(default_factory=list)
    check_waits: list[str] = field(default_factory=list)


def warn_jobs_waiting_for_a_check(ctx: FarmContext, *, now: float) -> list[str]:
    """Log, once per stay in QUEUED, on jobs whose input check has waited ``check_wait_warn_s``.

    The check (and so the plan) runs on the ``check`` queue. A farm whose only workers were started by
    hand with ``-Q gpu`` never takes it, and the job would sit QUEUED with nothing said; messages
    still in that queue's list mean no worker is fetching them. The job is not failed: a check worker
    may be on its way, or just busy.
    """
    wait_s = ctx.settings.check_wait_warn_s
    store = ctx.store
    waiting = store.queue_lengths([CHECK_QUEUE])[CHECK_QUEUE]
    if wait_s <= 0 or waiting == 0:
        return []
    warned = []
    for job_id in store.active_job_ids():
        job = store.get_job(job_id)
        stamp = repr(job.updated_at)  # a retry re-enters QUEUED with a new stamp, and is warned again
        if job.status is not JobStatus.QUEUED or now - job.updated_at < wait_s:
            continue
        if job.fields.get("check_wait_warned") == stamp:
            continue
        line = (
            f"waiting: the input check has not started after {now - job.updated_at:.0f} s and {waiting} "
            f"message(s) sit in the '{CHECK_QUEUE}' queue; is any worker consuming it? `facefarm worker` "
            f"does by default (--queues gpu,check); a celery worker needs -Q ...,{CHECK_QUEUE}"
        )
        store.append_log(job_id, f"reconciler: {line}", now=now)
        store.mark(job_id, check_wait_warned=stamp)
        log.warning("job %s: %s", job_id, line)
        warned.append(job_id)
    return warned


def fail_jobs_without_eligible_workers(ctx: FarmContext, *, now: float) -> list[str]:
    """Fail RENDERING jobs with chunks left when every live render worker is blocked.

    Blocked workers stop consuming, so those chunks would wait in the queue forever; the job fails
    with a reason that says how to recover instead. No live worker at all is not this case (the
    fleet may be restarting), so nothing is failed then.
    """
    store = ctx.store
    live = store.live_workers(ctx.settings.worker_seen_ttl_s, now=now)
    if not live or store.blocked_workers(live) != set(live):
        return []
    failed = []
    for job_id in store.active_job_ids():
        if store.get_job(job_id).status is not JobStatus.RENDERING:
            continue
        waiting = [c.index for c in store.chunks(job_id) if c.status is ChunkStatus.PENDING]
        if not waiting:
            continue
        error = AttemptsExhaustedError(
            f"chunk {waiting[0]} has no eligible worker left: every live render worker "
            f"({', '.join(live)}) is blocked after repeated failures; fix them, run "
            "`facefarm worker --unblock`, then `facefarm retry JOB`"
        )
        if store.fail_job(job_id, error, now=now):
            store.append_log(job_id, f"reconciler: {error}", now=now)
            failed.append(job_id)
    return failed


def reconcile_once(ctx: FarmContext, *, now: float | None = None) -> Report:
    """One pass over the active jobs and the retention windows (the caller holds the lock)."""
    now = time.time() if now is None else now
    settings, store, storage = ctx.settings, ctx.store, ctx.storage
    report = Report()

    stall_s = settings.stall_after_s
    for stalled in store.stalled_chunks(now, stall_s):
        reason = f"stalled: no heartbeat for {now - stalled.heartbeat_at:.0f} s"
        if store.release_attempt(
            stalled.job_id, stalled.index, stalled.attempt_id, reason, stale_before=now - stall_s, now=now
        ):
            store.append_log(stalled.job_id, f"chunk {stalled.index}: {reason}; re-enqueued", now=now)
            enqueue_renders(ctx, stalled.job_id, [stalled.index])
            report.requeued.append((stalled.job_id, stalled.index))

    report.no_worker.extend(fail_jobs_without_eligible_workers(ctx, now=now))
    report.check_waits.extend(warn_jobs_waiting_for_a_check(ctx, now=now))

    for job_id in store.merges_due(now, grace_s=stall_s):
        store.append_log(job_id, "reconciler: all chunks committed but no merge ran; merge enqueued", now=now)
        enqueue_merge(ctx, job_id)
        report.merges.append(job_id)

    for job_id in store.finished_before(now - settings.retention_inputs_s):
        job = store.get_job(job_id)
        if job.fields.get("inputs_expired") == "1":
            continue
        storage.delete_prefix(f"jobs/{job_id}/input/")  # only our copies; file:// inputs in file_roots stay
        store.mark(job_id, inputs_expired="1")
        store.append_log(job_id, "retention: inputs deleted", now=now)
        report.inputs_expired.append(job_id)

    for job_id in store.finished_before(now - settings.retention_outputs_s):
        job = store.get_job(job_id)
        if job.fields.get("output_expired") == "1":
            continue
        storage.delete_prefix(f"jobs/{job_id}/")
        store.mark(job_id, output_expired="1", inputs_expired="1")
        store.append_log(job_id, "retention: output and chunks deleted", now=now)
        report.outputs_expired.append(job_id)
    return report


def run_reconciler(
    settings: Settings, stop_event: threading.Event, *, ctx: FarmContext | None = None
) -> None:
    """Loop until ``stop_event``: take (or keep) the lock, run a pass, sleep ``reconcile_interval_s``."""
    ctx = ctx or create_context(settings)
    token = uuid.uuid4().hex
    interval_s = settings.reconcile_interval_s
    lock_ttl_s = max(3 * interval_s, 30.0)
    try:
        while not stop_event.is_set():
            try:
                if ctx.store.acquire_lock(LOCK_NAME, token, lock_ttl_s):
                    report = reconcile_once(ctx)
                    if report.requeued or report.merges or report.no_worker:
                        log.info(
                            "reconciler: requeued %s, merges %s, failed for want of a worker %s",
                            report.requeued,
                            report.merges,
                            report.no_worker,
                        )
            except FaceFarmError as exc:  # Redis or storage down: try again next round
                log.warning("reconciler pass failed: %s", exc)
            stop_event.wait(interval_s)
    finally:
        try:
            ctx.store.release_lock(LOCK_NAME, token)
        except FaceFarmError:
            pass
