"""The runtime wired to the real pipeline pieces: real x4plus weights, the model cache, the tile
planner, the models helper's tiled executor and the OOM safety net, on a 96x96 face crop (CPU).

Measured with these crops: 64-px tiles (24 px overlap) reach ~50 dB against the untiled run, 32-px
tiles only ~37-38 dB whatever the overlap (x4plus needs more context than a 32-px tile holds).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from worker.models.registry import get_descriptor
from worker.models.super_res import load_sr_model
from worker.models.tiling import run_tiled
from worker.runtime.budget import (
    MemoryBudget,
    TilePlan,
    activation_bytes,
    calibrate_bytes_per_pixel,
    plan_tiles,
    tile_bytes,
    tiled_frame_bytes,
    weights_bytes,
)
from worker.runtime.model_cache import ModelCache
from worker.runtime.oom import OomCounter, OomInjector, run_with_oom_retry

CPU = torch.device("cpu")
NAME = "realesrgan-x4plus"
CROP = 96


@pytest.fixture(scope="module")
def x4plus(model_store: Path) -> nn.Module:
    return load_sr_model(NAME, model_store, device=CPU, dtype=torch.float32).net


@pytest.fixture(scope="module")
def crop(astronaut_rgb: np.ndarray) -> torch.Tensor:
    image = astronaut_rgb[90 : 90 + CROP, 180 : 180 + CROP].copy()
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255


@pytest.fixture(scope="module")
def untiled(x4plus: nn.Module, crop: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return x4plus(crop).clamp(0, 1)


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a.float() - b.float()) ** 2).item()
    return 10 * float(np.log10(1.0 / mse))


def cpu_bytes_per_pixel() -> float:
    """The descriptor declares fp16 bytes; the CPU runs fp32, twice as many."""
    declared_fp16 = get_descriptor(NAME).bytes_per_pixel
    return calibrate_bytes_per_pixel(lambda px: None, 64, device=CPU, declared=2 * declared_fp16)


def run_under_budget(
    x4plus: nn.Module, crop: torch.Tensor, *, tile_px: int, overlap_px: int
) -> tuple[torch.Tensor, list[TilePlan], list[TilePlan], OomCounter, OomInjector]:
    """Budget = the weights + the frame's buffers + exactly two ``tile_px`` tiles; OOM on the 1st tile."""
    bpp = cpu_bytes_per_pixel()
    weights = weights_bytes([*x4plus.parameters(), *x4plus.buffers()])
    frame = tiled_frame_bytes(CROP, CROP, scale=4)
    budget = MemoryBudget(weights + frame + tile_bytes(tile_px, bytes_per_pixel=bpp, scale=4, batch=2))
    cache = ModelCache(budget, CPU, lambda name: x4plus)
    injector = OomInjector(fail_on_calls=1)
    counter = OomCounter()
    tried: list[TilePlan] = []
    with cache.acquire(NAME) as net, torch.inference_mode():
        assert budget.reserved_bytes == weights
        free = activation_bytes(budget, CPU) - frame
        plans = plan_tiles(bpp, 4, free, overlap_px=overlap_px, batch=4)
        tile_fn = injector.wrap(lambda t: net(t).clamp(0, 1))

        def step(plan: TilePlan) -> torch.Tensor:
            tried.append(plan)
            return run_tiled(
                tile_fn, crop, scale=4, tile_px=plan.tile_px, overlap_px=plan.overlap_px, batch=plan.batch
            )

        out = run_with_oom_retry(step, plans, counter=counter, budget_bytes=budget.budget_bytes)
    for plan in plans:
        assert plan.bytes_needed <= free  # nothing planned beyond the budget
    return out, plans, tried, counter, injector


def test_a_budget_forcing_32px_tiles_recovers_from_an_oom_at_the_first_tile(
    x4plus: nn.Module, crop: torch.Tensor, untiled: torch.Tensor
) -> None:
    out, plans, tried, counter, injector = run_under_budget(x4plus, crop, tile_px=32, overlap_px=8)
    assert [(p.tile_px, p.batch) for p in plans] == [(32, 2), (32, 1)]
    assert [(p.tile_px, p.batch) for p in tried] == [(32, 2), (32, 1)]
    assert counter.recoveries == 1 and injector.raised == 1
    assert out.shape == untiled.shape
    assert psnr_db(out, untiled) >= 35.0  # the limit of 32-px tiles for x4plus (see the module doc)


def test_a_budget_forcing_64px_tiles_recovers_and_matches_the_untiled_run_at_45_db(
    x4plus: nn.Module, crop: torch.Tensor, untiled: torch.Tensor
) -> None:
    out, plans, tried, counter, _ = run_under_budget(x4plus, crop, tile_px=64, overlap_px=24)
    # 32-px tiles cannot hold 2 x 24 px of overlap, so they are no fallback here
    assert [(p.tile_px, p.batch) for p in plans] == [(64, 2), (64, 1)]
    assert [(p.tile_px, p.batch) for p in tried] == [(64, 2), (64, 1)]
    assert counter.recoveries == 1
    assert psnr_db(out, untiled) >= 45.0
