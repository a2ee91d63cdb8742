"""Tiled inference: a pure tile plan and an executor that blends overlapping tiles.

Large frames do not fit a network at once; each tile is run with ``overlap_px`` of context on
its interior edges, and overlapping outputs are blended with linear (feathered) weights so tile
borders, where the network saw no context, fade out and leave no seam. All tiles have the same
size, so they can be batched. OOM is not handled here: the GPU runtime shrinks ``tile_px`` or
``batch`` and calls again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Tile:
    """One input region; ``feather_*`` is True on edges that overlap a neighbour."""

    y: int
    x: int
    height: int
    width: int
    feather_top: bool
    feather_bottom: bool
    feather_left: bool
    feather_right: bool


def _starts(length: int, tile_px: int, overlap_px: int) -> list[int]:
    if length <= tile_px:
        return [0]
    step = tile_px - overlap_px
    starts = list(range(0, length - tile_px, step))
    starts.append(length - tile_px)
    return starts


def plan_tiles(height: int, width: int, *, tile_px: int, overlap_px: int) -> list[Tile]:
    """Cover a ``height x width`` image with equal tiles overlapping by at least ``overlap_px``."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if tile_px < 1 or overlap_px < 0 or 2 * overlap_px >= tile_px:
        raise ValueError(f"need tile_px >= 1 and 0 <= 2*overlap_px < tile_px, got {tile_px=} {overlap_px=}")
    ys = _starts(height, tile_px, overlap_px)
    xs = _starts(width, tile_px, overlap_px)
    tile_h, tile_w = min(tile_px, height), min(tile_px, width)
    return [
        Tile(
            y=y,
            x=x,
            height=tile_h,
            width=tile_w,
            feather_top=iy > 0,
            feather_bottom=iy < len(ys) - 1,
            feather_left=ix > 0,
            feather_right=ix < len(xs) - 1,
        )
        for iy, y in enumerate(ys)
        for ix, x in enumerate(xs)
    ]


def _ramp(length: int, ramp: int, rise: bool, fall: bool, device: torch.device) -> Tensor:
    weight = torch.ones(length, device=device)
    if ramp > 0:
        edge = (torch.arange(ramp, device=device, dtype=torch.float32) + 0.5) / ramp
        if rise:
            weight[:ramp] = torch.minimum(weight[:ramp], edge)
        if fall:
            weight[length - ramp :] = torch.minimum(weight[length - ramp :], edge.flip(0))
    return weight


def tile_weight(tile: Tile, *, scale: int, overlap_px: int, device: torch.device) -> Tensor:
    """The (H*scale, W*scale) blending weight of one tile: 1 inside, linear ramps on overlaps."""
    ramp = overlap_px * scale
    wy = _ramp(tile.height * scale, ramp, tile.feather_top, tile.feather_bottom, device)
    wx = _ramp(tile.width * scale, ramp, tile.feather_left, tile.feather_right, device)
    return wy[:, None] * wx[None, :]


def run_tiled(
    fn: Callable[[Tensor], Tensor],
    image: Tensor,
    *,
    scale: int,
    tile_px: int,
    overlap_px: int,
    batch: int,
) -> Tensor:
    """Run ``fn`` (NCHW -> NC'(H*scale)(W*scale)) over tiles of ``image`` and blend them."""
    n, _, height, width = image.shape
    if n == 0:
        raise ValueError("run_tiled needs at least one image")
    tiles = plan_tiles(height, width, tile_px=tile_px, overlap_px=overlap_px)
    if len(tiles) == 1:
        return torch.cat([fn(image[i : i + batch]) for i in range(0, n, batch)])
    jobs = [(i, t) for i in range(n) for t in tiles]
    out: Tensor | None = None
    weight_sum = torch.zeros(height * scale, width * scale, device=image.device)
    weights = {t: tile_weight(t, scale=scale, overlap_px=overlap_px, device=image.device) for t in tiles}
    for start in range(0, len(jobs), batch):
        group = jobs[start : start + batch]
        crops = torch.stack([image[i, :, t.y : t.y + t.height, t.x : t.x + t.width] for i, t in group])
        result = fn(crops)
        if out is None:
            out = torch.zeros(n, result.shape[1], height * scale, width * scale, device=image.device)
        for (i, t), tile_out in zip(group, result, strict=True):
            w = weights[t]
            ys, xs = slice(t.y * scale, (t.y + t.height) * scale), slice(t.x * scale, (t.x + t.width) * scale)
            out[i, :, ys, xs] += tile_out.float() * w
            if i == 0:
                weight_sum[ys, xs] += w
    if out is None:
        raise ValueError("run_tiled produced no tiles")
    return (out / weight_sum).to(image.dtype)
