"""Render children publish their GPU telemetry beside the worker's heartbeat."""

from __future__ import annotations

from shared.state import JobStore


def test_runtime_telemetry_lands_in_the_worker_hash(store: JobStore) -> None:
    store.worker_seen("gpu0-0@host", state="ok")
    store.worker_runtime(
        "gpu0-0@host",
        {
            "budget_bytes": 2147483648,
            "peak_reserved_bytes": 1900000000,
            "oom_recoveries": 1,
            "gpu_utilisation_percent": None,
        },
    )
    status = store.worker_status("gpu0-0@host")
    assert status["state"] == "ok"
    assert status["runtime_budget_bytes"] == "2147483648"
    assert status["runtime_peak_reserved_bytes"] == "1900000000"
    assert status["runtime_oom_recoveries"] == "1"
    assert status["runtime_gpu_utilisation_percent"] == ""


def test_a_later_beat_overwrites_the_figures(store: JobStore) -> None:
    store.worker_runtime("w", {"oom_recoveries": 1})
    store.worker_runtime("w", {"oom_recoveries": 3})
    assert store.worker_status("w")["runtime_oom_recoveries"] == "3"
