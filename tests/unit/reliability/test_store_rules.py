"""The store's reliability rules against a real redis-server: lost attempts, duplicates, hand-ons,
failure streaks and blocks, unblock."""

from __future__ import annotations

import time

import pytest

from shared.errors import AvoidWorkerError, DuplicateDeliveryError, RetryableError, StaleAttemptError
from shared.schemas import ChunkStats, ChunkStatus
from shared.state import JobStore
from tests.unit.farm.factories import planned_job


def test_the_same_message_again_means_its_process_died_and_the_worker_is_marked_failed(
    store: JobStore,
) -> None:
    planned_job(store, "j", [10])
    store.start_attempt("j", 0, "w1", task_id="m1", duplicate_guard_s=60)
    again = store.start_attempt("j", 0, "w2", task_id="m1", duplicate_guard_s=60)  # Celery's redelivery
    chunk = store.get_chunk("j", 0)
    assert chunk.attempt_id == again.attempt_id and chunk.failed_workers == ("w1",)
    assert "w1 was lost while rendering" in (chunk.attempts[0].error or "")


def test_another_message_for_a_live_attempt_is_a_dropped_duplicate(store: JobStore) -> None:
    planned_job(store, "j", [10])
    first = store.start_attempt("j", 0, "w1", task_id="m1", duplicate_guard_s=60)
    with pytest.raises(DuplicateDeliveryError):
        store.start_attempt("j", 0, "w2", task_id="m2", duplicate_guard_s=60)
    chunk = store.get_chunk("j", 0)
    assert chunk.attempt_id == first.attempt_id and chunk.deliveries == 1 and chunk.failed_workers == ()
    # ...but once its heartbeat is older than the guard, the attempt is presumed dead
    later = store.start_attempt("j", 0, "w2", task_id="m2", duplicate_guard_s=60, now=time.time() + 61)
    assert store.get_chunk("j", 0).attempt_id == later.attempt_id


def test_a_worker_that_failed_the_chunk_hands_it_to_one_that_has_not(store: JobStore) -> None:
    planned_job(store, "j", [10])
    a = store.start_attempt("j", 0, "w1", task_id="m1").attempt_id
    assert store.fail_chunk("j", 0, a, RetryableError("boom"))
    with pytest.raises(AvoidWorkerError, match="w2 has not"):
        store.start_attempt("j", 0, "w1", task_id="m1", other_workers=["w2"])
    assert store.get_chunk("j", 0).deliveries == 1  # a hand-on is not an attempt
    # with nobody else eligible, the same worker may try again while attempts remain
    store.start_attempt("j", 0, "w1", task_id="m1", other_workers=[])


def test_attempts_are_capped_even_when_every_worker_failed(store: JobStore) -> None:
    planned_job(store, "j", [10])
    for worker in ("w1", "w2", "w3"):
        a = store.start_attempt("j", 0, worker, other_workers=["w1", "w2", "w3"]).attempt_id
        store.fail_chunk("j", 0, a, RetryableError(f"boom on {worker}"))
    assert store.get_chunk("j", 0).status is ChunkStatus.FAILED
    assert store.get_job("j").error == "chunk 0 failed after 3 attempts: boom on w3"
    with pytest.raises(StaleAttemptError, match="FAILED"):  # the job ended; late messages are dropped
        store.start_attempt("j", 0, "w4")


def test_failures_in_a_row_block_a_worker_a_commit_resets_the_streak_and_unblock_clears(
    store: JobStore,
) -> None:
    planned_job(store, "j", [1] * 6)
    a = store.start_attempt("j", 0, "w").attempt_id
    store.fail_chunk("j", 0, a, RetryableError("x"))
    a = store.start_attempt("j", 1, "w").attempt_id
    store.fail_chunk("j", 1, a, RetryableError("x"))
    a = store.start_attempt("j", 2, "w").attempt_id
    store.commit_chunk("j", 2, a, ChunkStats(frames=1))  # the streak ends
    for index in (3, 4):
        a = store.start_attempt("j", index, "w").attempt_id
        store.fail_chunk("j", index, a, RetryableError("x"))
    assert store.worker_block("w") is None  # 2 in a row, threshold 3
    a = store.start_attempt("j", 5, "w").attempt_id
    store.fail_chunk("j", 5, a, RetryableError("gpu on fire"))
    block = store.worker_block("w")
    assert block is not None and block["reason"] == "gpu on fire" and block["failures"] == 3
    assert 0 < store.worker_status("w")["block_ttl_s"] <= 60
    assert store.unblock_worker("w") and store.worker_block("w") is None
    assert store.worker_status("w")["consecutive_failures"] == "0"


def test_a_permanent_error_is_the_inputs_fault_not_the_workers(store: JobStore) -> None:
    from shared.errors import InvalidVideoError

    planned_job(store, "j", [1])
    a = store.start_attempt("j", 0, "w").attempt_id
    store.fail_chunk("j", 0, a, InvalidVideoError("bad source"))
    assert store.worker_status("w").get("consecutive_failures") in (None, "0")
    assert store.get_chunk("j", 0).failed_workers == ()


def test_live_workers_and_blocked_workers(store: JobStore) -> None:
    store.worker_seen("a", state="ok", now=1000.0)
    store.worker_seen("b", state="ok", now=1009.0)
    assert store.live_workers(5.0, now=1010.0) == ["b"]
    store.block_worker("b", "operator", ttl_s=30)
    assert store.blocked_workers(["a", "b"]) == {"b"}
    store.worker_gone("b")
    assert store.live_workers(60.0, now=1010.0) == ["a"]


def test_a_stalled_attempt_released_by_the_reconciler_counts_as_its_workers_failure(store: JobStore) -> None:
    planned_job(store, "j", [10])
    a = store.start_attempt("j", 0, "w1", now=1000.0).attempt_id
    assert store.release_attempt("j", 0, a, "stalled: no heartbeat", stale_before=1010.0, now=1020.0)
    chunk = store.get_chunk("j", 0)
    assert chunk.failed_workers == ("w1",) and chunk.status is ChunkStatus.PENDING
    assert store.worker_status("w1")["consecutive_failures"] == "1"
