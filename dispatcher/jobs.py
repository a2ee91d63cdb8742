"""The cpu-queue steps as plain functions over a ``FarmContext``: plan a job, merge a job.

The Celery tasks in ``dispatcher.tasks`` are one-line adapters around these, so the steps can be
run and tested without a worker. Both are idempotent: a redelivered plan continues a PLANNING job, a
re-run merge rewrites the same output key and a merge of a COMPLETED job only finishes the cleanup.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from dispatcher.planner import (
    ChunkRange,
    check_limits,
    chunk_frames_for,
    chunk_spec,
    encoder_settings_for,
    frame_range_for,
    plan_chunks,
    planning_notes,
)
from dispatcher.service import FarmContext, enqueue_renders
from shared.errors import FaceFarmError, InvalidVideoError
from shared.faults import fire, select
from shared.media import VideoInfo, check_decodes, display_name, probe
from shared.names import storage_chunk_key, storage_output_key
from shared.schemas import JobStatus
from shared.settings import Settings
from shared.state import JobRecord, JobStore
from shared.storage import Storage

CHUNK_EXT = "mp4"
OUTPUT_EXT = "mp4"
MIN_MERGE_LEASE_S = 10.0
T = TypeVar("T")


def plan_job_now(ctx: FarmContext, job_id: str) -> dict[str, Any]:
    """Probe the video, refuse what the farm will not render, record the chunks, enqueue the renders."""
    store, storage, settings = ctx.store, ctx.storage, ctx.settings
    job = store.get_job(job_id)
    if job.status is JobStatus.QUEUED:
        if not store.set_status(job_id, JobStatus.PLANNING):
            return {"job_id": job_id, "skipped": store.get_job(job_id).status.value}
    elif job.status is not JobStatus.PLANNING:  # cancelled, or a duplicate delivery after planning
        return {"job_id": job_id, "skipped": job.status.value}
    store.append_log(job_id, "planning: probing the video")

    source = storage.local_path_or_url(job.video_uri)
    info = _user_named(job, source, lambda: probe(source))
    options = job.options
    check_limits(info, options, settings)
    if settings.decode_check:
        store.append_log(job_id, "planning: decoding every frame once to find corrupt data")
        _user_named(
            job, source, lambda: check_decodes(source, info, timeout_s=settings.decode_check_timeout_s)
        )
    if options.start_s is not None or options.end_s is not None:
        start_frame, end_frame = frame_range_for(info, options.start_s, options.end_s)
    else:
        start_frame, end_frame = 0, info.frame_count
    ranges = plan_chunks(
        info,
        chunk_frames=chunk_frames_for(info, options, settings),
        warmup_frames=settings.warmup_frames,
        start_frame=start_frame,
        end_frame=end_frame,
    )
    encoder = encoder_settings_for(info, options, settings)
    specs = [
        chunk_spec(
            job_id,
            r,
            source_uri=job.video_uri,
            face_uri=job.face_uri,
            output_uri=storage.uri_for(storage_chunk_key(job_id, r.index, CHUNK_EXT)),
            options=options,
            encoder=encoder,
        )
        for r in ranges
    ]
    frames_total = end_frame - start_frame
    if not store.record_plan(
        job_id, specs, frames_total=frames_total, video_info_json=info.model_dump_json()
    ):
        store.append_log(job_id, "planning finished after the job was cancelled; nothing enqueued")
        return {"job_id": job_id, "skipped": store.get_job(job_id).status.value}
    name = job.audit.get("input_names", {}).get("video") or display_name(info.source)
    store.append_log(
        job_id,
        f"planned {len(specs)} chunks, {frames_total} frames of {name} "
        f"({info.width}x{info.height} {info.codec}, {len(info.keyframe_indices)} keyframes) "
        f"-> {encoder.width}x{encoder.height} {encoder.codec}",
    )
    for note in planning_notes(info, options):
        store.append_log(job_id, f"note: {note}")
    order = enqueue_renders(ctx, job_id)
    return {"job_id": job_id, "chunks": len(specs), "order": order}


def _user_named(job: JobRecord, source: str, step: Callable[[], T]) -> T:
    """Run a probe step; its ``InvalidVideoError`` names the user's file, not our storage path or a
    presigned URL."""
    try:
        return step()
    except InvalidVideoError as exc:
        user_name = job.audit.get("input_names", {}).get("video")
        if not user_name:
            raise
        message = str(exc).replace(display_name(source), user_name)
        raise InvalidVideoError(message, **exc.context) from exc


def merge_job_now(ctx: FarmContext, job_id: str, workdir: Path, *, timeout_s: float) -> dict[str, Any]:
    """Concatenate the committed chunks, store the output, mark COMPLETED durably, then drop the chunks."""
    from dispatcher.merger import merge_chunks

    store, storage, settings = ctx.store, ctx.storage, ctx.settings
    job = store.get_job(job_id)
    if job.status is JobStatus.COMPLETED:
        deleted = storage.delete_prefix(f"jobs/{job_id}/chunks/")
        return {"job_id": job_id, "skipped": "COMPLETED", "chunks_deleted": deleted}
    if job.status is JobStatus.RENDERING:
        if not store.all_committed(job_id) or not store.set_status(job_id, JobStatus.MERGING):
            return {"job_id": job_id, "skipped": store.get_job(job_id).status.value}
    elif job.status is not JobStatus.MERGING:
        return {"job_id": job_id, "skipped": job.status.value}

    with merge_lease(store, job_id, merge_lease_s(settings)) as held:
        if not held:
            return {"job_id": job_id, "skipped": "another merge holds the lock"}
        chunks = sorted(store.chunks(job_id), key=lambda c: c.index)
        if job.video_info is None:
            raise InvalidVideoError(f"job {job_id} has no probed video info; retry the job to plan it again")
        info = VideoInfo.model_validate(job.video_info)
        store.append_log(job_id, f"merging {len(chunks)} chunks")
        chunk_paths = [
            _local_copy(storage, c.spec.output_uri, workdir / f"chunk-{c.index:05d}.{CHUNK_EXT}")
            for c in chunks
        ]
        ranges = [
            ChunkRange(
                index=c.index,
                start_frame=c.spec.start_frame,
                end_frame=c.spec.end_frame,
                warmup_frames=c.spec.warmup_frames,
                seek_pts=c.spec.seek_pts,
                seek_frame=c.spec.seek_frame,
            )
            for c in chunks
        ]
        output = workdir / f"output.{OUTPUT_EXT}"
        report = merge_chunks(
            chunk_paths,
            source=storage.local_path_or_url(job.video_uri),
            info=info,
            chunk_ranges=ranges,
            output=output,
            label=settings.synthetic_label,
            timeout_s=timeout_s,
        )
        _inject_merge_faults(ctx, job)  # a test hook (shared.faults); nothing unless configured
        store.append_log(
            job_id,
            f"merged {report.frames}/{report.expected_frames} frames, {report.duration_s:.3f} s, "
            f"{report.audio_streams} audio and {report.subtitle_streams} subtitle streams",
        )
        for note in report.notes:
            store.append_log(job_id, f"note: {note}")
        stored = storage.put_file(storage_output_key(job_id, OUTPUT_EXT), output)
        if not store.complete_job(job_id, output_uri=stored.uri, output_sha256=stored.sha256):
            return {"job_id": job_id, "skipped": store.get_job(job_id).status.value}
    store.append_log(
        job_id, f"completed: {stored.uri} ({stored.size_bytes} bytes, sha256 {stored.sha256[:16]})"
    )
    deleted = storage.delete_prefix(f"jobs/{job_id}/chunks/")
    return {"job_id": job_id, "output_uri": stored.uri, "chunks_deleted": deleted}


def merge_lease_s(settings: Settings) -> float:
    """How long a merge's lock outlives its process: short, so a killed merge is redone soon."""
    return float(min(settings.task_time_limit_s, max(MIN_MERGE_LEASE_S, 2 * settings.stall_after_s)))


@contextmanager
def merge_lease(store: JobStore, job_id: str, lease_s: float) -> Iterator[bool]:
    """The job's merge lock, renewed every ``lease_s / 3`` while held; it lapses if this process dies.

    A lock with the task's hard time limit as TTL would keep a killed merge's job in MERGING for
    up to an hour; a short renewed lease lets the reconciler re-run it within seconds.
    """
    name, token = f"merge:{job_id}", uuid.uuid4().hex
    held = store.acquire_lock(name, token, lease_s)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lease_s / 3):
            try:
                store.acquire_lock(name, token, lease_s)
            except FaceFarmError:
                pass  # Redis blinked: the next renewal tries again

    renewer = threading.Thread(target=renew, name=f"lease-{job_id}", daemon=True)
    if held:
        renewer.start()
    try:
        yield held
    finally:
        stop.set()
        if held:
            renewer.join(timeout=5)
            store.release_lock(name, token)


def _inject_merge_faults(ctx: FarmContext, job: JobRecord) -> None:
    """TEST HOOK: ``FACEFARM_FAULT_INJECTION=exit:merge,...`` kills this process mid-merge."""
    if not ctx.settings.faults:
        return
    video = job.audit.get("input_names", {}).get("video")
    for fault in select(
        ctx.settings.faults,
        target="merge",
        video=video,
        worker=None,
        occurrence=lambda f: ctx.store.count_fault(job.job_id, f"merge:{f.name}"),
    ):
        ctx.store.append_log(job.job_id, f"test fault injected: {fault.action} during the merge")
        fire(fault, f"the merge of job {job.job_id}")


def _local_copy(storage: Storage, uri: str, dest: Path) -> Path:
    """A local path for ``uri``: the file itself on local storage, a download otherwise."""
    where = storage.local_path_or_url(uri)
    if "://" not in where:
        return Path(where)
    return storage.get_to_path(uri, dest)
