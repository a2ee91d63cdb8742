"""The reconciler against a real redis-server and local storage, with a sender that records messages."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from dispatcher.reconciler import LOCK_NAME, reconcile_once, run_reconciler
from dispatcher.service import FarmContext
from shared.names import MERGE_JOB, RENDER_CHUNK
from shared.schemas import ChunkStats, ChunkStatus
from shared.settings import Settings
from shared.state import JobStore
from shared.storage import LocalStorage
from tests.unit.farm.factories import planned_job


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, list[Any]]] = []

    def __call__(self, name: str, args: list[Any], **_: Any) -> None:
        self.sent.append((name, args))


def make_ctx(
    store: JobStore, redis_url: str, tmp_path: Path, **overrides: Any
) -> tuple[FarmContext, Recorder]:
    settings = Settings(
        redis_url=redis_url, storage_url=(tmp_path / "s").as_uri(), stall_after_s=60, **overrides
    )
    recorder = Recorder()
    return FarmContext(settings, store, LocalStorage(tmp_path / "s"), recorder), recorder


def test_stalled_chunk_is_requeued_and_a_lost_merge_enqueued(
    store: JobStore, redis_url: str, tmp_path: Path
) -> None:
    ctx, sent = make_ctx(store, redis_url, tmp_path)
    planned_job(store, "stall", [10, 10])
    store.start_attempt("stall", 0, "w", now=1000.0)
    planned_job(store, "merge", [5])
    a = store.start_attempt("merge", 0, "w").attempt_id
    assert store.commit_chunk("merge", 0, a, ChunkStats(frames=5))  # ...and the worker died before enqueueing

    report = reconcile_once(ctx, now=time.time() + 120)
    assert report.requeued == [("stall", 0)] and report.merges == ["merge"]
    assert (RENDER_CHUNK, ["stall", 0]) in sent.sent and (MERGE_JOB, ["merge"]) in sent.sent
    assert store.get_chunk("stall", 0).status is ChunkStatus.PENDING
    assert reconcile_once(ctx, now=time.time() + 121).requeued == []  # handed back once


def test_retention_deletes_inputs_then_outputs(store: JobStore, redis_url: str, tmp_path: Path) -> None:
    ctx, _ = make_ctx(store, redis_url, tmp_path, retention_inputs_s=100, retention_outputs_s=1000)
    planned_job(store, "old", [5])
    src = tmp_path / "f"
    src.write_bytes(b"x")
    ctx.storage.put_file("jobs/old/input/video.mp4", src)
    ctx.storage.put_file("jobs/old/output.mp4", src)
    store.request_cancel("old")
    finished = store.get_job("old").finished_at or 0.0

    report = reconcile_once(ctx, now=finished + 500)
    assert report.inputs_expired == ["old"] and report.outputs_expired == []
    assert not ctx.storage.exists("jobs/old/input/video.mp4") and ctx.storage.exists("jobs/old/output.mp4")
    report = reconcile_once(ctx, now=finished + 5000)
    assert report.outputs_expired == ["old"] and not ctx.storage.exists("jobs/old/output.mp4")
    assert reconcile_once(ctx, now=finished + 6000).outputs_expired == []


def test_only_one_reconciler_is_active(store: JobStore, redis_url: str, tmp_path: Path) -> None:
    ctx, _ = make_ctx(store, redis_url, tmp_path, reconcile_interval_s=0.05)
    stop = threading.Event()
    first = threading.Thread(target=run_reconciler, args=(ctx.settings, stop), kwargs={"ctx": ctx})
    first.start()
    try:
        time.sleep(0.3)
        assert not store.acquire_lock(LOCK_NAME, "intruder", ttl_s=1)
    finally:
        stop.set()
        first.join(timeout=5)
    assert store.acquire_lock(LOCK_NAME, "next", ttl_s=1)  # released on exit: another takes over


def test_a_job_whose_check_nobody_takes_gets_one_warning(
    store: JobStore, redis_url: str, tmp_path: Path
) -> None:
    import redis

    from shared.names import CHECK_QUEUE
    from shared.schemas import JobOptions

    ctx, _ = make_ctx(store, redis_url, tmp_path, check_wait_warn_s=120)
    store.create_job(
        "q", owner="alice", options=JobOptions(swapper="classic"), video_uri="file:///v.mp4",
        face_uri="file:///f.png", now=1000.0,
    )  # fmt: skip
    assert reconcile_once(ctx, now=1500.0).check_waits == []  # nothing waits in the check queue
    broker = redis.Redis.from_url(redis_url)
    broker.rpush(CHECK_QUEUE, b"the job's check message")
    assert reconcile_once(ctx, now=1100.0).check_waits == []  # not waited long enough yet
    assert reconcile_once(ctx, now=1200.0).check_waits == ["q"]
    assert reconcile_once(ctx, now=1300.0).check_waits == []  # said once
    lines = [line for line in store.logs("q") if "input check" in line]
    assert len(lines) == 1 and "'check' queue" in lines[0] and "-Q ...,check" in lines[0]
    planned_job(store, "rendering", [5])  # past the check: never warned
    assert "rendering" not in reconcile_once(ctx, now=5000.0).check_waits
