"""The SR tile planner: padded-crop tiles that compute the fewest pixels and always fit the budget."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import FrameTooLargeError
from worker.models.super_res import UINT8_BAND_OUT_ROWS
from worker.models.tiling import MIN_CORE_PX, SR_PAD_PX, split_axis
from worker.runtime.budget import (
    CONVERT_BAND_OUT_ROWS,
    DEFAULT_MIN_CORE_PX,
    TilePlan,
    axis_tiles,
    plan_sr_tiles,
    tile_plan,
    tiled_frame_bytes,
)
from worker.runtime.sizes import GIB, MIB

X4PLUS_FP16_BPP = 8_200.0  # the registry's declared value
X4PLUS_FP16_WEIGHTS = 34 * MIB


def plan_for(height: int, width: int, core_h: int, core_w: int, *, batch: int = 1, **kw: object) -> TilePlan:
    args: dict[str, object] = {
        "pad_px": SR_PAD_PX,
        "bytes_per_pixel": X4PLUS_FP16_BPP,
        "scale": 4,
        "value_bytes": 2,
    }
    args.update(kw)
    return tile_plan(height, width, core_h=core_h, core_w=core_w, batch=batch, **args)  # type: ignore[arg-type]


def allowed_cores(length: int, min_core_px: int) -> list[int]:
    """Brute force: every core size whose cores along ``length`` are all >= min_core_px, or one core."""
    return [c for c in range(1, length + 1) if c >= length or length // -(-length // c) >= min_core_px]


@given(length=st.integers(1, 3000), core_px=st.integers(1, 3000), pad_px=st.integers(0, 40))
def test_the_planner_counts_windows_exactly_as_the_executor_cuts_them(
    length: int, core_px: int, pad_px: int
) -> None:
    pairs = split_axis(length, core_px, pad_px)
    assert axis_tiles(length, core_px, pad_px) == (len(pairs), pairs[0][1].size)


@given(
    height=st.integers(1, 120),
    width=st.integers(1, 120),
    bytes_per_pixel=st.floats(10, 20_000),
    scale=st.sampled_from([1, 2, 4]),
    value_bytes=st.sampled_from([2, 4]),
    free_bytes=st.integers(1, 2 * GIB),
    pad_px=st.integers(0, 24),
    max_batch=st.integers(1, 16),
)
@settings(max_examples=60, deadline=None)
def test_every_plan_fits_and_the_first_computes_the_fewest_pixels(
    height: int,
    width: int,
    bytes_per_pixel: float,
    scale: int,
    value_bytes: int,
    free_bytes: int,
    pad_px: int,
    max_batch: int,
) -> None:
    shape: dict[str, Any] = {
        "pad_px": pad_px,
        "bytes_per_pixel": bytes_per_pixel,
        "scale": scale,
        "value_bytes": value_bytes,
    }
    fitting = [
        p
        for h in allowed_cores(height, DEFAULT_MIN_CORE_PX)
        for w in allowed_cores(width, DEFAULT_MIN_CORE_PX)
        if (p := plan_for(height, width, h, w, **shape)).bytes_needed <= free_bytes
    ]
    try:
        plans = plan_sr_tiles(height, width, free_bytes=free_bytes, max_batch=max_batch, **shape)  # type: ignore[arg-type]
    except FrameTooLargeError:
        assert not fitting
        return
    assert fitting
    assert plans[0].computed_px == min(p.computed_px for p in fitting)
    for plan in plans:
        assert plan.bytes_needed <= free_bytes
        again = plan_for(height, width, plan.core_h, plan.core_w, batch=plan.batch, **shape)
        assert plan == again
        assert plan.core_h >= min(DEFAULT_MIN_CORE_PX, height) and plan.core_w >= min(
            DEFAULT_MIN_CORE_PX, width
        )
        assert plan.batch <= max(1, max_batch) and (plan.tiles == 1 or plan.batch <= plan.tiles)
    # fallbacks only get smaller, and the last is the smallest window allowed, at batch 1
    needed = [p.bytes_needed for p in plans]
    assert needed == sorted(needed, reverse=True) and len(set(needed)) == len(needed)
    smallest_area = min(p.window_h * p.window_w for p in fitting)
    assert plans[-1].batch == 1 and plans[-1].window_h * plans[-1].window_w == smallest_area


def test_960x540_under_a_2gib_budget_runs_three_full_height_strips() -> None:
    plans = plan_sr_tiles(
        540,
        960,
        bytes_per_pixel=X4PLUS_FP16_BPP,
        scale=4,
        value_bytes=2,
        free_bytes=2 * GIB - X4PLUS_FP16_WEIGHTS,
        pad_px=SR_PAD_PX,
        max_batch=8,
    )
    best = plans[0]
    assert (best.tiles, best.window_h, best.core_w) == (3, 540, 320)
    assert best.window_h * best.window_w <= 200_000
    # 3 strips of 320 + 2 x 16 px: 10% recomputed (384-px squares with 32 px overlap: ~44%)
    assert best.computed_px / (540 * 960) <= 1.10 + 1e-9
    assert str(best).startswith("cores 540x320 px (3 windows of 540x352, pad 16 px), batch 1")
    assert plans[-1].core_h >= DEFAULT_MIN_CORE_PX and plans[-1].core_w == DEFAULT_MIN_CORE_PX


def test_a_portrait_frame_gets_full_width_strips() -> None:
    best = plan_sr_tiles(
        960,
        540,
        bytes_per_pixel=X4PLUS_FP16_BPP,
        scale=4,
        value_bytes=2,
        free_bytes=2 * GIB - X4PLUS_FP16_WEIGHTS,
        pad_px=SR_PAD_PX,
    )[0]
    assert (best.tiles, best.window_w, best.core_h) == (3, 540, 320)


def test_a_frame_that_fits_runs_whole_and_batches_frames() -> None:
    plans = plan_sr_tiles(
        96, 96, bytes_per_pixel=160, scale=4, value_bytes=2, free_bytes=GIB, pad_px=SR_PAD_PX, max_batch=8
    )
    assert [(p.tiles, p.batch) for p in plans[:4]] == [(1, 8), (1, 4), (1, 2), (1, 1)]
    assert plans[-1].core_h == plans[-1].core_w == 32 and plans[-1].tiles == 9


def test_a_frame_too_large_names_the_numbers_and_the_fix() -> None:
    with pytest.raises(FrameTooLargeError) as info:
        plan_sr_tiles(
            540, 960, bytes_per_pixel=X4PLUS_FP16_BPP, scale=4, value_bytes=2, free_bytes=64 * MIB, pad_px=16
        )
    message = str(info.value)
    assert "34x32 px cores" in message and "64.0 MiB" in message and "FACEFARM_GPU_BUDGET" in message


def test_frame_buffers_are_the_output_in_the_model_dtype_not_an_fp32_accumulator() -> None:
    small = tiled_frame_bytes(540, 960, scale=4, value_bytes=2)
    out_values = 3840 * 2160 * 3
    # fp16 output + its uint8 copy + an fp32 band: under 5 bytes per output value (the fp32
    # accumulator, weights and normalised copy of the blending executor took over 11)
    assert out_values * 3 < small < out_values * 5
    assert 3.5 * small < tiled_frame_bytes(1080, 1920, scale=4, value_bytes=2) <= 4 * small


def test_the_planner_and_the_executor_agree_on_their_shared_constants() -> None:
    assert CONVERT_BAND_OUT_ROWS == UINT8_BAND_OUT_ROWS
    assert DEFAULT_MIN_CORE_PX == MIN_CORE_PX
