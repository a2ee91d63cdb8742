"""Padded-crop tiling: cores partition the frame, windows are equal and hold their core plus the
context, and assembled cores match a whole-frame run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from worker.models.super_res import SrModel, load_sr_model, upscale_frames
from worker.models.tiling import SR_PAD_PX, plan_tiles, run_tiled


@given(
    height=st.integers(1, 300),
    width=st.integers(1, 300),
    core_h=st.integers(1, 160),
    core_w=st.integers(1, 160),
    pad_px=st.integers(0, 40),
)
@settings(max_examples=200, deadline=None)
def test_cores_partition_the_frame_and_windows_are_equal_and_padded(
    height: int, width: int, core_h: int, core_w: int, pad_px: int
) -> None:
    tiles = plan_tiles(height, width, core_h=core_h, core_w=core_w, pad_px=pad_px)
    owned = np.zeros((height, width), dtype=int)
    for t in tiles:
        owned[t.core_y.start : t.core_y.stop, t.core_x.start : t.core_x.stop] += 1
        assert t.core_y.size <= core_h and t.core_x.size <= core_w
        # the window lies inside the image and holds the core plus pad_px where the image allows
        assert 0 <= t.window_y.start and t.window_y.stop <= height
        assert 0 <= t.window_x.start and t.window_x.stop <= width
        assert t.window_y.start <= max(0, t.core_y.start - pad_px)
        assert t.window_y.stop >= min(height, t.core_y.stop + pad_px)
        assert t.window_x.start <= max(0, t.core_x.start - pad_px)
        assert t.window_x.stop >= min(width, t.core_x.stop + pad_px)
    assert (owned == 1).all()
    assert len({(t.window_y.size, t.window_x.size) for t in tiles}) == 1
    biggest_core_h = max(t.core_y.size for t in tiles)
    assert tiles[0].window_y.size == min(biggest_core_h + 2 * pad_px, height)
    # cores as equal as possible
    assert max(t.core_y.size for t in tiles) - min(t.core_y.size for t in tiles) <= 1
    assert max(t.core_x.size for t in tiles) - min(t.core_x.size for t in tiles) <= 1


def pointwise(scale: int = 2) -> nn.Module:
    """A 1x1 conv then nearest x2: every output pixel depends on one input pixel only. Weights are
    multiples of 1/4 and inputs of 1/256, so every sum is exact whatever the batch and kernel."""
    generator = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(3, 3, 1)
    assert conv.bias is not None
    with torch.no_grad():
        conv.weight.copy_(torch.randint(-4, 5, conv.weight.shape, generator=generator) / 4)
        conv.bias.copy_(torch.randint(-4, 5, conv.bias.shape, generator=generator) / 8)
    return nn.Sequential(conv, nn.Upsample(scale_factor=scale, mode="nearest")).eval()


def dyadic_image(*shape: int) -> torch.Tensor:
    return torch.randint(0, 256, shape) / 256


@given(
    height=st.integers(1, 70),
    width=st.integers(1, 70),
    core_h=st.integers(1, 80),
    core_w=st.integers(1, 80),
    pad_px=st.integers(0, 12),
    batch=st.integers(1, 7),
)
@settings(max_examples=60, deadline=None)
def test_tiled_run_equals_the_untiled_run_for_a_pointwise_network(
    height: int, width: int, core_h: int, core_w: int, pad_px: int, batch: int
) -> None:
    net = pointwise()
    image = dyadic_image(2, 3, height, width)
    with torch.inference_mode():
        whole = net(image)
        tiled = run_tiled(net, image, scale=2, core_h=core_h, core_w=core_w, pad_px=pad_px, batch=batch)
    assert tiled.dtype == whole.dtype and torch.equal(tiled, whole)


def test_windows_run_in_equal_batches_of_one_shape() -> None:
    shapes: list[tuple[int, ...]] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(x.shape))
        return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)

    run_tiled(fn, torch.rand(1, 3, 96, 96), scale=2, core_h=32, core_w=32, pad_px=8, batch=4)
    assert shapes == [(3, 3, 48, 48)] * 3  # 9 windows, at most 4 a call: 3 + 3 + 3


def test_output_keeps_the_network_dtype_without_an_fp32_accumulator() -> None:
    net = pointwise().to(torch.float64)
    image = dyadic_image(1, 3, 40, 50).double()
    with torch.inference_mode():
        out = run_tiled(net, image, scale=2, core_h=16, core_w=16, pad_px=4, batch=2)
    assert out.dtype == torch.float64


class ElementwiseX4(nn.Module):
    """Channel mixing by elementwise ops only (rounded identically whatever the batch or window),
    then nearest x4: values land anywhere between the uint8 steps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = x[:, [2, 0, 1]] * 0.61 + x * 0.33 + 0.013
        return nn.functional.interpolate(mixed, scale_factor=4, mode="nearest")


def test_upscale_frames_tiled_equals_whole_in_uint8_and_averages_down(astronaut_rgb: np.ndarray) -> None:
    model = SrModel(
        name="elementwise", net=ElementwiseX4(), scale=4, device=torch.device("cpu"), dtype=torch.float32
    )
    frames = np.stack([astronaut_rgb[:70, :90], astronaut_rgb[100:170, 200:290]])  # 280 output rows
    whole = upscale_frames(model, frames, upscale=4, batch=2)
    tiled = upscale_frames(model, frames, upscale=4, core_px=(40, 64), pad_px=SR_PAD_PX, batch=3)
    assert whole.shape == (2, 280, 360, 3) and np.array_equal(whole, tiled)
    with torch.inference_mode():  # the x2 path: the x4 output averaged over 2x2, rounded once
        y = model.run(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255)
        want = torch.nn.functional.avg_pool2d(y, 2).mul(255).round().clamp(0, 255).to(torch.uint8)
    assert np.array_equal(upscale_frames(model, frames, upscale=2), want.permute(0, 2, 3, 1).numpy())


def test_tiled_sr_matches_whole_frame_without_seams(model_store: Path, astronaut_rgb: np.ndarray) -> None:
    model = load_sr_model("realesr-animevideov3", model_store)
    x = torch.from_numpy(astronaut_rgb[90:170, 180:260].copy()).permute(2, 0, 1)[None].float() / 255
    assert len(plan_tiles(80, 80, core_h=40, core_w=40, pad_px=SR_PAD_PX)) == 4
    with torch.inference_mode():
        whole = model.run(x)
        tiled = run_tiled(model.run, x, scale=4, core_h=40, core_w=40, pad_px=SR_PAD_PX, batch=4)
    mse = torch.mean((whole - tiled) ** 2).item()
    assert 10 * np.log10(1 / mse) >= 45.0


@pytest.mark.parametrize("bad", [{"core_h": 0}, {"pad_px": -1}])
def test_plan_rejects_impossible_shapes(bad: dict[str, int]) -> None:
    args = {"core_h": 32, "core_w": 32, "pad_px": 8} | bad
    with pytest.raises(ValueError):
        plan_tiles(100, 100, **args)
