"""Metrics move while a job runs: the API's ``/metrics`` (jobs by status, frames, queue lengths, fps,
chunk durations), the workers' task events in Flower's ``/metrics``, and the render heartbeat the
worker writes to Redis, scraped before, during and after one job on the compose stack."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.schemas import ChunkStatus, JobOptions, JobStatus
from tests.integration.ops.conftest import JOB_TIMEOUT_S, ComposeFarm, make_face_clip

pytestmark = pytest.mark.integration

FRAMES, CHUNK_FRAMES = 60, 30  # chunks of 8 batches: several 0.5 s heartbeats land mid-chunk
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, (url, response.status_code)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@dataclass(frozen=True)
class Moment:
    api: Samples
    chunks_running: int
    heartbeat_frames: int  # frames a RUNNING chunk reported in its heartbeat
    heartbeat_age_s: float


def test_api_and_worker_metrics_move_during_a_job(
    compose_farm: ComposeFarm, face_image: Path, tmp_path: Path
) -> None:
    api_metrics = f"{compose_farm.api_url}/metrics"
    flower_metrics = f"{compose_farm.flower_url}/metrics"  # outside Flower's auth, like /healthcheck
    render_worker = f"cpu0-0@{compose_farm.hostname}"
    succeeded = {"task": "facefarm.render_chunk", "type": "task-succeeded", "worker": render_worker}
    clip = make_face_clip(tmp_path / "metrics.mp4", FRAMES)

    before, flower_before = scrape(api_metrics), scrape(flower_metrics)
    assert value(before, "facefarm_store_up") == 1
    assert value(before, "facefarm_jobs", status=JobStatus.RENDERING.value) == 0
    assert value(before, "facefarm_queue_length", queue="gpu") == 0

    store = compose_farm.store()
    during: list[Moment] = []
    try:
        with compose_farm.client() as client:
            job_id = client.submit(clip, face_image, JobOptions(swapper="classic", chunk_frames=CHUNK_FRAMES))
            deadline = time.monotonic() + JOB_TIMEOUT_S
            while not client.status(job_id).status.finished:
                assert time.monotonic() < deadline, compose_farm.logs()
                chunks = store.chunks(job_id) if store.get_job(job_id).chunks_total else []
                running = [c for c in chunks if c.status is ChunkStatus.RUNNING]
                during.append(
                    Moment(
                        api=scrape(api_metrics),
                        chunks_running=len(running),
                        heartbeat_frames=max((c.frames_done for c in running), default=0),
                        heartbeat_age_s=min((time.time() - c.heartbeat_at for c in running), default=-1.0),
                    )
                )
                time.sleep(0.25)
            final = client.status(job_id)
    finally:
        store.close()
    assert final.status is JobStatus.COMPLETED, (final, compose_farm.logs())
    after, flower_after = scrape(api_metrics), scrape(flower_metrics)

    rendering = [m for m in during if value(m.api, "facefarm_jobs", status=JobStatus.RENDERING.value) == 1]
    assert rendering, "no scrape saw the job RENDERING"
    # chunks wait in the gpu queue for the one render worker
    assert max(value(m.api, "facefarm_queue_length", queue="gpu") for m in rendering) >= 1
    done_before = value(before, "facefarm_frames", state="done")
    partial = [value(m.api, "facefarm_frames", state="done") - done_before for m in rendering]
    assert any(0 < frames < FRAMES for frames in partial), partial  # progress seen mid-job
    assert partial == sorted(partial)
    assert max(value(m.api, "facefarm_render_fps") for m in rendering) > 0
    assert max(value(m.api, "facefarm_chunk_duration_seconds_count") for m in rendering) >= 1
    # the render worker's live heartbeat in Redis: progress within a chunk, fresh timestamps
    beating = [m for m in during if m.chunks_running]
    assert beating and max(m.heartbeat_frames for m in beating) > 0
    assert min(m.heartbeat_age_s for m in beating) < 5

    completed = JobStatus.COMPLETED.value
    assert (
        value(after, "facefarm_jobs", status=completed)
        == value(before, "facefarm_jobs", status=completed) + 1
    )
    assert value(after, "facefarm_jobs", status=JobStatus.RENDERING.value) == 0
    assert value(after, "facefarm_frames", state="done") == done_before + FRAMES
    assert (
        value(after, "facefarm_frames", state="total")
        == value(before, "facefarm_frames", state="total") + FRAMES
    )
    assert value(after, "facefarm_queue_length", queue="gpu") == 0
    assert value(after, "facefarm_queue_length", queue="cpu") == 0
    chunks_total = FRAMES // CHUNK_FRAMES
    events = value(flower_after, "flower_events_total", **succeeded) - value(
        flower_before, "flower_events_total", **succeeded
    )
    assert events == chunks_total, (events, sorted(k for k in flower_after if k[0] == "flower_events_total"))
