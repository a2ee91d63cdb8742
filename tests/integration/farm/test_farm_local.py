"""The farm end to end through Celery on local storage: service → plan → render ×N → merge.

Real redis-server, real Celery worker subprocesses (2 render + 1 cpu), real ffmpeg, the real
pipeline on the CPU. Jobs are submitted with ``dispatcher.service`` and watched by polling it.
"""

from __future__ import annotations

import io
import shutil
import time
from pathlib import Path

import pytest
from celery import Celery

from dispatcher import service
from dispatcher.reconciler import reconcile_once
from shared.schemas import ChunkStatus, JobOptions, JobStatus, JobView
from tests.integration.farm.conftest import BATCH_FRAMES, STALL_VIDEO, Farm
from tests.support.farm import eventually
from tests.support.media import count_frames, keyframe_count

pytestmark = pytest.mark.integration

OPTIONS = JobOptions(swapper="classic", upscale=1, face_selector="all")
JOB_TIMEOUT_S = 240.0


def submit(
    farm: Farm, video: Path, face: Path, *, owner: str = "alice", options: JobOptions = OPTIONS
) -> JobView:
    """The video by file:// URI from an allowed root, the face as an upload."""
    local = farm.inputs / video.name
    if not local.exists():
        shutil.copyfile(video, local)
    with face.open("rb") as f:
        return service.submit_job(
            farm.ctx,
            owner=owner,
            video=local.as_uri(),
            video_name=video.name,
            face=f,
            face_name=face.name,
            options=options,
        )


def wait_until(
    farm: Farm, job_id: str, done: object, timeout_s: float = JOB_TIMEOUT_S, owner: str = "alice"
) -> list[JobView]:
    """Poll ``get_job`` until ``done(view)``; returns every view seen."""
    seen: list[JobView] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        view = service.get_job(farm.ctx, owner, job_id)
        seen.append(view)
        if done(view):  # type: ignore[operator]
            return seen
        time.sleep(0.1)
    logs = "\n".join(service.job_logs(farm.ctx, owner, job_id))
    raise AssertionError(
        f"job {job_id} stuck at {seen[-1]}\njob log:\n{logs}\nworkers:\n{farm.worker_logs()}"
    )


def finished(view: JobView) -> bool:
    return view.status.finished


def active_render_tasks(farm: Farm) -> list[dict[str, object]]:
    app = Celery(broker=farm.settings.redis_url, set_as_current=False)
    try:
        replies = app.control.inspect(timeout=1.0).active() or {}
    finally:
        app.close()
    return [t for tasks in replies.values() for t in tasks if t.get("name") == "facefarm.render_chunk"]


def test_multiface_job_completes_with_every_frame_and_monotonic_progress(
    local_farm: Farm, multiface_video: Path, face_image: Path
) -> None:
    assert keyframe_count(multiface_video) == 1  # chunks 1 and 2 must start between keyframes
    view = submit(local_farm, multiface_video, face_image)
    assert view.status is JobStatus.QUEUED

    seen = wait_until(local_farm, view.job_id, finished)
    final = seen[-1]
    assert final.status is JobStatus.COMPLETED, (
        final,
        service.job_logs(local_farm.ctx, "alice", view.job_id),
    )
    progress = [v.frames_done for v in seen]
    assert progress == sorted(progress), progress
    assert final.frames_done == final.frames_total == 45
    assert final.chunks_total == final.chunks_done == 3

    output = service.output_location(local_farm.ctx, "alice", view.job_id)
    assert count_frames(output) == count_frames(str(multiface_video)) == 45

    chunks = local_farm.ctx.store.chunks(view.job_id)
    assert {c.status for c in chunks} == {ChunkStatus.COMMITTED}
    assert len({c.worker for c in chunks}) >= 1
    assert sum(c.stats.faces for c in chunks if c.stats) > 0  # faces were found and swapped
    chunks_dir = (
        Path(local_farm.settings.storage_url.removeprefix("file://")) / "jobs" / view.job_id / "chunks"
    )
    assert eventually(lambda: not chunks_dir.exists())  # dropped after COMPLETED

    audit = service.audit_record(local_farm.ctx, "alice", view.job_id)
    assert audit["owner"] == "alice" and len(audit["output_sha256"]) == 64
    assert set(audit["input_sha256"]) == {"video", "face"}
    with pytest.raises(Exception, match="no job"):
        service.get_job(local_farm.ctx, "mallory", view.job_id)


def test_bad_input_fails_within_seconds_before_any_render(
    local_farm: Farm, face_image: Path, tmp_path: Path
) -> None:
    fake = tmp_path / "holiday.mp4"
    fake.write_text("this is not a video\n" * 50)
    t0 = time.monotonic()
    view = submit(local_farm, fake, face_image)
    seen = wait_until(local_farm, view.job_id, finished, timeout_s=10.0)
    final = seen[-1]
    assert time.monotonic() - t0 < 10.0
    assert final.status is JobStatus.FAILED
    assert final.error_kind == "InvalidVideoError" and "holiday.mp4" in (final.error or "")
    assert final.chunks_total == 0  # planning refused it: nothing reached the gpu queue
    assert view.job_id not in "".join(w.log() for w in local_farm.render_workers)


def test_cancel_stops_rendering_and_retry_renders_only_the_missing_chunks(
    local_farm: Farm, long_video: Path, face_image: Path
) -> None:
    view = submit(local_farm, long_video, face_image)
    job_id = view.job_id
    wait_until(local_farm, job_id, lambda v: v.chunks_done >= 1 and v.status is JobStatus.RENDERING)
    cancelled = service.cancel_job(local_farm.ctx, "alice", job_id)
    assert cancelled.status is JobStatus.CANCELLED
    at_cancel = cancelled.frames_done

    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        running = [c for c in local_farm.ctx.store.chunks(job_id) if c.status is ChunkStatus.RUNNING]
        if not running and not active_render_tasks(local_farm):
            break
        time.sleep(0.25)
    else:
        raise AssertionError(f"render tasks still active 10 s after cancel:\n{local_farm.worker_logs()}")
    after = service.get_job(local_farm.ctx, "alice", job_id)
    assert at_cancel <= after.frames_done <= at_cancel + BATCH_FRAMES
    assert after.status is JobStatus.CANCELLED

    before = {c.index: c for c in local_farm.ctx.store.chunks(job_id)}
    committed_before = {i for i, c in before.items() if c.status is ChunkStatus.COMMITTED}
    assert committed_before and len(committed_before) < len(before)

    retried = service.retry_job(local_farm.ctx, "alice", job_id)
    assert retried.status is JobStatus.RENDERING and retried.frames_done >= after.frames_done
    seen = wait_until(local_farm, job_id, finished)
    assert seen[-1].status is JobStatus.COMPLETED, service.job_logs(local_farm.ctx, "alice", job_id)
    progress = [v.frames_done for v in seen]
    assert progress == sorted(progress)

    after_retry = {c.index: c for c in local_farm.ctx.store.chunks(job_id)}
    for index in committed_before:  # committed chunks were not rendered again
        assert after_retry[index].attempts == before[index].attempts
    for index in set(before) - committed_before:
        assert len(after_retry[index].attempts) > len(before[index].attempts)
    output = service.output_location(local_farm.ctx, "alice", job_id)
    assert count_frames(output) == 120


def test_retry_of_a_running_job_is_refused(local_farm: Farm, multiface_video: Path, face_image: Path) -> None:
    view = submit(local_farm, multiface_video, face_image, owner="bob")
    with pytest.raises(Exception, match="only FAILED or CANCELLED"):
        service.retry_job(local_farm.ctx, "bob", view.job_id)
    wait_until(local_farm, view.job_id, finished, owner="bob")


def test_upload_over_the_limit_is_refused(local_farm: Farm) -> None:
    from dataclasses import replace

    ctx = replace(local_farm.ctx, settings=local_farm.settings.model_copy(update={"max_upload_bytes": 1000}))
    with pytest.raises(Exception, match="exceeds the limit of 1000 bytes"):
        service.submit_job(
            ctx,
            owner="alice",
            video=io.BytesIO(b"x" * 5000),
            video_name="big.mp4",
            face=io.BytesIO(b"y"),
            face_name="f.png",
            options=OPTIONS,
        )


def test_reconciler_requeues_a_chunk_whose_worker_stalled(
    local_farm: Farm, multiface_video: Path, face_image: Path, tmp_path: Path
) -> None:
    """A worker frozen mid-chunk (SIGSTOP) stops heartbeating; the reconciler hands its chunk to another."""
    import os
    import signal

    slow_copy = tmp_path / STALL_VIDEO  # each of its batches sleeps 0.5 s: the job cannot race ahead
    shutil.copyfile(multiface_video, slow_copy)
    view = submit(local_farm, slow_copy, face_image)
    job_id = view.job_id
    store = local_farm.ctx.store
    seen = wait_until(
        local_farm, job_id, lambda v: v.stats.get("chunks_running", 0) >= 1 or v.status.finished
    )
    running = [c for c in store.chunks(job_id) if c.status is ChunkStatus.RUNNING]
    assert running, f"no chunk was running to freeze: {seen[-1]}"
    victim = running[0]
    pid = _child_pid_of(local_farm, victim.worker)
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(1.0)
        report = reconcile_once(local_farm.ctx, now=time.time() + local_farm.settings.stall_after_s + 1)
        assert (job_id, victim.index) in report.requeued or store.get_chunk(job_id, victim.index).status is (
            ChunkStatus.COMMITTED
        )
        final = wait_until(local_farm, job_id, finished)[-1]
    finally:
        os.kill(pid, signal.SIGCONT)
    assert final.status is JobStatus.COMPLETED, service.job_logs(local_farm.ctx, "alice", job_id)
    assert count_frames(service.output_location(local_farm.ctx, "alice", job_id)) == 45


def _child_pid_of(farm: Farm, worker_hostname: str) -> int:
    """The prefork child of the render worker named ``worker_hostname`` (``render0@host``)."""
    name = worker_hostname.split("@")[0]
    worker = next(w for w in farm.render_workers if w.name == name)
    children = Path(f"/proc/{worker.proc.pid}/task/{worker.proc.pid}/children").read_text().split()
    assert children, f"worker {name} has no child process"
    return int(children[0])
