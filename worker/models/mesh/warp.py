"""Piecewise-affine warp of one face onto another over the fixed mesh triangles, in one remap.

Each target pixel gets the index of the nearest-to-camera triangle covering it; a per-triangle affine then
gives its source coordinate, and a single ``cv2.remap`` samples the source. Folded triangles (the far
cheek of a turned head) are drawn far-to-near, so the visible surface wins.
"""

from __future__ import annotations

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
    dst_xy = dst_xyz[:, :2]
    affines = triangle_affines(src_xy, dst_xy, triangles)
    valid = np.all(np.isfinite(affines), axis=(1, 2))
    rows = np.nonzero(valid)[0]
    local = rasterise_triangles(dst_xy, dst_xyz[:, 2], triangles[valid], origin_xy, shape_hw)
    coverage = local >= 0
    tri_map = np.where(coverage, rows[np.maximum(local, 0)], -1).astype(np.int32)
    local = fill_from_nearest(local)
    table = affines[valid].astype(np.float32)
    a = table[np.maximum(local, 0)]  # (H,W,2,3)
    ys, xs = np.mgrid[0 : shape_hw[0], 0 : shape_hw[1]].astype(np.float32)
    xs += origin_xy[0]
    ys += origin_xy[1]
    map_x = a[..., 0, 0] * xs + a[..., 0, 1] * ys + a[..., 0, 2]
    map_y = a[..., 1, 0] * xs + a[..., 1, 1] * ys + a[..., 1, 2]
    if not coverage.any():
        map_x[:] = -1.0
        map_y[:] = -1.0
    warped = cv2.remap(source, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return warped, tri_map
