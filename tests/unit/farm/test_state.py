"""The job store against a real redis-server: fencing, the last-chunk counter, progress, cancel, retry."""

from __future__ import annotations

import multiprocessing
import threading

import pytest

from shared.errors import (
    AttemptsExhaustedError,
    BrokerUnavailableError,
    InvalidVideoError,
    JobCancelledError,
    NotFoundError,
    PermanentError,
    RetryableError,
    StaleAttemptError,
)
from shared.schemas import ChunkStats, ChunkStatus, JobOptions, JobStatus
from shared.state import JobStore
from tests.unit.farm.factories import planned_job


def test_new_job_is_queued_and_listed_for_its_owner_only(store: JobStore) -> None:
    view = store.create_job(
        "j1",
        owner="alice",
        options=JobOptions(swapper="classic"),
        video_uri="file:///v",
        face_uri="file:///f",
    )
    assert view.status is JobStatus.QUEUED
    assert [v.job_id for v in store.list_jobs("alice")] == ["j1"]
    assert store.list_jobs("bob") == []
    with pytest.raises(NotFoundError):
        store.view("nope")


def test_creating_the_same_job_id_twice_is_refused(store: JobStore) -> None:
    store.create_job("j1", owner="a", options=JobOptions(), video_uri="file:///v", face_uri="file:///f")
    with pytest.raises(PermanentError):
        store.create_job("j1", owner="b", options=JobOptions(), video_uri="file:///v", face_uri="file:///f")


def test_status_transitions_follow_the_table(store: JobStore) -> None:
    store.create_job("j1", owner="a", options=JobOptions(), video_uri="file:///v", face_uri="file:///f")
    assert not store.set_status("j1", JobStatus.RENDERING)  # QUEUED cannot skip planning
    assert not store.set_status("j1", JobStatus.COMPLETED)
    assert store.set_status("j1", JobStatus.PLANNING)
    assert store.set_status("j1", JobStatus.FAILED, error=InvalidVideoError("v.mp4: no video stream"))
    job = store.get_job("j1")
    assert (job.status, job.error, job.error_kind) == (
        JobStatus.FAILED,
        "v.mp4: no video stream",
        "InvalidVideoError",
    )
    assert not store.set_status("j1", JobStatus.MERGING)
    assert "j1" not in store.active_job_ids()
    assert store.finished_before(job.finished_at + 1) == ["j1"]  # type: ignore[operator]


def test_completed_job_cannot_be_moved_or_cancelled(store: JobStore) -> None:
    planned_job(store, "j1", [5])
    attempt = store.start_attempt("j1", 0, "w1").attempt_id
    assert store.commit_chunk("j1", 0, attempt, ChunkStats(frames=5))
    assert store.set_status("j1", JobStatus.MERGING)
    assert store.complete_job("j1", output_uri="file:///out.mp4", output_sha256="ab")
    assert not store.request_cancel("j1")
    assert not store.set_status("j1", JobStatus.RENDERING)
    assert not store.set_status("j1", JobStatus.FAILED)
    with pytest.raises(PermanentError, match="only FAILED or CANCELLED"):
        store.reset_for_retry("j1")
    assert store.view("j1").status is JobStatus.COMPLETED


def test_only_the_current_attempt_can_commit(store: JobStore) -> None:
    planned_job(store, "j1", [10, 10])
    old = store.start_attempt("j1", 0, "w1").attempt_id
    new = store.start_attempt("j1", 0, "w2").attempt_id  # a redelivery fences the first attempt out
    with pytest.raises(StaleAttemptError):
        store.heartbeat("j1", 0, old, 5)
    with pytest.raises(StaleAttemptError):
        store.commit_chunk("j1", 0, old, ChunkStats(frames=10))
    assert store.commit_chunk("j1", 0, new, ChunkStats(frames=10)) is False  # chunk 1 still open
    chunk = store.get_chunk("j1", 0)
    assert chunk.status is ChunkStatus.COMMITTED and chunk.worker == "w2" and chunk.deliveries == 2
    with pytest.raises(StaleAttemptError):  # a late duplicate after the commit is dropped too
        store.start_attempt("j1", 0, "w3")


def _commit_all_in_threads(store: JobStore, job_id: str, n: int) -> list[bool]:
    attempts = [store.start_attempt(job_id, i, f"w{i}").attempt_id for i in range(n)]
    results: list[bool] = [False] * n
    barrier = threading.Barrier(n)

    def commit(i: int) -> None:
        barrier.wait()
        results[i] = store.commit_chunk(job_id, i, attempts[i], ChunkStats(frames=1))

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_exactly_one_of_many_racing_threads_commits_the_last_chunk(store: JobStore) -> None:
    for round_ in range(5):
        job_id = f"race{round_}"
        planned_job(store, job_id, [1] * 24)
        assert sum(_commit_all_in_threads(store, job_id, 24)) == 1


def _commit_in_process(
    redis_url: str, job_id: str, index: int, attempt_id: str, start: object, out: object
) -> None:
    store = JobStore.from_url(redis_url, max_attempts=3)
    start.wait()  # type: ignore[attr-defined]
    out.put(store.commit_chunk(job_id, index, attempt_id, ChunkStats(frames=1)))  # type: ignore[attr-defined]


def test_exactly_one_of_many_racing_processes_commits_the_last_chunk(store: JobStore, redis_url: str) -> None:
    n = 8
    planned_job(store, "jp", [1] * n)
    attempts = [store.start_attempt("jp", i, f"w{i}").attempt_id for i in range(n)]
    mp = multiprocessing.get_context("fork")
    start, out = mp.Event(), mp.Queue()
    procs = [
        mp.Process(target=_commit_in_process, args=(redis_url, "jp", i, attempts[i], start, out))
        for i in range(n)
    ]
    for p in procs:
        p.start()
    start.set()
    results = [out.get(timeout=60) for _ in range(n)]
    for p in procs:
        p.join(timeout=30)
    assert sorted(results) == [False] * (n - 1) + [True]


def test_duplicate_commit_of_the_same_attempt_is_not_last_twice(store: JobStore) -> None:
    planned_job(store, "j1", [3])
    attempt = store.start_attempt("j1", 0, "w").attempt_id
    assert store.commit_chunk("j1", 0, attempt, ChunkStats(frames=3)) is True
    assert store.commit_chunk("j1", 0, attempt, ChunkStats(frames=3)) is False


def test_progress_never_decreases_across_a_retried_attempt(store: JobStore) -> None:
    planned_job(store, "j1", [20, 20])
    first = store.start_attempt("j1", 0, "w1").attempt_id
    store.heartbeat("j1", 0, first, 12)
    assert store.view("j1").frames_done == 12
    assert store.fail_chunk("j1", 0, first, RetryableError("GPU hiccup"))  # will retry
    second = store.start_attempt("j1", 0, "w2").attempt_id
    seen = [store.view("j1").frames_done]
    for frames in (0, 4, 8, 12, 16, 20):
        store.heartbeat("j1", 0, second, frames)
        seen.append(store.view("j1").frames_done)
    assert seen == sorted(seen) and seen[0] == 12 and seen[-1] == 20
    assert store.get_chunk("j1", 0).frames_done == 20  # the attempt's own count restarted from 0
    store.commit_chunk("j1", 0, second, ChunkStats(frames=20))
    view = store.view("j1")
    assert (view.frames_done, view.frames_total, view.chunks_done) == (20, 40, 1)


def test_progress_reports_a_rate_and_an_eta(store: JobStore) -> None:
    planned_job(store, "j1", [100])
    t0 = float(store.get_job("j1").fields["rate_t0"])
    attempt = store.start_attempt("j1", 0, "w", now=t0).attempt_id
    store.heartbeat("j1", 0, attempt, 50, now=t0 + 10)
    view = store.view("j1", now=t0 + 10)
    assert view.fps == pytest.approx(5.0)
    assert view.eta_s == pytest.approx(10.0)


def test_heartbeat_caps_frames_at_the_chunk_size(store: JobStore) -> None:
    planned_job(store, "j1", [10])
    attempt = store.start_attempt("j1", 0, "w").attempt_id
    store.heartbeat("j1", 0, attempt, 999)
    assert store.view("j1").frames_done == 10


def test_cancel_freezes_progress_refuses_commit_and_new_attempts(store: JobStore) -> None:
    planned_job(store, "j1", [10, 10])
    attempt = store.start_attempt("j1", 0, "w").attempt_id
    store.heartbeat("j1", 0, attempt, 4)
    assert store.request_cancel("j1")
    assert store.is_cancelled("j1")
    assert store.heartbeat("j1", 0, attempt, 8) is False  # told to stop, not recorded
    assert store.view("j1").frames_done == 4
    with pytest.raises(JobCancelledError):
        store.commit_chunk("j1", 0, attempt, ChunkStats(frames=10))
    with pytest.raises(JobCancelledError):
        store.start_attempt("j1", 1, "w")
    assert store.view("j1").status is JobStatus.CANCELLED
    assert not store.request_cancel("j1")  # already finished: no-op


def test_retry_keeps_committed_chunks_and_progress(store: JobStore) -> None:
    planned_job(store, "j1", [10, 10, 10])
    a0 = store.start_attempt("j1", 0, "w").attempt_id
    store.commit_chunk("j1", 0, a0, ChunkStats(frames=10))
    a1 = store.start_attempt("j1", 1, "w").attempt_id
    store.heartbeat("j1", 1, a1, 6)
    store.request_cancel("j1")
    before = store.view("j1").frames_done
    plan = store.reset_for_retry("j1")
    assert (plan.action, plan.indices) == ("render", (1, 2))
    assert not store.is_cancelled("j1")
    view = store.view("j1")
    assert view.status is JobStatus.RENDERING and view.frames_done == before == 16 and view.error is None
    with pytest.raises(StaleAttemptError):  # the cancelled attempt cannot come back
        store.heartbeat("j1", 1, a1, 7)
    assert store.get_chunk("j1", 0).status is ChunkStatus.COMMITTED
    assert store.get_chunk("j1", 1).status is ChunkStatus.PENDING


def test_retry_of_a_job_with_every_chunk_committed_only_merges(store: JobStore) -> None:
    planned_job(store, "j1", [4])
    a = store.start_attempt("j1", 0, "w").attempt_id
    assert store.commit_chunk("j1", 0, a, ChunkStats(frames=4))
    store.fail_job("j1", "merge failed: disk full")
    assert store.reset_for_retry("j1").action == "merge"


def test_retry_of_a_job_that_failed_planning_plans_again(store: JobStore) -> None:
    store.create_job("j1", owner="a", options=JobOptions(), video_uri="file:///v", face_uri="file:///f")
    store.set_status("j1", JobStatus.PLANNING)
    store.fail_job("j1", InvalidVideoError("bad"))
    assert store.reset_for_retry("j1").action == "replan"
    assert store.get_job("j1").status is JobStatus.QUEUED


def test_deliveries_beyond_max_attempts_fail_chunk_and_job(store: JobStore) -> None:
    planned_job(store, "j1", [10, 10])
    for _ in range(3):
        attempt = store.start_attempt("j1", 0, "w").attempt_id  # e.g. a child killed each time
    with pytest.raises(AttemptsExhaustedError, match="chunk 0 failed after 3 attempts"):
        store.start_attempt("j1", 0, "w")
    view = store.view("j1")
    assert view.status is JobStatus.FAILED and view.error_kind == "AttemptsExhaustedError"
    assert store.get_chunk("j1", 0).status is ChunkStatus.FAILED
    with pytest.raises(StaleAttemptError):
        store.heartbeat("j1", 0, attempt, 1)


def test_retryable_failure_on_the_last_attempt_fails_the_job(store: JobStore) -> None:
    planned_job(store, "j1", [10])
    assert store.fail_chunk("j1", 0, store.start_attempt("j1", 0, "w").attempt_id, RetryableError("x"))
    assert store.fail_chunk("j1", 0, store.start_attempt("j1", 0, "w").attempt_id, RetryableError("y"))
    assert not store.fail_chunk("j1", 0, store.start_attempt("j1", 0, "w").attempt_id, RetryableError("oom"))
    view = store.view("j1")
    assert view.status is JobStatus.FAILED
    assert view.error == "chunk 0 failed after 3 attempts: oom"
    attempts = store.get_chunk("j1", 0).attempts
    assert [a.error for a in attempts] == ["x", "y", "oom"] and all(a.end for a in attempts)


def test_permanent_failure_fails_the_job_at_once_with_its_message(store: JobStore) -> None:
    planned_job(store, "j1", [10, 10])
    attempt = store.start_attempt("j1", 1, "w").attempt_id
    assert not store.fail_chunk("j1", 1, attempt, InvalidVideoError("src.mp4: decoded 9 of 10 frames"))
    view = store.view("j1")
    assert (view.status, view.error_kind) == (JobStatus.FAILED, "InvalidVideoError")
    assert view.error == "chunk 1: src.mp4: decoded 9 of 10 frames"


def test_stalled_chunks_are_found_and_released_once(store: JobStore) -> None:
    planned_job(store, "j1", [10, 10])
    a0 = store.start_attempt("j1", 0, "w", now=1000.0).attempt_id
    a1 = store.start_attempt("j1", 1, "w", now=1000.0).attempt_id
    store.heartbeat("j1", 1, a1, 3, now=1055.0)
    stalled = store.stalled_chunks(now=1070.0, stall_after_s=60.0)
    assert [(s.job_id, s.index, s.attempt_id) for s in stalled] == [("j1", 0, a0)]
    assert store.release_attempt("j1", 0, a0, "stalled", stale_before=1010.0)
    assert not store.release_attempt("j1", 0, a0, "stalled", stale_before=1010.0)
    assert store.get_chunk("j1", 0).status is ChunkStatus.PENDING
    with pytest.raises(StaleAttemptError):  # the stalled worker, if it wakes up, is fenced out
        store.commit_chunk("j1", 0, a0, ChunkStats(frames=10))


def test_release_loses_against_a_fresh_heartbeat(store: JobStore) -> None:
    planned_job(store, "j1", [10])
    a0 = store.start_attempt("j1", 0, "w", now=1000.0).attempt_id
    store.heartbeat("j1", 0, a0, 2, now=1100.0)
    assert not store.release_attempt("j1", 0, a0, "stalled", stale_before=1050.0)


def test_merges_due_finds_committed_jobs_still_rendering(store: JobStore) -> None:
    planned_job(store, "j1", [5])
    a = store.start_attempt("j1", 0, "w").attempt_id
    store.commit_chunk("j1", 0, a, ChunkStats(frames=5), now=1000.0)
    updated = store.get_job("j1").updated_at
    assert store.merges_due(now=updated + 1, grace_s=30) == []
    assert store.merges_due(now=updated + 31, grace_s=30) == ["j1"]


def test_log_is_capped(store: JobStore) -> None:
    store.log_lines_max = 5
    for i in range(12):
        store.append_log("j1", f"line {i}")
    lines = store.logs("j1")
    assert len(lines) == 5 and lines[-1].endswith("line 11")


def test_lock_has_one_holder_and_expires(store: JobStore) -> None:
    assert store.acquire_lock("reconciler", "a", ttl_s=0.2)
    assert not store.acquire_lock("reconciler", "b", ttl_s=10)
    assert store.acquire_lock("reconciler", "a", ttl_s=0.2)  # the holder extends
    threading.Event().wait(0.3)
    assert store.acquire_lock("reconciler", "b", ttl_s=10)
    assert not store.release_lock("reconciler", "a")
    assert store.release_lock("reconciler", "b")


def test_unreachable_redis_raises_broker_unavailable() -> None:
    from tests.integration.farm.services import free_port

    dead = JobStore.from_url(f"redis://127.0.0.1:{free_port()}/0", max_attempts=3, socket_timeout_s=1)
    with pytest.raises(BrokerUnavailableError, match="not reachable"):
        dead.get_job("x")
