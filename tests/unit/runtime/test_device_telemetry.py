"""Device selection without touching CUDA, and the telemetry the worker reports."""

from __future__ import annotations

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from shared.errors import ConfigError
from worker.runtime.budget import MemoryBudget
from worker.runtime.device import (
    LazyDevice,
    describe_device,
    mem_get_info,
    parse_device_setting,
    select_device,
)
from worker.runtime.model_cache import ModelCache
from worker.runtime.oom import OomCounter
from worker.runtime.telemetry import NvmlProbe, RuntimeMetrics, collect_runtime_stats

CPU = torch.device("cpu")


def test_device_settings_are_validated() -> None:
    assert parse_device_setting("auto") == ("auto", None)
    assert parse_device_setting("cuda:1") == ("cuda", 1)
    for bad in ("gpu", "cpu:0", "cuda:x", "auto:1"):
        with pytest.raises(ConfigError, match="FACEFARM_DEVICE"):
            parse_device_setting(bad)


def test_device_selection_follows_what_is_visible() -> None:
    def yes() -> bool:
        return True

    def no() -> bool:
        return False

    def two() -> int:
        return 2

    assert select_device("auto", cuda_available=no) == CPU
    assert select_device("auto", cuda_available=yes, cuda_count=two) == torch.device("cuda", 0)
    assert select_device("cuda:1", cuda_available=yes, cuda_count=two) == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="only 2 CUDA device"):
        select_device("cuda:2", cuda_available=yes, cuda_count=two)
    with pytest.raises(ConfigError, match="no CUDA device is visible"):
        select_device("cuda", cuda_available=no)


def test_lazy_device_resolves_on_first_use_only() -> None:
    lazy = LazyDevice("cpu")
    assert not lazy.resolved
    assert lazy.get() == CPU and lazy.resolved
    with pytest.raises(ConfigError):
        LazyDevice("tpu")


def test_cpu_memory_figures_are_host_ram() -> None:
    free, total = mem_get_info(CPU)
    assert 0 < free <= total
    info = describe_device(CPU)
    assert info.device == "cpu" and not info.is_cuda and info.uuid is None


def test_stats_and_metrics_report_budget_paging_and_recoveries() -> None:
    budget = MemoryBudget(1024**2)
    cache = ModelCache(budget, CPU, lambda name: torch.nn.Linear(16, 16))
    with cache.acquire("a"):
        pass
    oom = OomCounter(recoveries=3)
    stats = collect_runtime_stats(CPU, budget=budget, cache=cache, oom=oom)
    assert stats["budget_bytes"] == 1024**2
    assert stats["weights_reserved_bytes"] == cache.weights_bytes("a")
    assert stats["bytes_paged_in"] == cache.weights_bytes("a")
    assert stats["oom_recoveries"] == 3
    registry = CollectorRegistry()
    metrics = RuntimeMetrics(registry, worker="gpu0-1@node")
    metrics.update(stats)
    text = generate_latest(registry).decode()
    assert 'facefarm_runtime_budget_bytes{worker="gpu0-1@node"} 1.048576e+06' in text
    assert 'facefarm_runtime_oom_recoveries{worker="gpu0-1@node"} 3.0' in text


def test_nvml_absent_gives_empty_readings_not_errors() -> None:
    probe = NvmlProbe(index=0, mps=True)
    reading = probe.read()
    if reading["gpu_utilisation_percent"] is None:  # this machine has no NVIDIA driver
        assert reading == {
            "gpu_utilisation_percent": None,
            "nvml_device_used_bytes": None,
            "nvml_process_bytes": None,
        }
    probe.close()
