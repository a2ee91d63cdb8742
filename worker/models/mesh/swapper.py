"""The ``mesh`` swapper: the source face warped over the target's 468-point mesh, triangle by triangle.

Unlike the 5-point ``classic`` path, mouth, eyes and pose follow the target, because every source
triangle lands on the matching target triangle. Faces the mesh cannot serve (too small, low presence)
fall back to ``classic`` one by one, and ``SwapOutput.paths`` says which path each face took.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch

from worker.models.align import MASK_EPS, transfer_colour_lab
from worker.models.faces import Face, SwapOutput
from worker.models.mesh.landmarker import FaceMeshLandmarker, roi_from_face
from worker.models.mesh.tracking import FaceTracker
from worker.models.mesh.triangles import MeshTopology, load_topology, signed_areas
from worker.models.mesh.warp import warp_mesh

# Eye-corner pairs (image-left eye 33/133, image-right eye 362/263) whose centres define the face scale.
_EYE_LEFT_IMG = (33, 133)
_EYE_RIGHT_IMG = (362, 263)
_SHIFT_BITS = 4


def inter_ocular_px(points: np.ndarray) -> float:
    """Distance between the two eye centres of a mesh, the face's size unit."""
    left = points[list(_EYE_LEFT_IMG), :2].mean(axis=0)
    right = points[list(_EYE_RIGHT_IMG), :2].mean(axis=0)
    return float(np.linalg.norm(right - left))


def mask_outline(points: np.ndarray, oval: np.ndarray, forehead_keep: float) -> np.ndarray:
    """The face oval with its forehead part squashed toward the eye line.

    The mesh reaches the hairline; keeping only the lower part of the forehead stops the source's fringe
    from being pasted onto the target.
    """
    xy = points[:, :2]
    left = xy[list(_EYE_LEFT_IMG)].mean(axis=0)
    right = xy[list(_EYE_RIGHT_IMG)].mean(axis=0)
    along = (right - left) / max(float(np.linalg.norm(right - left)), 1e-6)
    up = np.array([along[1], -along[0]])  # y-down image: perpendicular pointing to the forehead
    mid = (left + right) / 2.0
    ring = xy[oval]
    height = (ring - mid) @ up
    ring = ring - np.outer(np.maximum(height, 0.0) * (1.0 - forehead_keep), up)
    return cv2.convexHull(ring.astype(np.float32)).reshape(-1, 2)


def polygon_mask(polygon_xy: np.ndarray, origin_xy: tuple[int, int], shape_hw: tuple[int, int]) -> np.ndarray:
    """Anti-aliased fill of a polygon in a window, float32 in [0,1] (sub-pixel, so edges never jump)."""
    canvas = np.zeros(shape_hw, dtype=np.uint8)
    pts = np.round((polygon_xy - np.asarray(origin_xy, np.float64)) * (1 << _SHIFT_BITS)).astype(np.int32)
    cv2.fillPoly(canvas, [pts], 255, lineType=cv2.LINE_AA, shift=_SHIFT_BITS)
    return canvas.astype(np.float32) / 255.0


def feather_inside(mask: np.ndarray, sigma_px: float) -> np.ndarray:
    """A soft mask that is 0 on and outside the polygon edge and ramps to 1 about 2 sigma inside."""
    blurred = cv2.GaussianBlur(mask, (0, 0), sigmaX=max(sigma_px, 0.5), borderType=cv2.BORDER_CONSTANT)
    ramp = np.clip((blurred - 0.5) * 2.0, 0.0, 1.0)
    return ramp * ramp * (3.0 - 2.0 * ramp)


class MeshSwapper:
    """Warps one source face over every target face's mesh; per-face 5-point fallback."""

    name = "mesh"

    def __init__(
        self,
        source_image: np.ndarray,
        source_face: Face,
        store: Path,
        device: torch.device | str,
        *,
        mouth_mask: Literal["lips", "inner", "off"] = "lips",
        min_face_px: float = 32.0,
        presence_min: float = 0.5,
        smooth: bool = True,
        feather_frac: float = 0.12,
        forehead_keep: float = 0.4,
        mouth_margin_frac: float = 0.05,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.source_image = np.ascontiguousarray(source_image)
        self.source_face = source_face
        self.mouth_mask = mouth_mask
        self.min_face_px = min_face_px
        self.presence_min = presence_min
        self.smooth = smooth
        self.feather_frac = feather_frac
        self.forehead_keep = forehead_keep
        self.mouth_margin_frac = mouth_margin_frac
        self.topology: MeshTopology = load_topology()
        self.landmarker = FaceMeshLandmarker(store, device, dtype=dtype)
        self.tracker = FaceTracker()
        self._classic: object | None = None
        points, presence, _ = self.landmarker.landmarks_refined(
            [self.source_image], [roi_from_face(source_face, 0)]
        )
        self.source_points = points[0]
        # A source photo without a usable mesh still swaps, through the classic path for every face.
        self.source_ok = bool(presence[0] >= presence_min)
        self._pyramid = self._build_pyramid(self.source_image, inter_ocular_px(self.source_points))

    @staticmethod
    def _build_pyramid(image: np.ndarray, iod_px: float) -> list[np.ndarray]:
        """Halved copies of the source so a large source face shrinks without aliasing."""
        levels = [image]
        while iod_px / 2 ** len(levels) >= 8.0 and min(levels[-1].shape[:2]) >= 32:
            levels.append(cv2.pyrDown(levels[-1]))
        return levels

    def _classic_swapper(self) -> object:
        if self._classic is None:
            from worker.models.source_face import SourceFace
            from worker.models.swap_classic import ClassicSwapper

            self._classic = ClassicSwapper(SourceFace(self.source_image, self.source_face))
        return self._classic

    def track_meshes(
        self, frames: np.ndarray, faces: Sequence[Sequence[Face]]
    ) -> list[list[np.ndarray | None]]:
        """The smoothed mesh (468,3) of every face, or None where the face takes the classic path.

        All mesh-eligible faces of the batch run through the net together; smoothing then walks the
        frames in order, one IoU track per face.
        """
        rois, owners = [], []
        for fi, frame_faces in enumerate(faces):
            for k, face in enumerate(frame_faces):
                if self.source_ok and face.size_px >= self.min_face_px:
                    rois.append(roi_from_face(face, fi))
                    owners.append((fi, k))
        points, presence, _ = self.landmarker.landmarks_refined(frames, rois)
        found = {owner: i for i, owner in enumerate(owners) if presence[i] >= self.presence_min}
        meshes: list[list[np.ndarray | None]] = []
        for fi, frame_faces in enumerate(faces):
            tracks = self.tracker.assign([f.box for f in frame_faces])
            row: list[np.ndarray | None] = []
            for k, track in enumerate(tracks):
                i = found.get((fi, k))
                if i is None:
                    row.append(None)
                    continue
                pts = points[i]
                row.append(track.smoother(pts, inter_ocular_px(pts)) if self.smooth else pts)
            meshes.append(row)
        return meshes

    def swap_batch(self, frames: np.ndarray, faces: Sequence[Sequence[Face]]) -> list[SwapOutput]:
        """Swap every face of every frame: mesh where a mesh was found, classic otherwise."""
        frames = np.asarray(frames)
        meshes = self.track_meshes(frames, faces)
        outputs = []
        for frame, frame_faces, frame_meshes in zip(frames, faces, meshes, strict=True):
            out = frame.copy()
            union = np.zeros(frame.shape[:2], dtype=np.float32)
            paths = []
            for face, pts in zip(frame_faces, frame_meshes, strict=True):
                if pts is not None:
                    out, mask = self.swap_face(out, pts)
                    paths.append(self.name)
                else:
                    out, mask = self._classic_swapper().swap_face(out, face)  # type: ignore[attr-defined]
                    paths.append("classic")
                np.maximum(union, mask, out=union)
            outputs.append(SwapOutput(frame=out, mask=union, paths=paths))
        return outputs

    def _hidden_in_source(self, points: np.ndarray) -> np.ndarray:
        """Per triangle, 1 where the source photo shows it folded or squeezed (turned away), else 0.

        Those triangles would sample the source's background or far cheek; the target's own skin is a
        better fill there.
        """
        tris = self.topology.triangles
        src = signed_areas(self.source_points, tris)
        dst = signed_areas(points, tris)
        front = dst > 0
        ratio = np.where(front, src / np.where(front, dst, 1.0), 1.0)
        ref = float(np.median(ratio[front])) if front.any() else 1.0
        rel = ratio / max(ref, 1e-6)
        rel[self.topology.groups["surface"][1] :] = 1.0  # eye/mouth fills are thin by nature; mouth: own mask
        return np.clip((0.35 - rel) / 0.25, 0.0, 1.0).astype(np.float32)

    def swap_face(self, frame: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Warp, colour-match and blend the source onto one target mesh; the frame and its mask."""
        h, w = frame.shape[:2]
        full_mask = np.zeros((h, w), dtype=np.float32)
        iod = inter_ocular_px(points)
        xy = points[:, :2]
        x0, y0 = (int(v) for v in np.clip(np.floor(xy.min(axis=0)) - 1, 0, [w, h]))
        x1, y1 = (int(v) for v in np.clip(np.ceil(xy.max(axis=0)) + 2, 0, [w, h]))
        if x1 - x0 < 4 or y1 - y0 < 4 or not np.isfinite(iod) or iod < 1.0:
            return frame, full_mask
        origin, shape = (x0, y0), (y1 - y0, x1 - x0)
        level = int(
            np.clip(
                math.floor(math.log2(max(inter_ocular_px(self.source_points) / iod, 1.0))),
                0,
                len(self._pyramid) - 1,
            )
        )
        src_xy = (self.source_points[:, :2] + 0.5) / 2**level - 0.5
        tris = self.topology.triangles
        warped, tri_map = warp_mesh(self._pyramid[level], src_xy, points, tris, origin, shape)
        hull = mask_outline(points, self.topology.face_oval, self.forehead_keep)
        mask = feather_inside(polygon_mask(hull, origin, shape), self.feather_frac * iod)
        # keep the target where the source cannot supply the surface, and inside the target's mouth
        hidden = self._hidden_in_source(points)[np.maximum(tri_map, 0)] * (tri_map >= 0)
        keep_target = hidden.astype(np.float32)
        if self.mouth_mask != "off":
            start, stop = self.topology.groups["mouth"]
            mouth = ((tri_map >= start) & (tri_map < stop)).astype(np.float32)
            loop = self.topology.lips_outer if self.mouth_mask == "lips" else self.topology.lips_inner
            mouth = np.maximum(mouth, polygon_mask(xy[loop], origin, shape))
            radius = max(1, round(self.mouth_margin_frac * iod))
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
            mouth = cv2.dilate(mouth, kernel).astype(np.float32)
            keep_target = np.maximum(keep_target, mouth).astype(np.float32)
        keep_target = cv2.GaussianBlur(keep_target.astype(np.float32), (0, 0), sigmaX=max(0.04 * iod, 0.5))
        mask *= 1.0 - np.clip(keep_target * 1.5, 0.0, 1.0)
        mask[mask < MASK_EPS] = 0.0
        if not mask.any():
            return frame, full_mask
        roi = frame[y0:y1, x0:x1]
        warped = transfer_colour_lab(warped, roi, mask)
        m = mask[..., None]
        blended = np.clip(roi.astype(np.float32) * (1.0 - m) + warped.astype(np.float32) * m + 0.5, 0, 255)
        out = frame.copy()
        out[y0:y1, x0:x1] = np.where(m > 0, blended.astype(np.uint8), roi)
        full_mask[y0:y1, x0:x1] = mask
        return out, full_mask
