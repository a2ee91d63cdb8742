"""The farm's use cases behind the API, client and CLI: submit, watch, cancel, retry, fetch.

Plain functions over a ``FarmContext`` (settings, job store, storage, a task sender); no Celery and no
HTTP here. Ownership is checked on every call: another owner's job is reported as not found.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from shared.errors import BadInputError, NotFoundError, PermanentError
from shared.names import (
    CHECK_INPUTS,
    CHECK_QUEUE,
    CPU_QUEUE,
    GPU_QUEUE,
    MERGE_JOB,
    RENDER_CHUNK,
    storage_input_key,
)
from shared.schemas import JobOptions, JobStatus, JobView
from shared.settings import Settings
from shared.state import JobRecord, JobStore
from shared.storage import Storage, StoredObject, create_storage, ext_of


@dataclass
class FarmContext:
    """Everything a use case needs; built once per process."""

    settings: Settings
    store: JobStore
    storage: Storage
    send_task: Callable[..., Any]


def create_context(settings: Settings) -> FarmContext:
    """A context that enqueues through kombu (API, CLI, reconciler processes)."""
    from dispatcher.sender import KombuTaskSender

    return FarmContext(
        settings=settings,
        store=JobStore.from_settings(settings),
        storage=create_storage(settings),
        send_task=KombuTaskSender(settings),
    )


# --- enqueueing (shared with the tasks and the reconciler) ---------------------------------------


def _short_id() -> str:
    return uuid.uuid4().hex[:8]


def enqueue_plan(ctx: FarmContext, job_id: str) -> None:
    """A job's first step: the worker-side input check (face detector, CPU), which enqueues planning."""
    ctx.send_task(
        CHECK_INPUTS,
        [job_id],
        queue=CHECK_QUEUE,
        task_id=f"check-{job_id}-{_short_id()}",
        argsrepr=f"job={job_id}",
    )


def enqueue_renders(ctx: FarmContext, job_id: str, indices: Sequence[int] | None = None) -> list[int]:
    """Send one render task per chunk (all, or ``indices``), longest chunks first; returns the order."""
    chunks = [c for c in ctx.store.chunks(job_id) if indices is None or c.index in set(indices)]
    chunks.sort(key=lambda c: (-c.frame_count, c.index))
    for chunk in chunks:
        ctx.send_task(
            RENDER_CHUNK,
            [job_id, chunk.index],
            queue=GPU_QUEUE,
            task_id=f"render-{job_id}-{chunk.index:05d}-{_short_id()}",
            argsrepr=f"job={job_id} chunk={chunk.index}",
        )
    return [c.index for c in chunks]


def enqueue_merge(ctx: FarmContext, job_id: str) -> None:
    ctx.send_task(
        MERGE_JOB,
        [job_id],
        queue=CPU_QUEUE,
        task_id=f"merge-{job_id}-{_short_id()}",
        argsrepr=f"job={job_id}",
    )


# --- use cases --------------------------------------------------------------------------------


def submit_job(
    ctx: FarmContext,
    *,
    owner: str,
    video: BinaryIO | str,
    video_name: str,
    face: BinaryIO | str,
    face_name: str,
    options: JobOptions,
    reference: BinaryIO | str | None = None,
    reference_name: str | None = None,
) -> JobView:
    """Store the inputs, record a QUEUED job and enqueue its planning; returns at once.

    ``str`` inputs are URIs already reachable (``file://`` within the roots, or ``s3://`` in our
    bucket); streams are uploads, capped at ``settings.max_upload_bytes``.
    """
    if options.face_selector == "reference" and reference is None and not options.reference_uri:
        raise BadInputError("--face-selector reference needs a reference image (--reference IMAGE)")
    job_id = uuid.uuid4().hex
    try:
        stored_video = _store_input(ctx, job_id, "video", video, video_name)
        stored_face = _store_input(ctx, job_id, "face", face, face_name)
        stored_reference = None
        if reference is not None:
            stored_reference = _store_input(
                ctx, job_id, "reference", reference, reference_name or "reference.png"
            )
        elif options.reference_uri:
            stored_reference = _store_input(
                ctx, job_id, "reference", options.reference_uri, options.reference_uri
            )
        if stored_reference is not None:
            options = options.model_copy(update={"reference_uri": stored_reference.uri})
        digests = {"video": stored_video.sha256, "face": stored_face.sha256}
        if stored_reference is not None:
            digests["reference"] = stored_reference.sha256
        view = ctx.store.create_job(
            job_id,
            owner=owner,
            options=options,
            video_uri=stored_video.uri,
            face_uri=stored_face.uri,
            reference_uri=stored_reference.uri if stored_reference else None,
            input_sha256=digests,
            input_names={"video": video_name, "face": face_name},
        )
    except BaseException:
        ctx.storage.delete_prefix(f"jobs/{job_id}/")
        raise
    ctx.store.append_log(
        job_id, f"submitted by {owner}: video {video_name} ({stored_video.size_bytes} bytes)"
    )
    enqueue_plan(ctx, job_id)
    return view


def _store_input(ctx: FarmContext, job_id: str, role: str, data: BinaryIO | str, name: str) -> StoredObject:
    key = storage_input_key(job_id, f"{role}.{ext_of(name)}")
    if isinstance(data, str):
        return ctx.storage.adopt(data, key)
    return ctx.storage.put_stream(key, data, max_bytes=ctx.settings.max_upload_bytes)


def _owned(ctx: FarmContext, owner: str, job_id: str) -> JobRecord:
    try:
        record = ctx.store.get_job(job_id)
    except NotFoundError:
        raise NotFoundError(f"no job {job_id!r}", job_id=job_id) from None
    if record.owner != owner:
        raise NotFoundError(f"no job {job_id!r}", job_id=job_id)
    return record


def get_job(ctx: FarmContext, owner: str, job_id: str) -> JobView:
    _owned(ctx, owner, job_id)
    return ctx.store.view(job_id)


def list_jobs(ctx: FarmContext, owner: str) -> list[JobView]:
    return ctx.store.list_jobs(owner)


def cancel_job(ctx: FarmContext, owner: str, job_id: str) -> JobView:
    """Set the cancel flag; workers stop between batches, queued chunks are dropped when they start."""
    _owned(ctx, owner, job_id)
    if ctx.store.request_cancel(job_id):
        ctx.store.append_log(job_id, f"cancelled by {owner}")
    return ctx.store.view(job_id)


def retry_job(ctx: FarmContext, owner: str, job_id: str) -> JobView:
    """Re-run a FAILED or CANCELLED job; only chunks that were never committed are rendered again."""
    _owned(ctx, owner, job_id)
    plan = ctx.store.reset_for_retry(job_id)
    if plan.action == "replan":
        ctx.store.append_log(job_id, f"retry by {owner}: planning again")
        enqueue_plan(ctx, job_id)
    elif plan.action == "merge":
        ctx.store.append_log(job_id, f"retry by {owner}: all chunks are committed, merging")
        enqueue_merge(ctx, job_id)
    else:
        ctx.store.append_log(job_id, f"retry by {owner}: rendering chunks {list(plan.indices)}")
        enqueue_renders(ctx, job_id, plan.indices)
    return ctx.store.view(job_id)


def job_logs(ctx: FarmContext, owner: str, job_id: str) -> list[str]:
    _owned(ctx, owner, job_id)
    return ctx.store.logs(job_id)


def output_location(ctx: FarmContext, owner: str, job_id: str) -> str:
    """A local path or a presigned URL of the finished output."""
    record = _owned(ctx, owner, job_id)
    if record.status is not JobStatus.COMPLETED or not record.output_uri:
        raise PermanentError(f"job {job_id} is {record.status.value}; its output exists once it is COMPLETED")
    if record.fields.get("output_expired") == "1":
        raise NotFoundError(f"the output of job {job_id} was deleted by the retention policy", job_id=job_id)
    return ctx.storage.local_path_or_url(record.output_uri)


def audit_record(ctx: FarmContext, owner: str, job_id: str) -> dict[str, Any]:
    """Who rendered what from which inputs (by digest), with which options, when, and the output's digest."""
    record = _owned(ctx, owner, job_id)
    audit = dict(record.audit)
    audit.update(
        status=record.status.value,
        finished_at=record.finished_at,
        output_uri=record.output_uri,
        output_sha256=record.fields.get("output_sha256") or None,
        error=record.error,
        label=ctx.settings.synthetic_label,
    )
    return audit
