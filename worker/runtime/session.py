"""The per-process runtime: one object owning the device, budget, model cache and safety net.

Created by the worker child on its first task (``start``), never at import or before the fork; the
pipeline asks it for plans and runs steps through it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import nn

from worker.runtime.budget import (
    DEFAULT_TILE_CANDIDATES_PX,
    BatchPlan,
    BytesPerPixelCache,
    MemoryBudget,
    TilePlan,
    activation_bytes,
    apply_budget_cap,
    plan_batches,
    plan_tiles,
    resolve_budget,
    tiled_frame_bytes,
)
from worker.runtime.device import LazyDevice
from worker.runtime.model_cache import ModelCache
from worker.runtime.oom import OomCounter, run_with_oom_retry
from worker.runtime.sizes import format_bytes
from worker.runtime.telemetry import NvmlProbe, Stats, collect_runtime_stats
from worker.runtime.um import UnifiedMemory, create_unified_memory

if TYPE_CHECKING:
    from shared.settings import Settings

log = logging.getLogger(__name__)

P = TypeVar("P")
T = TypeVar("T")


class GpuRuntime:
    """Device, budget, weights tier, calibrations and OOM counter of one worker process."""

    def __init__(self, settings: Settings, loader: Callable[[str], nn.Module]) -> None:
        self._settings = settings
        self._loader = loader
        self._lazy = LazyDevice(settings.device)
        self._cache: ModelCache | None = None
        self._nvml: NvmlProbe | None = None
        self.unified: UnifiedMemory | None = None
        self.oom = OomCounter()
        self.bytes_per_pixel = BytesPerPixelCache()

    @property
    def started(self) -> bool:
        return self._cache is not None

    def start(self) -> None:
        """Initialise CUDA (in this process), size the budget and cap the allocator to it."""
        if self._cache is not None:
            return
        device = self._lazy.get()
        budget = MemoryBudget(resolve_budget(self._settings, device))
        apply_budget_cap(budget.budget_bytes, device)
        if self._settings.unified_memory:
            self.unified = create_unified_memory(
                device, limit_bytes=budget.budget_bytes, mps_limit=self._settings.mps_mem_limit
            )
        self._cache = ModelCache(budget, device, self._loader)
        if device.type == "cuda":
            from worker.runtime.device import describe_device

            self._nvml = NvmlProbe(uuid=describe_device(device).uuid, mps=bool(self._settings.mps_mem_limit))
        log.info("runtime on %s with a budget of %s", device, format_bytes(budget.budget_bytes))

    @property
    def device(self) -> torch.device:
        return self._lazy.get()

    @property
    def cache(self) -> ModelCache:
        if self._cache is None:
            self.start()
        assert self._cache is not None
        return self._cache

    @property
    def budget(self) -> MemoryBudget:
        return self.cache.budget

    def tile_plans(
        self,
        *,
        bytes_per_pixel: float,
        scale: int,
        frame_hw: tuple[int, int],
        overlap_px: int,
        max_batch: int,
        candidates: Sequence[int] = DEFAULT_TILE_CANDIDATES_PX,
    ) -> list[TilePlan]:
        """Tile plans for one frame with what the budget has left after the resident weights."""
        free = activation_bytes(self.budget, self.device) - tiled_frame_bytes(*frame_hw, scale=scale)
        return plan_tiles(bytes_per_pixel, scale, free, candidates, overlap_px, max_batch)

    def batch_plans(self, bytes_per_item: int, max_batch: int) -> list[BatchPlan]:
        return plan_batches(bytes_per_item, activation_bytes(self.budget, self.device), max_batch)

    def run(self, step: Callable[[P], T], plans: Sequence[P]) -> T:
        """``step`` through the safety net, counted in this runtime's telemetry."""
        return run_with_oom_retry(step, plans, counter=self.oom, budget_bytes=self.budget.budget_bytes)

    def stats(self) -> Stats:
        return collect_runtime_stats(
            self.device, budget=self.budget, cache=self._cache, oom=self.oom, nvml=self._nvml
        )

    def close(self) -> None:
        """Drop device weights and wait for the GPU (MPS clients must not exit mid-kernel)."""
        if self._cache is not None:
            self._cache.close()
        if self._lazy.resolved and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self._nvml is not None:
            self._nvml.close()
