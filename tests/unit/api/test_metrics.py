"""Metric families built from store data (pure parts)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from dispatcher.metrics import FarmCollector, chunk_seconds_family


def test_chunk_duration_histogram_is_cumulative_with_sum_and_count() -> None:
    family = chunk_seconds_family([0.5, 3.0, 20.0, 4000.0])
    samples = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert samples[("facefarm_chunk_duration_seconds_bucket", "1.0")] == 1
    assert samples[("facefarm_chunk_duration_seconds_bucket", "5.0")] == 2
    assert samples[("facefarm_chunk_duration_seconds_bucket", "30.0")] == 3
    assert samples[("facefarm_chunk_duration_seconds_bucket", "3600.0")] == 3
    assert samples[("facefarm_chunk_duration_seconds_bucket", "+Inf")] == 4
    assert samples[("facefarm_chunk_duration_seconds_count", None)] == 4
    assert samples[("facefarm_chunk_duration_seconds_sum", None)] == 4023.5


def test_without_a_store_the_scrape_says_the_store_is_down() -> None:
    registry = CollectorRegistry()
    registry.register(FarmCollector(lambda: None))
    text = generate_latest(registry).decode()
    assert "facefarm_store_up 0.0" in text
