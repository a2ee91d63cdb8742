"""What the runtime reports: budget, memory in use, OOM recoveries, paging, GPU utilisation.

The worker's own numbers come from ``torch.cuda`` in-process (NVML attributes MPS clients' memory to
the MPS server and under-reports managed memory). NVML gives the device's utilisation and, under
MPS, this client's memory through ``nvmlDeviceGetMPSComputeRunningProcesses``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from prometheus_client import CollectorRegistry, Gauge

from worker.runtime.budget import MemoryBudget
from worker.runtime.model_cache import ModelCache
from worker.runtime.oom import OomCounter

log = logging.getLogger(__name__)

Stats = dict[str, float | int | str | None]


class NvmlProbe:
    """NVML readings for one GPU, opened lazily in the process that reports them."""

    def __init__(self, *, uuid: str | None = None, index: int | None = None, mps: bool = False) -> None:
        self._uuid = uuid
        self._index = index
        self._mps = mps
        self._nvml: Any = None
        self._handle: Any = None

    def _open(self) -> bool:
        if self._handle is not None:
            return True
        try:
            import pynvml

            pynvml.nvmlInit()
            if self._uuid is not None:
                self._handle = pynvml.nvmlDeviceGetHandleByUUID(self._uuid)
            else:
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(self._index or 0)
            self._nvml = pynvml
        except Exception as exc:  # NVML missing or failing must never stop a render
            log.debug("NVML unavailable: %s", exc)
            self._handle = None
            return False
        return True

    def read(self, pid: int | None = None) -> Stats:
        """Utilisation (%), device memory used, and this process's memory as NVML sees it."""
        if not self._open():
            return {
                "gpu_utilisation_percent": None,
                "nvml_device_used_bytes": None,
                "nvml_process_bytes": None,
            }
        nv = self._nvml
        pid = os.getpid() if pid is None else pid
        out: Stats = {}
        try:
            out["gpu_utilisation_percent"] = int(nv.nvmlDeviceGetUtilizationRates(self._handle).gpu)
        except nv.NVMLError:
            out["gpu_utilisation_percent"] = None
        try:
            out["nvml_device_used_bytes"] = int(nv.nvmlDeviceGetMemoryInfo(self._handle).used)
        except nv.NVMLError:
            out["nvml_device_used_bytes"] = None
        try:
            lister = (
                nv.nvmlDeviceGetMPSComputeRunningProcesses
                if self._mps
                else nv.nvmlDeviceGetComputeRunningProcesses
            )
            procs = lister(self._handle)
            mine = [p.usedGpuMemory for p in procs if p.pid == pid and p.usedGpuMemory is not None]
            out["nvml_process_bytes"] = int(sum(mine)) if mine else None
        except nv.NVMLError:
            out["nvml_process_bytes"] = None
        return out

    def close(self) -> None:
        if self._handle is not None and self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass
        self._handle = None


def collect_runtime_stats(
    device: torch.device,
    *,
    budget: MemoryBudget,
    cache: ModelCache | None = None,
    oom: OomCounter | None = None,
    nvml: NvmlProbe | None = None,
) -> Stats:
    """One flat dict for the worker heartbeat (JSON-safe)."""
    stats: Stats = {
        "device": str(device),
        "budget_bytes": budget.budget_bytes,
        "weights_reserved_bytes": budget.reserved_bytes,
        "reserved_bytes": 0,
        "allocated_bytes": 0,
        "peak_reserved_bytes": 0,
        "oom_recoveries": oom.recoveries if oom else 0,
        "oom_failures": oom.failures if oom else 0,
        "bytes_paged_in": cache.stats.bytes_paged_in if cache else 0,
        "page_ins": cache.stats.page_ins if cache else 0,
        "evictions": cache.stats.evictions if cache else 0,
        "gpu_utilisation_percent": None,
        "nvml_device_used_bytes": None,
        "nvml_process_bytes": None,
    }
    if device.type == "cuda" and torch.cuda.is_initialized():
        stats["reserved_bytes"] = int(torch.cuda.memory_reserved(device))
        stats["allocated_bytes"] = int(torch.cuda.memory_allocated(device))
        stats["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(device))
    if nvml is not None:
        stats.update(nvml.read())
    return stats


_GAUGES = {
    "budget_bytes": "GPU memory budget of this worker",
    "weights_reserved_bytes": "budget held by resident model weights",
    "reserved_bytes": "memory reserved by the caching allocator",
    "allocated_bytes": "memory allocated to live tensors",
    "peak_reserved_bytes": "peak memory reserved since start (torch.cuda.max_memory_reserved)",
    "oom_recoveries": "CUDA out-of-memory errors recovered by shrinking the plan",
    "oom_failures": "steps that ran out of memory at the smallest plan",
    "bytes_paged_in": "bytes of weights copied from pinned host memory to the device",
    "page_ins": "model page-ins",
    "evictions": "model evictions",
    "gpu_utilisation_percent": "GPU utilisation over NVML's sample period",
    "nvml_process_bytes": "this process's GPU memory as NVML reports it",
}


class RuntimeMetrics:
    """The same numbers as Prometheus gauges (``facefarm_runtime_*``), labelled by worker."""

    def __init__(self, registry: CollectorRegistry, *, worker: str) -> None:
        self._worker = worker
        self._gauges = {
            key: Gauge(f"facefarm_runtime_{key}", doc, ["worker"], registry=registry)
            for key, doc in _GAUGES.items()
        }

    def update(self, stats: Stats) -> None:
        for key, gauge in self._gauges.items():
            value = stats.get(key)
            if isinstance(value, int | float):
                gauge.labels(worker=self._worker).set(value)
