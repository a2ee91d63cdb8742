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

DEFAULT_SAFETY = 1.25  # cuDNN workspaces and allocator rounding vary with the window size
DEFAULT_MIN_CORE_PX = 32  # smaller cores recompute more context than they produce
CONVERT_BAND_OUT_ROWS = 256  # super_res converts its output to uint8 in bands of this many rows
_BLOCK_BYTES = 512  # the caching allocator rounds every block up to this


PAGING_BATCH_FRAMES = 16


def stage_batch_frames(configured: int, weights_bytes: int, budget_bytes: int) -> int:
    """Frames each stage runs while its weights are resident (the decode batch).

    When the job's weights do not fit the budget together, every stage pages its weights in once
    per batch; a batch of at least ``PAGING_BATCH_FRAMES`` spreads that copy over enough compute
    (stand-ins of ~557 MB under 512 MiB on an H100: 0.61x of all-resident at 8 frames, 0.83x at 16).
    Frames are host memory, so a larger batch costs RAM, not GPU memory.
    """
    return configured if weights_bytes <= budget_bytes else max(configured, PAGING_BATCH_FRAMES)


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
    """One way to run a super-resolution step on a frame: padded-crop tiles and windows per batch.

    Cores (``core_h x core_w`` at most) partition the frame; the network runs on windows
    (``window_h x window_w``, the core plus ``pad_px`` of context each side, clipped to the frame),
    ``batch`` at a time; ``tiles`` windows per frame. One tile is a whole frame, and then ``batch``
    counts frames.
    """

    core_h: int
    core_w: int
    pad_px: int
    batch: int
    tiles: int
    window_h: int
    window_w: int
    bytes_needed: int

    @property
    def computed_px(self) -> int:
        """Input pixels the network computes per frame, context included."""
        return self.tiles * self.window_h * self.window_w

    def __str__(self) -> str:
        shape = (
            "whole frame"
            if self.tiles == 1
            else f"cores {self.core_h}x{self.core_w} px ({self.tiles} windows of {self.window_h}x"
            f"{self.window_w}, pad {self.pad_px} px)"
        )
        return f"{shape}, batch {self.batch} (~{format_bytes(self.bytes_needed)})"


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


def axis_tiles(length: int, core_px: int, pad_px: int) -> tuple[int, int]:
    """(tiles, window) along one axis: ``ceil(length / core_px)`` equal cores, and windows of the
    largest core plus ``pad_px`` each side, clipped to ``length`` (``tiling.split_axis``'s rule)."""
    count = math.ceil(length / core_px)
    return count, min(math.ceil(length / count) + 2 * pad_px, length)


def window_bytes(
    window_h: int, window_w: int, *, bytes_per_pixel: float, scale: int, value_bytes: int, channels: int = 3
) -> float:
    """Peak bytes of one window: the network's activations (``bytes_per_pixel`` per input pixel, as
    the model descriptors declare it), the stacked input window and its output window."""
    area = window_h * window_w
    return area * (bytes_per_pixel + channels * value_bytes * (1 + scale * scale))


def tiled_frame_bytes(height: int, width: int, *, scale: int, value_bytes: int, channels: int = 3) -> int:
    """What a tiled run holds per frame besides its windows: the uint8 frame and its model-dtype copy,
    the output in the model's dtype, its uint8 copy, and the fp32 band the uint8 conversion uses."""
    in_values = height * width * channels
    out_values = in_values * scale * scale
    band_values = min(height * scale, CONVERT_BAND_OUT_ROWS) * width * scale * channels
    return in_values * (1 + value_bytes) + out_values * (value_bytes + 1) + band_values * 4 * 2


def tile_plan(
    height: int,
    width: int,
    *,
    core_h: int,
    core_w: int,
    pad_px: int,
    batch: int,
    bytes_per_pixel: float,
    scale: int,
    value_bytes: int,
    safety: float = DEFAULT_SAFETY,
) -> TilePlan:
    """The plan for one tile shape and batch, with its estimated peak: the frame's buffers (per
    frame in the batch when the tile is the whole frame) plus ``batch`` windows times ``safety``."""
    rows, window_h = axis_tiles(height, core_h, pad_px)
    cols, window_w = axis_tiles(width, core_w, pad_px)
    frames = batch if rows * cols == 1 else 1
    per_window = window_bytes(
        window_h, window_w, bytes_per_pixel=bytes_per_pixel, scale=scale, value_bytes=value_bytes
    )
    needed = frames * tiled_frame_bytes(height, width, scale=scale, value_bytes=value_bytes) + math.ceil(
        batch * per_window * safety
    )
    return TilePlan(
        core_h=math.ceil(height / rows),
        core_w=math.ceil(width / cols),
        pad_px=pad_px,
        batch=batch,
        tiles=rows * cols,
        window_h=window_h,
        window_w=window_w,
        bytes_needed=needed,
    )


def _core_sizes(length: int, min_core_px: int) -> list[int]:
    """Every distinct core size along an axis whose cores are all at least ``min_core_px`` (or one
    core spanning the axis), largest first."""
    sizes = {length}
    for count in range(2, length // max(1, min_core_px) + 1):
        sizes.add(math.ceil(length / count))
    return sorted(sizes, reverse=True)


def plan_sr_tiles(
    height: int,
    width: int,
    *,
    bytes_per_pixel: float,
    scale: int,
    value_bytes: int,
    free_bytes: int,
    pad_px: int,
    max_batch: int = 1,
    min_core_px: int = DEFAULT_MIN_CORE_PX,
    safety: float = DEFAULT_SAFETY,
) -> list[TilePlan]:
    """The SR plan for a ``height x width`` frame and its fallbacks, every one within ``free_bytes``.

    The first plan is the tile shape that computes the fewest input pixels (cores plus context) of
    those whose window fits at batch 1 (full-height or full-width strips where the short side fits),
    at the largest batch that fits (at most ``max_batch``; for tiles, at most the tiles per frame,
    split into equal groups). Then the same shape at halved batches down to 1, then ever smaller
    windows (each at most half the previous area, the fewest pixels again) at batch 1, ending with
    ``min_core_px`` cores. Raises FrameTooLargeError when even that does not fit.
    """

    def plan(core_h: int, core_w: int, batch: int) -> TilePlan:
        return tile_plan(
            height,
            width,
            core_h=core_h,
            core_w=core_w,
            pad_px=pad_px,
            batch=batch,
            bytes_per_pixel=bytes_per_pixel,
            scale=scale,
            value_bytes=value_bytes,
            safety=safety,
        )

    shapes = [
        plan(h, w, 1) for h in _core_sizes(height, min_core_px) for w in _core_sizes(width, min_core_px)
    ]
    smallest = min(shapes, key=lambda p: (p.window_h * p.window_w, p.computed_px))
    if smallest.bytes_needed > free_bytes:
        raise FrameTooLargeError(
            f"one frame at the smallest tile ({smallest.core_h}x{smallest.core_w} px cores, pad {pad_px} px, "
            f"x{scale}) needs ~{format_bytes(smallest.bytes_needed)} but only {format_bytes(free_bytes)} of "
            "the GPU budget is free: raise FACEFARM_GPU_BUDGET, run fewer clients per GPU or lower --upscale",
            bytes_needed=smallest.bytes_needed,
            free_bytes=free_bytes,
            tile_px=min(smallest.core_h, smallest.core_w),
        )

    def fewest_pixels(max_area: int) -> TilePlan | None:
        fitting = [p for p in shapes if p.bytes_needed <= free_bytes and p.window_h * p.window_w <= max_area]
        return min(fitting, key=lambda p: (p.computed_px, p.tiles), default=None)

    best = fewest_pixels(height * width)
    assert best is not None  # the smallest shape fits
    plans = [
        plan(best.core_h, best.core_w, n)
        for n in _batches(best.tiles, max_batch)
        if plan(best.core_h, best.core_w, n).bytes_needed <= free_bytes
    ]
    area = best.window_h * best.window_w
    while (smaller := fewest_pixels(area // 2)) is not None:
        plans.append(smaller)
        area = smaller.window_h * smaller.window_w
    if area > smallest.window_h * smallest.window_w:
        plans.append(smallest)
    return plans


def _batches(tiles: int, max_batch: int) -> list[int]:
    """Batch sizes to try, largest first, halving down to 1; for several tiles per frame each is
    evened out so the frame's windows split into equal groups (one batch shape per frame)."""
    cap = max(1, max_batch) if tiles == 1 else max(1, min(max_batch, tiles))
    out: list[int] = []
    n = cap
    while n >= 1:
        even = n if tiles == 1 else math.ceil(tiles / math.ceil(tiles / n))
        if even not in out:
            out.append(even)
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
