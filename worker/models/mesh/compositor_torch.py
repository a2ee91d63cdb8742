"""The mesh swapper's per-face work (warp, masks, colour match, blend) in torch, for CUDA.

The CPU path (cv2, in ``swapper.py``) costs ~70 ms of host time per 1080p face, mostly the colour
match's wide blurs; here the same steps run on the device. Each frame's touched rectangle goes up once,
all of its faces blend into it in place, and it comes back once: the host only issues kernels and the
per-triangle geometry, so one face never waits for the previous one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from worker.models.align import MASK_EPS
from worker.models.mesh.blend_torch import (
    dilate_ellipse,
    feather_inside,
    gaussian_blur,
    match_colour,
    round_u8,
    upload,
)
from worker.models.mesh.raster_torch import fill_from_nearest, rasterise, warp
from worker.models.mesh.triangles import MeshTopology
from worker.models.mesh.warp import polygon_mask_u8, triangle_affines


@dataclass(frozen=True)
class FacePlan:
    """Everything per face that both paths compute on the host from its 468 points."""

    window: tuple[int, int, int, int]  # x0, y0, x1, y1 in frame pixels
    iod_px: float
    level: int  # source pyramid level
    src_xy: np.ndarray  # (468,2) source landmarks in that level's pixels
    points: np.ndarray  # (468,3) target mesh in frame pixels
    hidden: np.ndarray  # (T,) float32 per triangle: 1 where the source cannot supply the surface
    hull: np.ndarray  # (P,2) blend outline in frame pixels


def bounding_rect(windows: Sequence[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    """The smallest rectangle holding every window."""
    arr = np.asarray(windows)
    return int(arr[:, 0].min()), int(arr[:, 1].min()), int(arr[:, 2].max()), int(arr[:, 3].max())


class DeviceCanvas:
    """One rectangle of an output frame and of its mask, held on the device while faces blend into it."""

    def __init__(self, frame: np.ndarray, rect: tuple[int, int, int, int], device: torch.device) -> None:
        x0, y0, x1, y1 = rect
        self.rect = rect
        self.image = upload(frame[y0:y1, x0:x1], device).permute(2, 0, 1).to(torch.float32)  # (3,h,w)
        self.mask = torch.zeros((y1 - y0, x1 - x0), dtype=torch.float32, device=device)

    def write_back(self, frame: np.ndarray, union: np.ndarray) -> None:
        """Copy the blended rectangle into ``frame`` and max its mask into ``union`` (one sync)."""
        x0, y0, x1, y1 = self.rect
        frame[y0:y1, x0:x1] = self.image.to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        np.maximum(union[y0:y1, x0:x1], self.mask.cpu().numpy(), out=union[y0:y1, x0:x1])


class TorchCompositor:
    """Blends the source onto target meshes on a torch device; the twin of ``MeshSwapper``'s cv2 path."""

    def __init__(
        self,
        pyramid: Sequence[np.ndarray],
        topology: MeshTopology,
        device: torch.device,
        *,
        mouth_mask: Literal["lips", "inner", "off"],
        feather_frac: float,
        mouth_margin_frac: float,
        colour_sigma_frac: float,
    ) -> None:
        self.device = device
        self.topology = topology
        self.mouth_mask = mouth_mask
        self.feather_frac = feather_frac
        self.mouth_margin_frac = mouth_margin_frac
        self.colour_sigma_frac = colour_sigma_frac
        # the source lives on the device once, as float for grid_sample
        self.levels = [upload(level, device).permute(2, 0, 1)[None].to(torch.float32) for level in pyramid]
        start, stop = topology.groups["mouth"]
        self._mouth_vertices = np.unique(topology.triangles[start:stop])

    def composite(self, canvas: DeviceCanvas, plan: FacePlan) -> None:
        """Warp, colour-match and blend one face into ``canvas`` (which holds its window), no sync."""
        x0, y0, x1, y1 = plan.window
        cx0, cy0 = canvas.rect[:2]
        origin, shape = (x0, y0), (y1 - y0, x1 - x0)
        iod = plan.iod_px
        tris = self.topology.triangles
        xy = plan.points[:, :2]
        tri_map = rasterise(plan.points, tris, origin, shape, self.device)
        covered = tri_map >= 0
        affines = triangle_affines(plan.src_xy, xy, tris)
        warped = warp(self.levels[plan.level], affines, fill_from_nearest(tri_map), origin)
        region = self._polygon(plan.hull, origin, shape)
        mask = feather_inside(region, self.feather_frac * iod)
        hidden = upload(plan.hidden.astype(np.float32), self.device)
        keep_target = hidden[tri_map.clamp(min=0)] * covered
        if self.mouth_mask != "off":
            keep_target = torch.maximum(keep_target, self._mouth_keep(tri_map, xy, origin, shape, iod))
        keep_target = gaussian_blur(keep_target, max(0.04 * iod, 0.5), "reflect101")
        mask = mask * (1.0 - (keep_target * 1.5).clamp(0.0, 1.0))
        mask = torch.where(mask < MASK_EPS, torch.zeros_like(mask), mask)
        roi = canvas.image[:, y0 - cy0 : y1 - cy0, x0 - cx0 : x1 - cx0]
        warped = match_colour(warped, roi, region * (mask > 0), self.colour_sigma_frac * iod)
        m = mask[None]
        roi.copy_(torch.where(m > 0, round_u8(roi * (1.0 - m) + warped * m), roi))
        union = canvas.mask[y0 - cy0 : y1 - cy0, x0 - cx0 : x1 - cx0]
        torch.maximum(union, mask, out=union)

    def _polygon(
        self, polygon_xy: np.ndarray, origin: tuple[int, int], shape: tuple[int, int]
    ) -> torch.Tensor:
        """``swapper.polygon_mask`` on the device: cv2's anti-aliased fill of just the polygon's box on
        the host (a fraction of a millisecond, and the exact same edge), uploaded as uint8."""
        h, w = shape
        local = np.asarray(polygon_xy, np.float64) - np.asarray(origin, np.float64)
        bx0, by0 = (int(v) for v in np.clip(np.floor(local.min(axis=0)) - 2, 0, [w, h]))
        bx1, by1 = (int(v) for v in np.clip(np.ceil(local.max(axis=0)) + 3, 0, [w, h]))
        out = torch.zeros(shape, dtype=torch.float32, device=self.device)
        if bx1 > bx0 and by1 > by0:
            patch = polygon_mask_u8(polygon_xy, (origin[0] + bx0, origin[1] + by0), (by1 - by0, bx1 - bx0))
            out[by0:by1, bx0:bx1] = upload(patch, self.device).to(torch.float32) / 255.0
        return out

    def _mouth_keep(
        self,
        tri_map: torch.Tensor,
        xy: np.ndarray,
        origin: tuple[int, int],
        shape: tuple[int, int],
        iod: float,
    ) -> torch.Tensor:
        """The target's mouth (its triangles and lip loop), dilated by the mouth margin."""
        start, stop = self.topology.groups["mouth"]
        mouth = ((tri_map >= start) & (tri_map < stop)).to(torch.float32)
        loop = self.topology.lips_outer if self.mouth_mask == "lips" else self.topology.lips_inner
        mouth = torch.maximum(mouth, self._polygon(xy[loop], origin, shape))
        radius = max(1, round(self.mouth_margin_frac * iod))
        # the mouth is non-zero only near its own points: dilate just that box (plus the radius)
        near = np.concatenate([xy[self._mouth_vertices], xy[loop]]) - np.asarray(origin, np.float64)
        h, w = shape
        bx0, by0 = (int(v) for v in np.clip(np.floor(near.min(axis=0)) - 2 - radius, 0, [w, h]))
        bx1, by1 = (int(v) for v in np.clip(np.ceil(near.max(axis=0)) + 3 + radius, 0, [w, h]))
        out = torch.zeros_like(mouth)
        if bx1 > bx0 and by1 > by0:
            out[by0:by1, bx0:bx1] = dilate_ellipse(mouth[by0:by1, bx0:bx1], radius)
        return out
