"""The render task's side of the test-only failure injection (``shared.faults``; a TEST HOOK).

``FACEFARM_FAULT_INJECTION`` is empty in every real deployment (Settings refuses it in production),
so ``chunk_faults`` returns nothing and the task runs untouched.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from shared import faults
from shared.settings import Settings
from shared.state import JobStore


def chunk_faults(
    settings: Settings, store: JobStore, job_id: str, index: int, worker: str
) -> list[faults.Fault]:
    """The faults that apply to this attempt at chunk ``index`` on ``worker`` (usually none)."""
    configured = settings.faults
    if not configured:
        return []
    video = store.get_job(job_id).audit.get("input_names", {}).get("video")
    return faults.select(
        configured,
        target="chunk",
        video=video,
        worker=worker,
        index=index,
        occurrence=lambda fault: store.count_fault(job_id, f"chunk{index}:{fault.name}"),
    )


def fire_before_render(chosen: list[faults.Fault], where: str) -> None:
    """``raise`` raises here; ``exit`` kills this process here (``sleep`` acts per batch)."""
    for fault in chosen:
        faults.fire(fault, where)


def slowed(progress: Callable[[int], None], chosen: list[faults.Fault]) -> Callable[[int], None]:
    """``progress`` that also sleeps after every batch, so a test can kill the chunk mid-way."""
    delay_s = sum(f.sleep_s for f in chosen if f.action == "sleep")
    if delay_s <= 0:
        return progress

    def slow_progress(frames_done: int) -> None:
        progress(frames_done)
        time.sleep(delay_s)

    return slow_progress
