"""Killed workers, duplicate deliveries and killed merges: the job still completes, frame-identical.

Real redis-server, 3 render workers + 1 CPU worker (Celery prefork subprocesses), real ffmpeg. The
render child is SIGKILLed mid-chunk at a random batch; Celery's reject-on-worker-lost redelivers the
message, the store records the lost attempt and its worker, and the output's ``framemd5`` equals an
unkilled run's. ``-m soak`` repeats the kill 20 times.
"""

from __future__ import annotations

import os
import random
import signal
import time
import uuid
from pathlib import Path

import pytest

from shared.names import GPU_QUEUE, MERGE_JOB, RENDER_CHUNK
from shared.schemas import ChunkStatus, JobStatus
from tests.integration.reliability.conftest import Farm, Recorder, framemd5
from tests.support.farm import eventually

pytestmark = pytest.mark.integration

BATCH = 4  # FACEFARM_BATCH_FRAMES of the farm: progress moves in these steps
CHUNK = 15


@pytest.fixture(scope="package")
def reference_md5(farm: Farm, videos: Path, face_image: Path) -> list[str]:
    """The unkilled run of base45.mp4 that every killed run must match frame for frame."""
    view = farm.submit(videos / "base45.mp4", face_image, name="reference45.mp4")
    final = farm.wait(view.job_id)[-1]
    assert final.status is JobStatus.COMPLETED, farm.ctx.store.logs(view.job_id)
    md5 = framemd5(farm.output_path(view.job_id))
    assert len(md5) == 45
    return md5


def kill_mid_chunk(
    farm: Farm, job_id: str, target_frames: int, timeout_s: float = 60.0
) -> tuple[str, int, int]:
    """SIGKILL the pool child rendering a chunk of ``job_id`` once it reported ``target_frames``."""
    store = farm.ctx.store
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for chunk in store.chunks(job_id):
            if chunk.status is ChunkStatus.RUNNING and chunk.frames_done >= target_frames and chunk.worker:
                children = farm.worker(chunk.worker).child_pids()
                if len(children) == 1:
                    os.kill(children[0], signal.SIGKILL)
                    return chunk.worker, chunk.index, chunk.frames_done
        time.sleep(0.02)
    raise AssertionError(f"no chunk of {job_id} reached {target_frames} frames:\n{farm.worker_logs()}")


def run_killed_job(
    farm: Farm, videos: Path, face_image: Path, reference: list[str], record: Recorder, rng: random.Random
) -> None:
    name = f"slow_kill_{uuid.uuid4().hex[:6]}.mp4"
    target = rng.choice(range(BATCH, CHUNK, BATCH))
    t0 = time.monotonic()
    view = farm.submit(videos / "base45.mp4", face_image, name=name)
    worker, index, at_frame = kill_mid_chunk(farm, view.job_id, target)
    final = farm.wait(view.job_id)[-1]
    seconds = time.monotonic() - t0
    assert final.status is JobStatus.COMPLETED, farm.ctx.store.logs(view.job_id)
    chunk = farm.ctx.store.get_chunk(view.job_id, index)
    # Recovered by Celery's redelivery ("lost") or, if that came late, by the reconciler ("stalled").
    lost = [
        a
        for a in chunk.attempts
        if a.error and ("was lost while rendering" in a.error or "stalled" in a.error)
    ]
    assert lost and lost[0].worker == worker, (chunk.attempts, farm.ctx.store.logs(view.job_id))
    assert worker in chunk.failed_workers
    path = "redelivery" if "was lost" in (lost[0].error or "") else "reconciler"
    got = framemd5(farm.output_path(view.job_id))
    identical = got == reference
    record(
        "kill",
        f"render child SIGKILLed at frame {at_frame} of chunk {index}",
        f"completed via {path}, frames identical" if identical else "completed, FRAMES DIFFER",
        seconds=round(seconds, 1),
        attempts=len(chunk.attempts),
    )
    differ = [i for i, (a, b) in enumerate(zip(got, reference, strict=False)) if a != b]
    attempts = {
        c.index: [(a.worker, a.error) for a in c.attempts] for c in farm.ctx.store.chunks(view.job_id)
    }
    assert identical, f"the killed run's frames {differ} (of {len(reference)}) differ; attempts: {attempts}"


def test_render_child_killed_mid_chunk_is_redelivered_and_frames_match_an_unkilled_run(
    farm: Farm, videos: Path, face_image: Path, reference_md5: list[str], record: Recorder
) -> None:
    run_killed_job(farm, videos, face_image, reference_md5, record, random.Random())


@pytest.mark.soak
@pytest.mark.parametrize("repetition", range(20))
def test_soak_render_child_killed_at_random_frames(
    farm: Farm, videos: Path, face_image: Path, reference_md5: list[str], record: Recorder, repetition: int
) -> None:
    run_killed_job(farm, videos, face_image, reference_md5, record, random.Random(repetition))


def test_duplicate_render_messages_commit_once_and_merge_once(
    farm: Farm, videos: Path, face_image: Path, reference_md5: list[str], record: Recorder
) -> None:
    view = farm.submit(videos / "base45.mp4", face_image, name="slow_duplicate.mp4")
    job_id = view.job_id
    farm.wait(job_id, lambda v: v.chunks_total > 0 or v.status.finished)
    for index in range(3):  # two extra copies of every chunk's message, sent by name
        for _ in range(2):
            farm.ctx.send_task(
                RENDER_CHUNK,
                [job_id, index],
                queue=GPU_QUEUE,
                task_id=f"dup-{job_id}-{index}-{uuid.uuid4().hex[:6]}",
            )
    final = farm.wait(job_id)[-1]
    assert final.status is JobStatus.COMPLETED, farm.ctx.store.logs(job_id)
    sha_before = farm.ctx.store.get_job(job_id).fields["output_sha256"]
    farm.ctx.send_task(
        MERGE_JOB, [job_id], queue="cpu", task_id=f"dup-merge-{job_id}"
    )  # a late duplicate merge
    time.sleep(1.5)

    logs = farm.ctx.store.logs(job_id)
    commits = [line for line in logs if ": committed " in line]
    merges = [line for line in logs if "merging 3 chunks" in line]
    for chunk in farm.ctx.store.chunks(job_id):
        finished = [a for a in chunk.attempts if a.end and not a.error]
        assert len(finished) == 1, chunk.attempts  # exactly one attempt committed
    assert len(commits) == 3 and len(merges) == 1, logs
    job = farm.ctx.store.get_job(job_id)
    assert job.status is JobStatus.COMPLETED and job.fields["output_sha256"] == sha_before
    assert framemd5(farm.output_path(job_id)) == reference_md5
    record(
        "duplicate",
        "every render message sent 3 times, merge sent twice",
        "3 commits, 1 merge, frames identical",
    )


def test_cpu_worker_killed_during_merge_reruns_the_merge_and_keeps_chunks_until_completed(
    farm: Farm, videos: Path, face_image: Path, reference_md5: list[str], record: Recorder
) -> None:
    t0 = time.monotonic()
    view = farm.submit(videos / "base45.mp4", face_image, name="merge_kill.mp4")
    job_id = view.job_id
    assert farm.storage_root is not None
    chunks_dir = farm.storage_root / "jobs" / job_id / "chunks"
    seen_merging_with_chunks = False
    farm.wait(job_id, lambda v: v.status is JobStatus.MERGING or v.status.finished)
    while farm.ctx.store.get_job(job_id).status is JobStatus.MERGING:  # the killed merge, then the rerun
        seen_merging_with_chunks |= len(list(chunks_dir.glob("*/output.mp4"))) == 3
        assert len(list(chunks_dir.glob("*/output.mp4"))) == 3, "chunk outputs vanished before COMPLETED"
        time.sleep(0.05)
    final = farm.wait(job_id, timeout_s=60)[-1]
    seconds = time.monotonic() - t0
    logs = farm.ctx.store.logs(job_id)
    assert final.status is JobStatus.COMPLETED, logs
    assert seen_merging_with_chunks
    assert sum("test fault injected: exit during the merge" in line for line in logs) == 1, logs
    assert sum("merging 3 chunks" in line for line in logs) == 2, logs  # killed once, re-run once
    assert any("reconciler: all chunks committed but no merge ran" in line for line in logs), logs
    assert eventually(lambda: not chunks_dir.exists()), "chunk outputs were kept after COMPLETED"
    assert framemd5(farm.output_path(job_id)) == reference_md5
    record("kill", "CPU worker SIGKILLed during the merge", "merge re-run by the reconciler, frames identical",
           seconds=round(seconds, 1))  # fmt: skip
