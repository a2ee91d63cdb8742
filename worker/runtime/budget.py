"""The worker's GPU memory budget and the plans (batch, tile) that must fit inside it.

Plans come from declared or calibrated bytes per pixel, never from model internals, and a plan
is only offered if its estimate fits what is free: the OOM safety net (``oom.py``) covers the
estimate being wrong, never a plan that was known not to fit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from shared.errors import ConfigError, FrameTooLargeError
from worker.runtime.device import mem_get_info
from worker.runtime.sizes import format_bytes, parse_bytes, parse_mps_limit

if TYPE_CHECKING:  # settings are only read, never built, here
    from shared.settings import Settings

DEFAULT_TILE_CANDIDATES_PX = (512, 384, 256, 192, 128, 96, 64, 32)
DEFAULT_SAFETY = 1.25  # cuDNN workspaces and allocator rounding vary with the tile size
OUTPUT_BYTES_PER_VALUE = 4  # tiles' outputs are accumulated in fp32 for seam blending
_BLOCK_BYTES = 512  # the caching allocator rounds every block up to this


class MemoryBudget:
    """Bytes of device memory this worker may use, and who holds them (weights, by owner)."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes <= 0:
            raise ConfigError(f"the GPU budget must be positive, got {budget_bytes} bytes")
        self.budget_bytes = int(budget_bytes)
        self._held: dict[str, int] = {}

    @property
    def reserved_bytes(self) -> int:
        return sum(self._held.values())

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.reserved_bytes

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.free_bytes

    def reserve(self, owner: str, nbytes: int) -> None:
        """Account ``nbytes`` to ``owner``; refusing is the caller's cue to evict or shrink."""
        if owner in self._held:
            raise ValueError(f"{owner!r} already holds {self._held[owner]} bytes of the budget")
        if not self.fits(nbytes):
            raise ValueError(f"{owner!r} needs {nbytes} bytes, only {self.free_bytes} are free")
        self._held[owner] = int(nbytes)

    def release(self, owner: str) -> int:
        return self._held.pop(owner, 0)

    def holders(self) -> dict[str, int]:
        return dict(self._held)

    def __repr__(self) -> str:
        return (
            f"MemoryBudget({format_bytes(self.budget_bytes)}, reserved {format_bytes(self.reserved_bytes)})"
        )


def resolve_budget(
    settings: Settings,
    device: torch.device,
    *,
    mps_limit: str | None = None,
    free_bytes: int | None = None,
) -> int:
    """The worker's budget in bytes.

    ``auto``: the MPS per-client limit when one applies (``mps_limit`` or
    ``settings.mps_mem_limit``), never more than ``budget_free_fraction`` of the free memory; without
    MPS, that fraction of the free memory. An explicit size is capped by the MPS limit too, since the
    driver enforces that limit whatever we plan.
    """
    limit_text = mps_limit if mps_limit is not None else settings.mps_mem_limit
    limit = parse_mps_limit(limit_text) if limit_text else None
    if free_bytes is None:
        free_bytes = mem_get_info(device)[0]
    by_free = int(settings.budget_free_fraction * free_bytes)
    if settings.gpu_budget.strip().lower() != "auto":
        explicit = parse_bytes(settings.gpu_budget)
        return min(explicit, limit) if limit else explicit
    if limit is not None:
        return min(limit, by_free) if device.type == "cuda" else limit
    return by_free


def apply_budget_cap(budget_bytes: int, device: torch.device) -> None:
    """Make the caching allocator itself refuse to reserve past the budget (raises OOM instead).

    This turns the budget into a hard ceiling on ``memory_reserved``; the OOM safety net then
    shrinks the plan. No-op on the CPU.
    """
    if device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total), device)


def activation_bytes(budget: MemoryBudget, device: torch.device) -> int:
    """What is left for activations: the budget minus what is in use, capped by real free memory."""
    if device.type != "cuda":
        return budget.free_bytes
    allocated = torch.cuda.memory_allocated(device)
    cached_unused = torch.cuda.memory_reserved(device) - allocated
    device_free = mem_get_info(device)[0] + cached_unused
    return max(0, min(budget.budget_bytes - max(allocated, budget.reserved_bytes), device_free))


@dataclass(frozen=True)
class BatchPlan:
    """A batch size and what it is expected to need."""

    batch: int
    bytes_needed: int

    def __str__(self) -> str:
        return f"batch {self.batch} (~{format_bytes(self.bytes_needed)})"


@dataclass(frozen=True)
class TilePlan:
    """One way to run a super-resolution step: tile side, overlap, tiles per batch."""

    tile_px: int
    overlap_px: int
    batch: int
    bytes_needed: int

    def __str__(self) -> str:
        return (
            f"tile {self.tile_px} px (overlap {self.overlap_px} px), batch {self.batch} "
            f"(~{format_bytes(self.bytes_needed)})"
        )


def plan_batch(bytes_per_item: int, free_bytes: int, max_batch: int) -> int:
    """The largest batch (≤ ``max_batch``) whose items fit in ``free_bytes``; 0 if none fits."""
    if bytes_per_item <= 0:
        raise ValueError("bytes_per_item must be positive")
    return max(0, min(max_batch, free_bytes // bytes_per_item))


def plan_batches(bytes_per_item: int, free_bytes: int, max_batch: int) -> list[BatchPlan]:
    """The batch plan and its fallbacks (halving down to 1), for ``run_with_oom_retry``."""
    batch = plan_batch(bytes_per_item, free_bytes, max_batch)
    if batch == 0:
        raise FrameTooLargeError(
            f"one item needs {format_bytes(bytes_per_item)} but only {format_bytes(free_bytes)} of the "
            "GPU budget is free: raise FACEFARM_GPU_BUDGET or run fewer clients per GPU",
            bytes_needed=bytes_per_item,
            free_bytes=free_bytes,
        )
    plans = []
    while batch >= 1:
        plans.append(BatchPlan(batch, batch * bytes_per_item))
        batch //= 2
    return plans


def tile_bytes(
    tile_px: int,
    *,
    bytes_per_pixel: float,
    scale: int,
    batch: int,
    safety: float = DEFAULT_SAFETY,
) -> int:
    """Estimated peak for one batch of ``tile_px`` square tiles (the overlap lies inside the tile).

    ``bytes_per_pixel`` is per *input* pixel and covers the network's activations (including those
    at output resolution), as the model descriptors declare it; the fp32 output tile kept for
    blending is added from ``scale``.
    """
    per_tile = tile_px * tile_px * bytes_per_pixel + (tile_px * scale) ** 2 * 3 * OUTPUT_BYTES_PER_VALUE
    return int(math.ceil(batch * per_tile * safety))


def tiled_frame_bytes(height: int, width: int, *, scale: int, channels: int = 3) -> int:
    """What a tiled run holds for the whole frame besides its tiles: the fp32 accumulator, blending
    weights (one map per tile position, about one more frame), the normalised result and its cast,
    and the input. Subtract it from the free bytes before planning tiles."""
    out_px = height * scale * width * scale
    per_out_px = channels * 4 + 4 + 4 + channels * 4 + channels * 2
    return out_px * per_out_px + height * width * channels * 4


def plan_tile_px(
    bytes_per_pixel: float,
    scale: int,
    free_bytes: int,
    candidates: Sequence[int] = DEFAULT_TILE_CANDIDATES_PX,
    overlap_px: int = 0,
    batch: int = 1,
    *,
    safety: float = DEFAULT_SAFETY,
) -> int:
    """The largest candidate tile whose batch fits in ``free_bytes``; FrameTooLargeError if none."""
    return plan_tiles(bytes_per_pixel, scale, free_bytes, candidates, overlap_px, batch, safety=safety)[
        0
    ].tile_px


def plan_tiles(
    bytes_per_pixel: float,
    scale: int,
    free_bytes: int,
    candidates: Sequence[int] = DEFAULT_TILE_CANDIDATES_PX,
    overlap_px: int = 0,
    batch: int = 1,
    *,
    safety: float = DEFAULT_SAFETY,
) -> list[TilePlan]:
    """The tile plan and its smaller fallbacks, every one of which fits ``free_bytes``.

    Tiles are ``tile_px`` square including ``overlap_px`` of shared context (``run_tiled``'s
    convention), so candidates not larger than twice the overlap are skipped.
    Order: the largest fitting tile at the largest fitting batch (≤ ``batch``), then the same tile
    at half the batch down to 1, then each smaller candidate at batch 1.
    """

    def cost(tile_px: int, n: int) -> int:
        return tile_bytes(tile_px, bytes_per_pixel=bytes_per_pixel, scale=scale, batch=n, safety=safety)

    ordered = sorted({c for c in candidates if c > 2 * overlap_px}, reverse=True)
    if not ordered:
        raise ValueError(f"no tile candidate is larger than twice the overlap ({overlap_px} px)")
    plans: list[TilePlan] = []
    for tile_px in ordered:
        fitting = [n for n in _halvings(batch) if cost(tile_px, n) <= free_bytes]
        if not fitting:
            continue
        if not plans:
            plans.extend(TilePlan(tile_px, overlap_px, n, cost(tile_px, n)) for n in fitting)
        else:
            plans.append(TilePlan(tile_px, overlap_px, 1, cost(tile_px, 1)))
    if not plans:
        smallest = ordered[-1]
        raise FrameTooLargeError(
            f"one frame at the smallest tile ({smallest} px, overlap {overlap_px} px, x{scale}) needs "
            f"~{format_bytes(cost(smallest, 1))} but only {format_bytes(free_bytes)} of the GPU budget is "
            "free: raise FACEFARM_GPU_BUDGET, run fewer clients per GPU or lower --upscale",
            bytes_needed=cost(smallest, 1),
            free_bytes=free_bytes,
            tile_px=smallest,
        )
    return plans


def _halvings(batch: int) -> list[int]:
    out = []
    n = max(1, batch)
    while n >= 1:
        out.append(n)
        n //= 2
    return out


def weights_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Device bytes a set of tensors takes, rounded per block as the caching allocator does."""
    total = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        total += -(-nbytes // _BLOCK_BYTES) * _BLOCK_BYTES
    return total


def calibrate_bytes_per_pixel(
    run_fn: Callable[[int], Any],
    probe_px: int,
    *,
    device: torch.device,
    declared: float | None = None,
) -> float:
    """Bytes of peak device memory per input pixel of one ``probe_px`` square tile.

    On CUDA: the rise of ``max_memory_allocated`` over what was allocated before one
    ``run_fn(probe_px)`` (which must run one probe tile at batch 1 and may return its output).
    On the CPU there is no allocator to read, so the model descriptor's ``declared`` value is used.
    Call it once per process and model (see ``BytesPerPixelCache``).
    """
    if device.type != "cuda":
        if declared is None:
            raise ValueError("on the CPU the descriptor's declared bytes per pixel are required")
        return float(declared)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        result = run_fn(probe_px)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    measured = max(0, peak - base) / float(probe_px * probe_px)
    if measured == 0.0 and declared is not None:
        return float(declared)  # nothing was allocated: the run did not use this device
    return measured


class BytesPerPixelCache:
    """Calibrations made once per process, keyed by model name and dtype."""

    def __init__(self) -> None:
        self._values: dict[tuple[str, str], float] = {}

    def get(
        self,
        key: tuple[str, str],
        run_fn: Callable[[int], Any],
        probe_px: int,
        *,
        device: torch.device,
        declared: float | None = None,
    ) -> float:
        if key not in self._values:
            self._values[key] = calibrate_bytes_per_pixel(run_fn, probe_px, device=device, declared=declared)
        return self._values[key]

    def known(self) -> dict[tuple[str, str], float]:
        return dict(self._values)
