"""Piecewise-affine warp of one face onto another over the fixed mesh triangles, in one remap.

Each target pixel gets the index of the nearest-to-camera triangle covering it; a per-triangle affine then
gives its source coordinate, and a single ``cv2.remap`` samples the source. Folded triangles (the far
cheek of a turned head) are drawn far-to-near, so the visible surface wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# Sub-pixel precision of the rasteriser (cv2 fixed-point shift): 1/16 px.
_SHIFT_BITS = 4


def triangle_affines(src_xy: np.ndarray, dst_xy: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """(T,2,3) affines taking each destination triangle onto its source triangle (NaN where degenerate)."""
    d = np.concatenate([dst_xy[triangles], np.ones((len(triangles), 3, 1))], axis=2)  # (T,3,3)
    s = src_xy[triangles]  # (T,3,2)
    det = np.linalg.det(d)
    ok = np.abs(det) > 1e-6
    out = np.full((len(triangles), 2, 3), np.nan)
    out[ok] = np.transpose(np.linalg.solve(d[ok], s[ok]), (0, 2, 1))
    return out


def rasterise_triangles(
    dst_xy: np.ndarray,
    depth: np.ndarray,
    triangles: np.ndarray,
    origin_xy: tuple[int, int],
    shape_hw: tuple[int, int],
) -> np.ndarray:
    """(H,W) int32 map of the visible triangle per pixel of a window at ``origin_xy``; -1 where none."""
    idx = np.full(shape_hw, -1, dtype=np.int32)
    pts = np.round((dst_xy - np.asarray(origin_xy, np.float64)) * (1 << _SHIFT_BITS)).astype(np.int32)
    order = np.argsort(-depth[triangles].mean(axis=1), kind="stable")  # far (large z) first
    for t in order:
        cv2.fillConvexPoly(idx, pts[triangles[t]], int(t), lineType=cv2.LINE_8, shift=_SHIFT_BITS)
    return idx


def polygon_mask_u8(
    polygon_xy: np.ndarray, origin_xy: tuple[int, int], shape_hw: tuple[int, int]
) -> np.ndarray:
    """Anti-aliased fill (0..255) of a polygon in a window at ``origin_xy`` (sub-pixel vertices)."""
    canvas = np.zeros(shape_hw, dtype=np.uint8)
    pts = np.round((polygon_xy - np.asarray(origin_xy, np.float64)) * (1 << _SHIFT_BITS)).astype(np.int32)
    cv2.fillPoly(canvas, [pts], 255, lineType=cv2.LINE_AA, shift=_SHIFT_BITS)
    return canvas


def polygon_mask(polygon_xy: np.ndarray, origin_xy: tuple[int, int], shape_hw: tuple[int, int]) -> np.ndarray:
    """Anti-aliased fill of a polygon in a window, float32 in [0,1] (sub-pixel, so edges never jump)."""
    return polygon_mask_u8(polygon_xy, origin_xy, shape_hw).astype(np.float32) / 255.0


def fill_from_nearest(idx: np.ndarray) -> np.ndarray:
    """Give every uncovered pixel the triangle of its nearest covered pixel (affine extrapolation).

    Hairline gaps between neighbours and the thin strip between the mesh and its feathered hull then
    sample continuously instead of from a fixed border pixel.
    """
    holes = (idx < 0).astype(np.uint8)
    if not holes.any() or holes.all():
        return idx
    _, labels = cv2.distanceTransformWithLabels(holes, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL)
    covered = idx[holes == 0]  # labels number the zero pixels of ``holes`` in row-major order, from 1
    return np.where(holes == 1, covered[labels - 1], idx)


def remap_triangles(
    source: np.ndarray,
    affines: np.ndarray,
    local: np.ndarray,
    origin_xy: tuple[int, int],
) -> np.ndarray:
    """One ``cv2.remap`` of ``source`` through per-pixel triangle affines (piecewise-affine warp).

    ``local`` holds each window pixel's row of ``affines`` (every pixel must have one).
    """
    h, w = local.shape
    table = affines.astype(np.float32).reshape(-1, 6)
    xs = np.arange(w, dtype=np.float32)[None, :] + np.float32(origin_xy[0])
    ys = np.arange(h, dtype=np.float32)[:, None] + np.float32(origin_xy[1])
    coef = [table[:, k][local] for k in range(6)]
    map_x = coef[0] * xs + coef[1] * ys + coef[2]
    map_y = coef[3] * xs + coef[4] * ys + coef[5]
    return cv2.remap(source, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


@dataclass(frozen=True)
class MeshRaster:
    """Which triangle each pixel of a window shows: computed once per target face, shared by warps."""

    origin_xy: tuple[int, int]
    tri_map: np.ndarray  # (H,W) int32 row of ``triangles`` seen there, -1 outside the mesh
    filled: np.ndarray  # (H,W) int32 the same with holes given their nearest triangle


def rasterise_mesh(
    dst_xyz: np.ndarray, triangles: np.ndarray, origin_xy: tuple[int, int], shape_hw: tuple[int, int]
) -> MeshRaster:
    """The triangle map of the destination mesh (z = depth, larger is farther) in a window."""
    dst_xy = dst_xyz[:, :2]
    p = dst_xy[triangles]
    area = (p[:, 1, 0] - p[:, 0, 0]) * (p[:, 2, 1] - p[:, 0, 1]) - (p[:, 2, 0] - p[:, 0, 0]) * (
        p[:, 1, 1] - p[:, 0, 1]
    )
    rows = np.nonzero(np.abs(area) > 1e-6)[0]
    local = rasterise_triangles(dst_xy, dst_xyz[:, 2], triangles[rows], origin_xy, shape_hw)
    tri_map = np.where(local >= 0, rows[np.maximum(local, 0)], -1).astype(np.int32)
    filled = fill_from_nearest(tri_map)
    return MeshRaster(origin_xy=origin_xy, tri_map=tri_map, filled=filled)


def warp_through(
    source: np.ndarray, src_xy: np.ndarray, dst_xy: np.ndarray, triangles: np.ndarray, raster: MeshRaster
) -> np.ndarray:
    """The source warped onto the rasterised destination mesh; one remap for the whole window.

    ``src_xy`` may be any per-landmark source positions, e.g. the mirrored landmarks that fill a side
    of the face the source photo does not show.
    """
    if (raster.filled < 0).all():
        h, w = raster.filled.shape
        return np.repeat(np.repeat(source[:1, :1], h, axis=0), w, axis=1)
    affines = triangle_affines(src_xy, dst_xy, triangles)
    affines = np.where(np.isfinite(affines), affines, 0.0)
    return remap_triangles(source, affines, np.maximum(raster.filled, 0), raster.origin_xy)


def warp_mesh(
    source: np.ndarray,
    src_xy: np.ndarray,
    dst_xyz: np.ndarray,
    triangles: np.ndarray,
    origin_xy: tuple[int, int],
    shape_hw: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """The source face warped onto the destination mesh inside a window, and the triangle map.

    The map holds, per window pixel, the row of ``triangles`` seen there (-1 outside the mesh).

    ``src_xy`` are the source landmarks in ``source`` pixels, ``dst_xyz`` the target's in frame pixels
    (z = depth, larger is farther); the window is ``shape_hw`` at ``origin_xy`` in the frame.
    """
    raster = rasterise_mesh(dst_xyz, triangles, origin_xy, shape_hw)
    return warp_through(source, src_xy, dst_xyz[:, :2], triangles, raster), raster.tri_map
