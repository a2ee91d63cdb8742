"""Tiling: the plan covers the image with equal tiles; blended tiles match a whole-frame run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.models.super_res import load_sr_model
from worker.models.tiling import plan_tiles, run_tiled


@given(
    height=st.integers(1, 300),
    width=st.integers(1, 300),
    tile_px=st.integers(8, 128),
    overlap_frac=st.floats(0, 0.49),
)
@settings(max_examples=200, deadline=None)
def test_plan_covers_every_pixel_with_equal_tiles(
    height: int, width: int, tile_px: int, overlap_frac: float
) -> None:
    overlap_px = int(tile_px * overlap_frac)
    tiles = plan_tiles(height, width, tile_px=tile_px, overlap_px=overlap_px)
    covered = np.zeros((height, width), dtype=int)
    for t in tiles:
        assert 0 <= t.y and t.y + t.height <= height and 0 <= t.x and t.x + t.width <= width
        covered[t.y : t.y + t.height, t.x : t.x + t.width] += 1
    assert covered.min() >= 1
    assert len({(t.height, t.width) for t in tiles}) == 1


def test_plan_rejects_overlap_too_large() -> None:
    with pytest.raises(ValueError):
        plan_tiles(100, 100, tile_px=32, overlap_px=16)


def test_run_tiled_is_exact_for_a_pointwise_function() -> None:
    image = torch.rand(2, 3, 50, 70)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(x * 2, scale_factor=2, mode="nearest")

    out = run_tiled(fn, image, scale=2, tile_px=24, overlap_px=6, batch=3)
    assert torch.allclose(out, fn(image), atol=1e-6)


def test_tiled_sr_matches_whole_frame_without_seams(model_store: Path, astronaut_rgb: np.ndarray) -> None:
    model = load_sr_model("realesr-animevideov3", model_store)
    image = torch.from_numpy(astronaut_rgb[90:170, 180:260].copy()).permute(2, 0, 1)[None]
    x = image.float() / 255
    tiles = plan_tiles(80, 80, tile_px=36, overlap_px=10)
    assert len(tiles) >= 4
    with torch.inference_mode():
        whole = model.run(x)
        tiled = run_tiled(model.run, x, scale=4, tile_px=36, overlap_px=10, batch=4)
    mse = torch.mean((whole - tiled) ** 2).item()
    assert 10 * np.log10(1 / mse) >= 45.0
