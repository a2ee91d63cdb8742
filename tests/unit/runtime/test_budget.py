"""The budget and the planners: sizes, budget resolution, batch and tile plans that always fit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from shared.errors import ConfigError, FrameTooLargeError
from shared.settings import Settings
from worker.runtime.budget import (
    BytesPerPixelCache,
    MemoryBudget,
    calibrate_bytes_per_pixel,
    plan_batch,
    plan_batches,
    plan_tile_px,
    plan_tiles,
    resolve_budget,
    tile_bytes,
    tiled_frame_bytes,
)
from worker.runtime.sizes import GIB, MIB, parse_bytes, parse_mps_limit

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)  # only used as a label: nothing here touches CUDA


def test_sizes_parse_in_the_units_people_write() -> None:
    assert parse_bytes("2GiB") == 2 * GIB
    assert parse_bytes("2147483648") == 2 * GIB
    assert parse_bytes("512MiB") == 512 * MIB
    assert parse_bytes("1.5GB") == 1_500_000_000
    assert parse_bytes("4G") == 4 * GIB
    with pytest.raises(ConfigError, match="not a size"):
        parse_bytes("lots")


def test_mps_limit_is_read_per_device_ordinal() -> None:
    assert parse_mps_limit("0=4G") == 4 * GIB
    assert parse_mps_limit("0=1G,1=512MB", ordinal=1) == 512 * MIB
    assert parse_mps_limit("2G") == 2 * GIB  # no ordinal: every device
    assert parse_mps_limit("1=2G") is None
    with pytest.raises(ConfigError, match="CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"):
        parse_mps_limit("0=four")


def test_auto_budget_takes_the_mps_limit_passed_in() -> None:
    settings = Settings(gpu_budget="auto")
    assert resolve_budget(settings, CPU, mps_limit="0=4G", free_bytes=100 * GIB) == 4 * GIB
    # on a GPU the limit is also capped by what is really free (the context takes some)
    assert resolve_budget(settings, CUDA, mps_limit="0=4G", free_bytes=4 * GIB) == int(0.9 * 4 * GIB)
    assert resolve_budget(Settings(mps_mem_limit="0=3G"), CUDA, free_bytes=80 * GIB) == 3 * GIB


def test_auto_budget_without_mps_is_a_fraction_of_free_memory() -> None:
    settings = Settings(gpu_budget="auto", budget_free_fraction=0.5)
    assert resolve_budget(settings, CUDA, free_bytes=10 * GIB) == 5 * GIB


def test_explicit_budget_is_used_but_never_above_the_mps_limit() -> None:
    assert resolve_budget(Settings(gpu_budget="2GiB"), CUDA, free_bytes=80 * GIB) == 2 * GIB
    assert resolve_budget(Settings(gpu_budget="8GiB"), CUDA, mps_limit="0=4G", free_bytes=80 * GIB) == 4 * GIB


def test_budget_accounts_owners_and_refuses_overdraft() -> None:
    budget = MemoryBudget(100)
    budget.reserve("a", 60)
    assert budget.free_bytes == 40
    with pytest.raises(ValueError, match="only 40"):
        budget.reserve("b", 41)
    assert budget.release("a") == 60
    assert budget.free_bytes == 100
    with pytest.raises(ConfigError):
        MemoryBudget(0)


@given(
    bytes_per_item=st.integers(1, 10**9),
    free_bytes=st.integers(0, 10**11),
    max_batch=st.integers(1, 256),
)
def test_batch_plan_never_exceeds_the_free_bytes(
    bytes_per_item: int, free_bytes: int, max_batch: int
) -> None:
    batch = plan_batch(bytes_per_item, free_bytes, max_batch)
    assert 0 <= batch <= max_batch
    assert batch * bytes_per_item <= free_bytes
    assert batch == max_batch or (batch + 1) * bytes_per_item > free_bytes


def test_batch_fallbacks_halve_down_to_one_and_refuse_when_one_does_not_fit() -> None:
    assert [p.batch for p in plan_batches(10, 75, 16)] == [7, 3, 1]
    with pytest.raises(FrameTooLargeError, match="raise FACEFARM_GPU_BUDGET"):
        plan_batches(100, 99, 4)


@given(
    bytes_per_pixel=st.floats(10, 20_000),
    scale=st.sampled_from([1, 2, 4]),
    free_bytes=st.integers(1, 64 * GIB),
    overlap_px=st.integers(0, 15),
    batch=st.integers(1, 16),
)
def test_every_tile_plan_fits_the_budget(
    bytes_per_pixel: float, scale: int, free_bytes: int, overlap_px: int, batch: int
) -> None:
    try:
        plans = plan_tiles(bytes_per_pixel, scale, free_bytes, overlap_px=overlap_px, batch=batch)
    except FrameTooLargeError:
        assert tile_bytes(32, bytes_per_pixel=bytes_per_pixel, scale=scale, batch=1) > free_bytes
        return
    for plan in plans:
        assert plan.bytes_needed <= free_bytes
        assert plan.bytes_needed == tile_bytes(
            plan.tile_px, bytes_per_pixel=bytes_per_pixel, scale=scale, batch=plan.batch
        )
    # the first plan is the biggest that fits; the fallbacks only get smaller
    sizes = [(p.tile_px, p.batch) for p in plans]
    assert sizes == sorted(sizes, reverse=True)
    bigger = [c for c in (512, 384, 256, 192, 128, 96, 64, 32) if c > plans[0].tile_px]
    for tile in bigger:
        assert tile_bytes(tile, bytes_per_pixel=bytes_per_pixel, scale=scale, batch=1) > free_bytes


def test_tile_plan_picks_the_largest_candidate_that_fits() -> None:
    free = tile_bytes(256, bytes_per_pixel=8200, scale=4, batch=1)
    assert plan_tile_px(8200, 4, free) == 256
    assert plan_tile_px(8200, 4, free - 1) == 192
    plans = plan_tiles(8200, 4, 2 * free, batch=4, overlap_px=16)
    assert [(p.tile_px, p.batch) for p in plans] == [(256, 2), (256, 1), (192, 1), (128, 1), (96, 1), (64, 1)]


def test_a_frame_too_large_names_the_numbers() -> None:
    with pytest.raises(FrameTooLargeError) as info:
        plan_tiles(8200, 4, 1 * MIB, overlap_px=8)
    message = str(info.value)
    assert "32 px" in message and "1.0 MiB" in message and "FACEFARM_GPU_BUDGET" in message


def test_whole_frame_overheads_grow_with_the_output() -> None:
    small = tiled_frame_bytes(540, 960, scale=4)
    assert small > 3840 * 2160 * 3 * 4  # at least the fp32 accumulator of a 4K output
    assert tiled_frame_bytes(1080, 1920, scale=4) == pytest.approx(4 * small, rel=0.01)


def test_calibration_on_cpu_uses_the_declared_value_once_per_model() -> None:
    calls: list[int] = []

    def run(px: int) -> None:
        calls.append(px)

    assert calibrate_bytes_per_pixel(run, 64, device=CPU, declared=8200) == 8200.0
    with pytest.raises(ValueError, match="declared"):
        calibrate_bytes_per_pixel(run, 64, device=CPU)
    cache = BytesPerPixelCache()
    assert cache.get(("x4", "fp16"), run, 64, device=CPU, declared=1000) == 1000.0
    assert cache.get(("x4", "fp16"), run, 64, device=CPU, declared=5) == 1000.0
    assert cache.known() == {("x4", "fp16"): 1000.0}
