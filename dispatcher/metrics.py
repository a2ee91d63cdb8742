"""Prometheus metrics for the API's ``/metrics``, read from the state store at scrape time.

The store is the truth shared by every process, so the API reports what it holds rather than
counting in its own memory: jobs by status, failures by error class, chunk durations and render
frames/s (aggregates only, never per-job labels: ``/metrics`` needs no token), and the Celery queue
lengths. One registry per app, so tests can build several apps in one process.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.errors import FaceFarmError, NotFoundError
from shared.names import CHECK_QUEUE, CPU_QUEUE, GPU_QUEUE
from shared.schemas import JobStatus
from shared.state import JobRecord, JobStore

RECENT_FINISHED_JOBS = 500
CHUNK_SECONDS_BUCKETS: tuple[float, ...] = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600)
QUEUES: tuple[str, ...] = (CHECK_QUEUE, CPU_QUEUE, GPU_QUEUE)


class FarmCollector(Collector):
    """Builds every FaceFarm metric family from one pass over the store."""

    def __init__(
        self,
        store: Callable[[], JobStore | None],
        *,
        queues: Sequence[str] = QUEUES,
        recent_finished: int = RECENT_FINISHED_JOBS,
    ) -> None:
        self._store = store
        self._queues = tuple(queues)
        self._recent_finished = recent_finished

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("facefarm_store_up", "1 when the state store answered this scrape")
        store = self._store()
        if store is None:
            up.add_metric([], 0)
            yield up
            return
        try:
            families = list(self._families(store))
        except FaceFarmError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self, store: JobStore) -> Iterator[Metric]:
        active = store.active_job_ids()
        finished = store.finished_before(time.time())[-self._recent_finished :]
        records = list(_records(store, [*active, *finished]))

        jobs = GaugeMetricFamily(
            "facefarm_jobs",
            "Jobs by status (active jobs plus the most recent finished ones)",
            labels=["status"],
        )
        by_status = Counter(r.status for r in records)
        for status in JobStatus:
            jobs.add_metric([status.value], by_status.get(status, 0))
        yield jobs

        failures = GaugeMetricFamily(
            "facefarm_job_failures",
            "Failed jobs among the recent ones, by error class",
            labels=["kind"],
        )
        for kind, count in sorted(
            Counter(r.error_kind or "FaceFarmError" for r in records if r.status is JobStatus.FAILED).items()
        ):
            failures.add_metric([kind], count)
        yield failures

        rendering = [r.job_id for r in records if r.status is JobStatus.RENDERING]
        fps = GaugeMetricFamily("facefarm_render_fps", "Frames per second over all rendering jobs")
        fps.add_metric([], sum(_fps(store, job_id) for job_id in rendering))
        yield fps

        frames = GaugeMetricFamily(
            "facefarm_frames",
            "Frames of active jobs plus the most recent finished ones: planned (total) and rendered (done)",
            labels=["state"],
        )
        frames.add_metric(["total"], sum(r.frames_total for r in records))
        frames.add_metric(["done"], sum(_frames_done(store, r) for r in records))
        yield frames

        yield chunk_seconds_family(_attempt_seconds(store, active))

        queue = GaugeMetricFamily(
            "facefarm_queue_length", "Messages waiting in each Celery queue", labels=["queue"]
        )
        for name, length in store.queue_lengths(self._queues).items():
            queue.add_metric([name], length)
        yield queue


def chunk_seconds_family(durations_s: Iterable[float]) -> HistogramMetricFamily:
    """A histogram of finished chunk attempts' wall-clock seconds (pure: easy to test)."""
    values = sorted(durations_s)
    buckets: list[tuple[str, float]] = [
        (repr(float(le)), sum(1 for v in values if v <= le)) for le in CHUNK_SECONDS_BUCKETS
    ]
    buckets.append(("+Inf", len(values)))
    return HistogramMetricFamily(
        "facefarm_chunk_duration_seconds",
        "Wall-clock seconds of successful chunk attempts of active jobs",
        buckets=buckets,
        sum_value=sum(values),
    )


def _records(store: JobStore, job_ids: Iterable[str]) -> Iterator[JobRecord]:
    seen: set[str] = set()
    for job_id in job_ids:
        if job_id in seen:
            continue
        seen.add(job_id)
        try:
            yield store.get_job(job_id)
        except NotFoundError:
            continue  # expired between the listing and the read


def _fps(store: JobStore, job_id: str) -> float:
    try:
        return store.view(job_id).fps
    except NotFoundError:
        return 0.0


def _frames_done(store: JobStore, record: JobRecord) -> int:
    """A completed job rendered all its frames; an active one what its chunks report (cheap reads only)."""
    if record.status is JobStatus.COMPLETED:
        return record.frames_total
    if record.status in (JobStatus.RENDERING, JobStatus.MERGING):
        try:
            return store.view(record.job_id).frames_done
        except NotFoundError:
            return 0
    return 0


def _attempt_seconds(store: JobStore, job_ids: Iterable[str]) -> Iterator[float]:
    for job_id in job_ids:
        try:
            chunks = store.chunks(job_id)
        except NotFoundError:
            continue
        for chunk in chunks:
            for attempt in chunk.attempts:
                if attempt.end is not None and not attempt.error:
                    yield max(float(attempt.end) - float(attempt.start), 0.0)


def create_registry(store: Callable[[], JobStore | None]) -> CollectorRegistry:
    """A fresh registry holding the FaceFarm collector (one per app)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FarmCollector(store))
    return registry
