"""Torch twin of ``warp.py``: the piecewise-affine warp of one face, per pixel on the device.

Triangles are rasterised by testing every pixel of each triangle's bounding box (all triangles of a
face at once, as a flat list of (triangle, pixel) pairs); the nearest-to-camera cover wins through a
scatter-max of the draw rank, as the far-to-near cv2 fill does. Holes take the triangle of their
nearest covered pixel by jump flooding; one ``grid_sample`` then samples the source. Host-side work
is per triangle only (468 points, ~900 triangles); nothing per pixel touches the CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from worker.models.mesh.blend_torch import round_u8, upload

# Pairs per scatter pass: bounds the temporaries (a table row per pair) of a face with huge triangles.
_MAX_PAIRS = 1 << 20
_NONE = 1.0e7  # "no seed yet" coordinate of the jump flood
_SHIFT_BITS = 4  # cv2 sub-pixel bits of the rasteriser's vertices (1/16 px), as in ``warp.py``
_XY_SHIFT = 16  # cv2's internal fixed point (drawing.cpp XY_SHIFT)
_HALF = 1 << (_XY_SHIFT - 1)
# Columns of the per-triangle table: the scanline state (tA, t2, tB, tC, XA, XB, XC, dxAB, dxBC, dxAC,
# dxCB), then per outline line (x-major, start, base, step, count, end x, end y), then the pixel box.
_SPAN = 0
_LINE = 11
_BOX = _LINE + 21


def rasterise(
    dst_xyz: np.ndarray,
    triangles: np.ndarray,
    origin_xy: tuple[int, int],
    shape_hw: tuple[int, int],
    device: torch.device,
) -> torch.Tensor:
    """(H,W) int64 row of ``triangles`` visible at each window pixel, -1 where none.

    The twin of ``warp.rasterise_mesh``: a pixel is covered where cv2.fillConvexPoly(LINE_8, shift=4)
    paints it (its integer scanline spans and its three outline lines, in cv2's own fixed-point
    arithmetic), so both maps agree pixel for pixel (outlines clipped at the frame edge aside).
    """
    h, w = shape_hw
    out = torch.full((h * w,), -1, dtype=torch.int64, device=device)
    xy = dst_xyz[:, :2].astype(np.float64)
    p = xy[triangles]
    area = (p[:, 1, 0] - p[:, 0, 0]) * (p[:, 2, 1] - p[:, 0, 1]) - (p[:, 2, 0] - p[:, 0, 0]) * (
        p[:, 1, 1] - p[:, 0, 1]
    )
    rows = np.nonzero(np.abs(area) > 1e-6)[0]
    if len(rows) == 0:
        return out.view(h, w)
    order = np.argsort(-dst_xyz[:, 2][triangles[rows]].mean(axis=1), kind="stable")  # far first
    drawn = rows[order]  # the draw order: a later (nearer) triangle overwrites
    v16 = np.round((xy - np.asarray(origin_xy, np.float64)) * (1 << _SHIFT_BITS)).astype(np.int64)
    table, boxes = fill_tables(v16[triangles[drawn]], (h, w))
    counts = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    table_t = upload(np.concatenate([table, boxes[:, :2], boxes[:, 2:3] - boxes[:, :1]], axis=1), device)
    for tri, k in pixel_pairs(counts, device):
        t = table_t[tri].T  # (columns, pairs)
        px = t[_BOX] + k % t[_BOX + 2]
        py = t[_BOX + 1] + k // t[_BOX + 2]
        covered = covers(t, px, py)
        values = torch.where(covered, tri, torch.full_like(tri, -1))
        out.scatter_reduce_(0, py * w + px, values, reduce="amax", include_self=True)
    lookup = upload(drawn.astype(np.int64), device)
    return torch.where(out >= 0, lookup[out.clamp(min=0)], out).view(h, w)


def pair_chunks(counts: np.ndarray, budget: int = _MAX_PAIRS) -> list[tuple[int, int]]:
    """Runs of triangles whose pixel pairs stay under ``budget`` (one triangle may exceed it)."""
    cum = np.cumsum(counts)
    bounds, start, done = [], 0, 0
    while start < len(counts):
        stop = max(int(np.searchsorted(cum, done + budget, side="right")), start + 1)
        bounds.append((start, stop))
        done, start = int(cum[stop - 1]), stop
    return bounds


def pixel_pairs(
    counts: np.ndarray, device: torch.device, budget: int = _MAX_PAIRS
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every (triangle, k-th pixel of its box) pair, ``counts[i]`` pairs for triangle ``i``, in runs of
    at most ``budget`` pairs (``pair_chunks``): per run, the triangle index and k of each pair."""
    for start, stop in pair_chunks(counts, budget):
        chunk = counts[start:stop]
        n_pairs = int(chunk.sum())
        if n_pairs == 0:
            continue
        offsets = upload(np.stack([chunk, np.cumsum(chunk) - chunk]), device)  # counts, first pair
        local = torch.arange(start, stop, device=device)
        tri = torch.repeat_interleave(local, offsets[0], output_size=n_pairs)
        yield tri, torch.arange(n_pairs, device=device) - offsets[1][tri - start]


def _cdiv(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """C integer division (truncation toward zero), as cv2's int64 arithmetic does it."""
    q = np.abs(a) // np.maximum(np.abs(b), 1)
    return np.where((a < 0) != (b < 0), -q, q)


def _pick(arr: np.ndarray, axis: np.ndarray) -> np.ndarray:
    """Per row, the x (0) or y (1) component."""
    return np.take_along_axis(arr, axis[:, None], axis=1)[:, 0]


def fill_tables(v16: np.ndarray, shape_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Per triangle (R,3,2 vertices in 1/16 px): FillConvexPoly's scan state and a pixel box.

    The scan starts at the first vertex with the smallest y and walks both ways round; an edge enters at
    its start vertex's rounded row with cv2's rounded 16.16 slope.
    """
    big = v16 << (_XY_SHIFT - _SHIFT_BITS)  # 16.16 fixed point
    imin = np.argmin(v16[..., 1], axis=1)
    a, b, c = (np.take_along_axis(big, ((imin + s) % 3)[:, None, None], axis=1)[:, 0] for s in (0, 1, 2))
    ta, tb, tc = ((q[:, 1] + _HALF) >> _XY_SHIFT for q in (a, b, c))

    def slope(s: np.ndarray, ts: np.ndarray, e: np.ndarray, te: np.ndarray) -> np.ndarray:
        dy = te - ts
        return np.where(dy > 0, _cdiv((e[:, 0] - s[:, 0]) * 2 + dy, 2 * dy), 0)

    columns = [ta, np.maximum(np.maximum(ta, tb), tc), tb, tc, a[:, 0], b[:, 0], c[:, 0]]
    columns += [slope(a, ta, b, tb), slope(b, tb, c, tc), slope(a, ta, c, tc), slope(c, tc, b, tb)]
    for p1, p2 in ((big[:, 2], big[:, 0]), (big[:, 0], big[:, 1]), (big[:, 1], big[:, 2])):
        d = p2 - p1
        xmajor = np.abs(d[:, 0]) > np.abs(d[:, 1])
        swap = np.where(xmajor, d[:, 0] < 0, d[:, 1] < 0)[:, None]
        q1, q2 = np.where(swap, p2, p1), np.where(swap, p1, p2)
        major = np.where(xmajor, 0, 1)
        columns += [
            xmajor.astype(np.int64),
            (_pick(q1, major) + _HALF) >> _XY_SHIFT,
            _pick(q1, 1 - major) + _HALF,
            _cdiv(_pick(q2 - q1, 1 - major) << _XY_SHIFT, np.abs(_pick(d, major)) | 1),
            _pick(q2 - q1, major) >> _XY_SHIFT,
            (q2[:, 0] + _HALF) >> _XY_SHIFT,
            (q2[:, 1] + _HALF) >> _XY_SHIFT,
        ]
    return np.stack(columns, axis=1), pixel_boxes(v16, shape_hw)


def pixel_boxes(v16: np.ndarray, shape_hw: tuple[int | np.ndarray, int | np.ndarray]) -> np.ndarray:
    """(...,4) x0, y0, x1, y1 per triangle (...,3,2 vertices in 1/16 px): every pixel cv2 paints lies
    within a pixel of the rounded vertex extent; clipped to ``shape_hw`` (broadcast against ``...``)."""
    h, w = shape_hw
    big = v16 << (_XY_SHIFT - _SHIFT_BITS)
    lo = ((big.min(axis=-2) + _HALF) >> _XY_SHIFT) - 1
    hi = ((big.max(axis=-2) + _HALF) >> _XY_SHIFT) + 2
    x0, y0 = np.clip(lo[..., 0], 0, w), np.clip(lo[..., 1], 0, h)
    x1, y1 = np.maximum(np.clip(hi[..., 0], 0, w), x0), np.maximum(np.clip(hi[..., 1], 0, h), y0)
    return np.stack([x0, y0, x1, y1], axis=-1)


def scan_tables_torch(v16: torch.Tensor) -> torch.Tensor:
    """``fill_tables``' (R,32) int64 scan columns computed on the device from (R,3,2) int64 vertices: the
    same fixed-point arithmetic, so a batch of faces needs no per-triangle work on the host."""
    big = v16 << (_XY_SHIFT - _SHIFT_BITS)
    imin = v16[..., 1].argmin(dim=1)
    a, b, c = (
        torch.gather(big, 1, ((imin + s) % 3)[:, None, None].expand(-1, 1, 2))[:, 0] for s in (0, 1, 2)
    )
    ta, tb, tc = ((q[:, 1] + _HALF) >> _XY_SHIFT for q in (a, b, c))

    def slope(s: torch.Tensor, ts: torch.Tensor, e: torch.Tensor, te: torch.Tensor) -> torch.Tensor:
        dy = te - ts
        return torch.where(dy > 0, _cdiv_torch((e[:, 0] - s[:, 0]) * 2 + dy, 2 * dy), 0)

    def pick(arr: torch.Tensor, take_x: torch.Tensor) -> torch.Tensor:
        return torch.where(take_x, arr[:, 0], arr[:, 1])

    columns = [ta, torch.maximum(torch.maximum(ta, tb), tc), tb, tc, a[:, 0], b[:, 0], c[:, 0]]
    columns += [slope(a, ta, b, tb), slope(b, tb, c, tc), slope(a, ta, c, tc), slope(c, tc, b, tb)]
    for p1, p2 in ((big[:, 2], big[:, 0]), (big[:, 0], big[:, 1]), (big[:, 1], big[:, 2])):
        d = p2 - p1
        xmajor = d[:, 0].abs() > d[:, 1].abs()
        swap = torch.where(xmajor, d[:, 0] < 0, d[:, 1] < 0)[:, None]
        q1, q2 = torch.where(swap, p2, p1), torch.where(swap, p1, p2)
        columns += [
            xmajor.to(torch.int64),
            (pick(q1, xmajor) + _HALF) >> _XY_SHIFT,
            pick(q1, ~xmajor) + _HALF,
            _cdiv_torch(pick(q2 - q1, ~xmajor) << _XY_SHIFT, pick(d, xmajor).abs() | 1),
            pick(q2 - q1, xmajor) >> _XY_SHIFT,
            (q2[:, 0] + _HALF) >> _XY_SHIFT,
            (q2[:, 1] + _HALF) >> _XY_SHIFT,
        ]
    return torch.stack(columns, dim=1)


def _cdiv_torch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``_cdiv`` on the device: C integer division, truncating toward zero."""
    q = a.abs() // b.abs().clamp(min=1)
    return torch.where((a < 0) != (b < 0), -q, q)


class PairColumns(Protocol):
    """The triangle-table columns of every pixel pair by column index: a (columns, pairs) tensor, or an
    object that gathers each column only when it is read."""

    def __getitem__(self, column: int, /) -> torch.Tensor: ...


def covers(t: PairColumns, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Whether cv2.fillConvexPoly paints pixel (px, py) of the triangle whose ``fill_tables`` row is ``t``
    (columns first: one table row per pixel pair)."""
    return _in_spans(t, px, py) | _on_outline(t, px, py)


def _in_spans(t: PairColumns, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Inside one of FillConvexPoly's scanline spans: rows [tA, t2), span ends rounded half up."""
    ta, t2, tb, tc, xa, xb, xc, dab, dbc, dac, dcb = (t[_SPAN + i] for i in range(11))
    x0 = torch.where(py < tb, xa + dab * (py - ta), xb + dbc * (py - tb))  # chain A->B->C
    x1 = torch.where(py < tc, xa + dac * (py - ta), xc + dcb * (py - tc))  # chain A->C->B
    left = (torch.minimum(x0, x1) + _HALF) >> _XY_SHIFT
    right = (torch.maximum(x0, x1) + _HALF) >> _XY_SHIFT
    return (py >= ta) & (py < t2) & (px >= left) & (px <= right)


def _on_outline(t: PairColumns, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """On one of the three edge lines cv2's Line2 draws before the fill (end point included)."""
    hit = torch.zeros_like(px, dtype=torch.bool)
    for e in range(3):
        xmajor, start, base, step, count, end_x, end_y = (t[_LINE + 7 * e + i] for i in range(7))
        along = torch.where(xmajor == 1, px, py)
        across = torch.where(xmajor == 1, py, px)
        k = along - start
        hit |= (k >= 0) & (k <= count) & (across == (base + k * step) >> _XY_SHIFT)
        hit |= (px == end_x) & (py == end_y)
    return hit


def fill_from_nearest(tri_map: torch.Tensor) -> torch.Tensor:
    """Every uncovered pixel gets the triangle of its nearest covered pixel (jump flooding, JFA+1).

    The twin of ``warp.fill_from_nearest``; a map with no covered pixel comes back unchanged.
    """
    inside = torch.ones((1, *tri_map.shape), dtype=torch.bool, device=tri_map.device)
    return fill_from_nearest_batched(tri_map[None], inside)[0]


def fill_from_nearest_batched(tri_map: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """``fill_from_nearest`` of every face of an (F,H,W) stack, each within its window.

    Padding pixels (``inside`` False) never carry a seed, so a face fills exactly as it does alone: the
    extra (larger) jump steps of a smaller face only reach outside its window and change nothing.
    """
    f, h, w = tri_map.shape
    device = tri_map.device
    ys = torch.arange(h, device=device, dtype=torch.float32)[:, None].expand(h, w)
    xs = torch.arange(w, device=device, dtype=torch.float32)[None, :].expand(h, w)
    covered = tri_map >= 0
    seed = torch.stack([torch.where(covered, xs, _NONE), torch.where(covered, ys, _NONE)])  # (2,F,H,W)
    step = 1 << max(int(max(h, w) - 1).bit_length() - 1, 0)
    steps = []
    while step >= 1:
        steps.append(step)
        step //= 2
    for step in [*steps, 1]:
        padded = F.pad(seed, (step, step, step, step), value=_NONE)
        cands = torch.stack(
            [
                padded[:, :, step + dy : step + dy + h, step + dx : step + dx + w]
                for dy in (-step, 0, step)
                for dx in (-step, 0, step)
            ]
        )  # (9,2,F,H,W)
        dist = (cands[:, 0] - xs) ** 2 + (cands[:, 1] - ys) ** 2
        best = dist.argmin(dim=0)
        seed = torch.gather(cands, 0, best[None, None].expand(1, 2, f, h, w))[0]
        seed = torch.where(inside, seed, _NONE)
    found = seed[0] < _NONE / 2
    flat = seed[1].clamp(0, h - 1).long() * w + seed[0].clamp(0, w - 1).long()
    nearest = torch.gather(tri_map.reshape(f, h * w), 1, flat.reshape(f, h * w)).view(f, h, w)
    nearest = torch.where(found, nearest, torch.full_like(tri_map, -1))
    return torch.where(covered, tri_map, nearest)


def warp(
    source: torch.Tensor, affines: np.ndarray, filled: torch.Tensor, origin_xy: tuple[int, int]
) -> torch.Tensor:
    """(3,H,W) grey levels of ``source`` (1,3,Hs,Ws float) through per-pixel triangle affines.

    The twin of ``warp.remap_triangles``: bilinear, replicated border, pixel centres at integer
    coordinates (``align_corners=True``), rounded to grey levels like cv2.remap's uint8 output.
    """
    h, w = filled.shape
    device = filled.device
    table = upload(np.where(np.isfinite(affines), affines, 0.0).astype(np.float32).reshape(-1, 6), device)
    coef = table[filled.clamp(min=0)]  # (H,W,6)
    xs = torch.arange(w, device=device, dtype=torch.float32)[None, :] + float(origin_xy[0])
    ys = torch.arange(h, device=device, dtype=torch.float32)[:, None] + float(origin_xy[1])
    map_x = coef[..., 0] * xs + coef[..., 1] * ys + coef[..., 2]
    map_y = coef[..., 3] * xs + coef[..., 4] * ys + coef[..., 5]
    hs, ws = source.shape[-2:]
    grid = torch.stack([map_x * (2.0 / max(ws - 1, 1)) - 1.0, map_y * (2.0 / max(hs - 1, 1)) - 1.0], dim=-1)
    sampled = F.grid_sample(source, grid[None], mode="bilinear", padding_mode="border", align_corners=True)
    warped = round_u8(sampled[0])
    corner = source[0, :, :1, :1]
    return torch.where((filled < 0)[None], corner, warped)
