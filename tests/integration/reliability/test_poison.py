"""Poison chunks and poison workers: bounded attempts on distinct workers, self-blocking, no hangs.

Faults come from the farm's ``FACEFARM_FAULT_INJECTION`` (see conftest): chunk 1 of
``poison_raise.mp4`` raises, chunk 1 of ``poison_exit.mp4`` kills its process, and render2 raises on
every chunk of ``blockme*.mp4``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from celery import Celery

from facefarm.launcher import unblock_workers
from shared.schemas import JobStatus
from tests.integration.reliability.conftest import Farm, Recorder

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("video_name", "kind", "reason"),
    # A killed process is noticed by Celery's redelivery ("lost") or by the reconciler ("stalled").
    [
        ("poison_raise.mp4", "exception", "injected fault"),
        ("poison_exit.mp4", "process death", "was lost while rendering|stalled"),
    ],
)
def test_poison_chunk_gets_three_attempts_on_three_workers_then_the_job_fails_with_the_reason(
    farm: Farm, videos: Path, face_image: Path, record: Recorder, video_name: str, kind: str, reason: str
) -> None:
    t0 = time.monotonic()
    view = farm.submit(videos / "base30.mp4", face_image, name=video_name)
    final = farm.wait(view.job_id, timeout_s=120)[-1]
    seconds = time.monotonic() - t0
    assert final.status is JobStatus.FAILED, farm.ctx.store.logs(view.job_id)
    assert final.error_kind == "AttemptsExhaustedError"
    assert final.error is not None and "chunk 1 failed after 3 attempts" in final.error
    assert re.search(reason, final.error), final.error
    chunk = farm.ctx.store.get_chunk(view.job_id, 1)
    workers = [a.worker for a in chunk.attempts]
    assert len(workers) == 3 and len(set(workers)) == 3, chunk.attempts  # three distinct workers
    assert all(a.error and re.search(reason, a.error) for a in chunk.attempts), chunk.attempts
    assert set(chunk.failed_workers) == set(workers)
    for worker in farm.render_workers:  # no worker crashed for good: every one still heartbeats
        assert worker.proc.poll() is None
    assert len(farm.ctx.store.live_workers(farm.settings.worker_seen_ttl_s)) == 3
    record(
        "poison",
        f"chunk raising on every attempt ({kind})" if kind == "exception" else "chunk killing its process",
        f"FAILED after 3 attempts on 3 workers: {final.error_kind}",
        seconds=round(seconds, 1),
    )


def _active_queues(farm: Farm) -> dict[str, list[str]]:
    app = Celery(broker=farm.settings.redis_url, set_as_current=False)
    try:
        replies = app.control.inspect(timeout=1.5).active_queues() or {}
    finally:
        app.close()
    return {name: sorted(q["name"] for q in queues) for name, queues in replies.items()}


def _wait(predicate: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_worker_failing_five_chunks_in_a_row_blocks_itself_and_resumes_on_unblock(
    farm: Farm, videos: Path, face_image: Path, record: Recorder
) -> None:
    store, node = farm.ctx.store, farm.node("render2")
    jobs = [farm.submit(videos / "base45.mp4", face_image, name=f"blockme{i}.mp4").job_id for i in range(4)]
    _wait(lambda: store.worker_block(node) is not None, 150, f"{node} to be blocked")
    block = store.worker_block(node)
    assert block is not None and "injected fault" in block["reason"]
    _wait(lambda: store.worker_status(node).get("state") == "blocked", 10, "the heartbeat to say blocked")
    _wait(lambda: "gpu" not in _active_queues(farm).get(node, ["gpu"]), 15, f"{node} to stop consuming")
    assert "is BLOCKED after 5 failures in a row" in farm.worker("render2").log()

    for job_id in jobs:  # every chunk render2 failed was rendered elsewhere: the jobs complete
        final = farm.wait(job_id, timeout_s=180)[-1]
        assert final.status is JobStatus.COMPLETED, store.logs(job_id)
    blocked_at = float(block["at"])
    other = farm.submit(videos / "base30.mp4", face_image, name="flowing_while_blocked.mp4")
    assert farm.wait(other.job_id, timeout_s=120)[-1].status is JobStatus.COMPLETED  # other jobs flow
    for chunk in store.chunks(other.job_id):
        assert all(a.worker != node for a in chunk.attempts if a.start > blocked_at + 2)

    unblock_workers(farm.settings, [node])  # what `facefarm worker --unblock` does on that node
    _wait(lambda: store.worker_status(node).get("state") == "ok", 10, "the heartbeat to say ok")
    _wait(lambda: "gpu" in _active_queues(farm).get(node, []), 15, f"{node} to consume again")
    assert "is unblocked: consuming gpu again" in farm.worker("render2").log()
    record(
        "poison",
        "worker failing 5 chunks in a row",
        "blocked itself (cancel_consumer), jobs completed elsewhere, resumed on --unblock",
    )


def test_job_fails_instead_of_hanging_when_every_worker_is_blocked(
    farm: Farm, videos: Path, face_image: Path, record: Recorder
) -> None:
    store = farm.ctx.store
    nodes = [farm.node(w.name) for w in farm.render_workers]
    try:
        for node in nodes:
            store.block_worker(node, "test: every worker blocked", ttl_s=120)
        _wait(lambda: all(store.worker_status(n).get("state") == "blocked" for n in nodes), 10, "all blocked")
        t0 = time.monotonic()
        view = farm.submit(videos / "base15.mp4", face_image, name="no_worker_left.mp4")
        final = farm.wait(view.job_id, timeout_s=30)[-1]
        seconds = time.monotonic() - t0
        assert final.status is JobStatus.FAILED, store.logs(view.job_id)
        assert final.error is not None and "no eligible worker left" in final.error
    finally:
        for node in nodes:
            store.unblock_worker(node)
    _wait(lambda: all(store.worker_status(n).get("state") == "ok" for n in nodes), 10, "all unblocked")
    after = farm.submit(videos / "base15.mp4", face_image, name="after_unblock.mp4")
    assert farm.wait(after.job_id, timeout_s=120)[-1].status is JobStatus.COMPLETED
    record(
        "poison", "every live worker blocked", f"job FAILED in {seconds:.1f} s (no eligible worker), no hang"
    )
