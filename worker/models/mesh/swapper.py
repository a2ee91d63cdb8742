"""The ``mesh`` swapper: the source face warped over the target's 468-point mesh, triangle by triangle.

Unlike the 5-point ``classic`` path, mouth, eyes and pose follow the target, because every source
triangle lands on the matching target triangle. Faces the mesh cannot serve (too small, low presence)
fall back to ``classic`` one by one, and ``SwapOutput.paths`` says which path each face took.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch

from worker.models.align import MASK_EPS
from worker.models.faces import Face, SwapOutput
from worker.models.mesh.blend_torch import upload
from worker.models.mesh.compositor_batched import BatchedCompositor, Item
from worker.models.mesh.compositor_torch import DeviceCanvas, FacePlan, TorchCompositor, bounding_rect
from worker.models.mesh.landmarker import FaceMeshLandmarker, FaceRoi, roi_from_face
from worker.models.mesh.tracking import FaceTracker
from worker.models.mesh.triangles import MeshTopology, load_topology, signed_areas
from worker.models.mesh.warp import polygon_mask, rasterise_mesh, warp_through

# Eye-corner pairs (image-left eye 33/133, image-right eye 362/263) whose centres define the face scale.
_EYE_LEFT_IMG = (33, 133)
_EYE_RIGHT_IMG = (362, 263)


def inter_ocular_px(points: np.ndarray) -> float:
    """Distance between the two eye centres of a mesh, the face's size unit."""
    return float(inter_ocular_many(np.asarray(points)[None])[0])


def inter_ocular_many(meshes: np.ndarray) -> np.ndarray:
    """``inter_ocular_px`` of each mesh of an (N, points, 2+) stack, bit for bit as one at a time.

    Only element-wise steps and fixed-order sums, no ``np.linalg.norm``: that takes a BLAS dot for one
    vector and a sum for rows, which differ in the last bit where the dot uses FMA.
    """
    xy = meshes[..., :2]
    gap = xy[:, list(_EYE_RIGHT_IMG)].mean(axis=1) - xy[:, list(_EYE_LEFT_IMG)].mean(axis=1)
    return np.sqrt(gap[:, 0] * gap[:, 0] + gap[:, 1] * gap[:, 1])


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


def _masked_blur(values: np.ndarray, weight: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur of ``values`` (H,W,C) that only averages pixels where ``weight`` is set."""
    w = cv2.GaussianBlur(weight, (0, 0), sigmaX=sigma_px, borderType=cv2.BORDER_REPLICATE)
    v = cv2.GaussianBlur(values * weight[..., None], (0, 0), sigmaX=sigma_px, borderType=cv2.BORDER_REPLICATE)
    return v.reshape(values.shape) / np.maximum(w, 1e-4)[..., None]


def match_colour(warped: np.ndarray, target: np.ndarray, region: np.ndarray, sigma_px: float) -> np.ndarray:
    """The warped source in the target's colours: luminance matched globally, skin tone matched locally.

    Luminance (the source's identity, its shading included) keeps its own detail with the target's mean
    and contrast. Chroma takes the target's low-frequency skin
    tone and only the source's fine chroma detail, so a grey or differently lit source photo still
    carries the target's complexion and the seam at the hull edge disappears.
    """
    weights = region > 0.5
    if int(weights.sum()) < 16:
        return warped
    src = cv2.cvtColor(warped.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    tgt = cv2.cvtColor(target.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    w = weights.astype(np.float32)
    src_l, tgt_l = src[..., 0][weights], tgt[..., 0][weights]
    ratio = float(np.clip(tgt_l.std() / max(float(src_l.std()), 1e-3), 0.5, 2.0))
    out = np.empty_like(src)
    out[..., 0] = (src[..., 0] - src_l.mean()) * ratio + tgt_l.mean()
    src_low = _masked_blur(src, w, sigma_px)
    tgt_low = _masked_blur(tgt, w, sigma_px)
    out[..., 1:] = tgt_low[..., 1:] + (src[..., 1:] - src_low[..., 1:])
    out[..., 0] = np.clip(out[..., 0], 0.0, 100.0)
    rgb = cv2.cvtColor(out, cv2.COLOR_LAB2RGB)
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)


def feather_inside(mask: np.ndarray, sigma_px: float) -> np.ndarray:
    """A soft mask that is 0 on and outside the polygon edge and ramps to 1 about 2 sigma inside."""
    blurred = cv2.GaussianBlur(mask, (0, 0), sigmaX=max(sigma_px, 0.5), borderType=cv2.BORDER_CONSTANT)
    ramp = np.clip((blurred - 0.5) * 2.0, 0.0, 1.0)
    return ramp * ramp * (3.0 - 2.0 * ramp)


class MeshSwapper:
    """Warps one source face over every target face's mesh; per-face 5-point fallback.

    ``compositor`` picks where the warp and blend run, all giving the same picture within a grey level
    or two: ``cv2`` face by face on the host; ``torch`` face by face on the swapper's device; ``batched``
    every face of the batch at once on the device (``compositor_batched``: a fixed number of launches
    per overlap layer, whatever the number of faces). ``auto`` is ``batched`` on CUDA and ``cv2`` on
    the CPU: in the H100 pipeline (1080p, ~7 faces a frame) cv2 took ~70 ms a face (its ~850 Python-level
    fills a face contend for the GIL) and per-face torch ~80 ms (per-face launches and host tables); on
    the CPU both torch paths are slower than cv2.
    """

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
        feather_frac: float = 0.09,
        forehead_keep: float = 0.6,
        mouth_margin_frac: float = 0.2,
        colour_sigma_frac: float = 0.15,
        hidden_rel: float = 0.1,
        dtype: torch.dtype = torch.float32,
        compositor: Literal["auto", "batched", "torch", "cv2"] = "auto",
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
        self.colour_sigma_frac = colour_sigma_frac
        self.hidden_rel = hidden_rel
        self.topology: MeshTopology = load_topology()
        self.landmarker = FaceMeshLandmarker(store, device, dtype=dtype)
        self.tracker = FaceTracker()
        # wall seconds of swap_batch's two halves, summed: the mesh net + tracking, then the blend (summed
        # over the threads that blend, so with a blend pool it can exceed the chunk's wall time)
        self.seconds = {"landmarks": 0.0, "blend": 0.0}
        self._classic: object | None = None
        self._lock = threading.Lock()  # blend_batch may run in several threads at once (also guards seconds)
        points, presence, _ = self.landmarker.landmarks_refined(
            [self.source_image], [roi_from_face(source_face, 0)]
        )
        self.source_points = points[0]
        # A source photo without a usable mesh still swaps, through the classic path for every face.
        self.source_ok = bool(presence[0] >= presence_min)
        self._pyramid = self._build_pyramid(self.source_image, inter_ocular_px(self.source_points))
        # per-face plans reuse these source constants: its eye distance, its triangles' areas, and its
        # landmarks in each pyramid level's pixels
        self._source_iod = inter_ocular_px(self.source_points)
        self._source_areas = signed_areas(self.source_points, self.topology.triangles)
        self._source_xy = [
            (self.source_points[:, :2] + 0.5) / 2.0**level - 0.5 for level in range(len(self._pyramid))
        ]
        device = torch.device(device)
        if compositor == "auto":
            compositor = "batched" if device.type == "cuda" else "cv2"
        blend = {
            "mouth_mask": mouth_mask,
            "feather_frac": feather_frac,
            "mouth_margin_frac": mouth_margin_frac,
            "colour_sigma_frac": colour_sigma_frac,
        }
        self._compositor = (
            TorchCompositor(self._pyramid, self.topology, device, **blend) if compositor == "torch" else None  # type: ignore[arg-type]
        )
        self._batched = (
            BatchedCompositor(self._pyramid, self.topology, device, **blend)  # type: ignore[arg-type]
            if compositor == "batched"
            else None
        )

    @staticmethod
    def _build_pyramid(image: np.ndarray, iod_px: float) -> list[np.ndarray]:
        """Halved copies of the source so a large source face shrinks without aliasing."""
        levels = [image]
        while iod_px / 2 ** len(levels) >= 8.0 and min(levels[-1].shape[:2]) >= 32:
            levels.append(cv2.pyrDown(levels[-1]))
        return levels

    def _classic_swapper(self) -> object:
        with self._lock:
            if self._classic is None:
                from worker.models.source_face import SourceFace
                from worker.models.swap_classic import ClassicSwapper

                self._classic = ClassicSwapper(SourceFace(self.source_image, self.source_face))
            return self._classic

    def track_batch(
        self,
        frames: np.ndarray,
        faces: Sequence[Sequence[Face]],
        frames_on_device: torch.Tensor | None = None,
    ) -> list[list[np.ndarray | None]]:
        """The smoothed mesh (468,3) of every face, or None where the face takes the classic path.

        All mesh-eligible faces of the batch run through the net together; smoothing then walks the
        frames in order, one IoU track per face. On CUDA the crops are cut on the device, from
        ``frames_on_device`` when given (else the batch goes up here).
        """
        started = time.perf_counter()
        rois, owners = [], []
        for fi, frame_faces in enumerate(faces):
            for k, face in enumerate(frame_faces):
                if self.source_ok and face.size_px >= self.min_face_px:
                    rois.append(roi_from_face(face, fi))
                    owners.append((fi, k))
        points, presence = self._landmarks(frames, rois, frames_on_device)
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
        self.seconds["landmarks"] += time.perf_counter() - started
        return meshes

    def _landmarks(
        self, frames: np.ndarray, rois: list[FaceRoi], frames_on_device: torch.Tensor | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Refined points and presence per ROI: crops cut on the device on CUDA, by cv2 elsewhere."""
        if frames_on_device is None and self.landmarker.device.type == "cuda" and rois:
            frames_on_device = upload(np.asarray(frames), self.landmarker.device)
        if frames_on_device is not None:
            points, presence, _ = self.landmarker.landmarks_refined_on_device(frames_on_device, rois)
        else:
            points, presence, _ = self.landmarker.landmarks_refined(frames, rois)
        return points, presence

    def swap_batch(self, frames: np.ndarray, faces: Sequence[Sequence[Face]]) -> list[SwapOutput]:
        """Swap every face of every frame: mesh where a mesh was found, classic otherwise.

        The landmark net runs once over all faces of the batch; each face then touches only its own
        window of the frame.
        """
        frames = np.asarray(frames)
        return self.blend_batch(frames, faces, self.track_batch(frames, faces))

    def blend_batch(
        self,
        frames: np.ndarray,
        faces: Sequence[Sequence[Face]],
        meshes: Sequence[Sequence[np.ndarray | None]],
        in_place: bool = False,
    ) -> list[SwapOutput]:
        """The blending half of ``swap_batch``, for meshes already tracked (None: the classic path).
        Safe to run for several batches at once, each in its own thread.

        ``in_place``: the swapped frames are written into ``frames`` itself (each output's frame is a
        view of it), for a caller that no longer needs the originals: a 1080p batch is 50 MB, and its
        copies were a quarter of the render worker's blend time.
        """
        started = time.perf_counter()
        try:
            return self._blend(frames, faces, meshes, in_place)
        finally:
            with self._lock:  # summed over threads: may exceed the wall time
                self.seconds["blend"] += time.perf_counter() - started

    def _blend(
        self,
        frames: np.ndarray,
        faces: Sequence[Sequence[Face]],
        meshes: Sequence[Sequence[np.ndarray | None]],
        in_place: bool,
    ) -> list[SwapOutput]:
        if self._batched is not None:
            with torch.inference_mode():
                return self._swap_batch_batched(frames, faces, meshes, self._batched, in_place)
        if self._compositor is None:
            return self._swap_batch_cv2(frames, faces, meshes, in_place)
        with torch.inference_mode():
            outputs = self._swap_batch_torch(frames, faces, meshes, self._compositor)
        if in_place:
            for i, output in enumerate(outputs):  # the per-face torch path builds new frames
                frames[i] = output.frame
                output.frame = frames[i]
        return outputs

    def _swap_batch_cv2(
        self,
        frames: np.ndarray,
        faces: Sequence[Sequence[Face]],
        meshes: Sequence[Sequence[np.ndarray | None]],
        in_place: bool,
    ) -> list[SwapOutput]:
        outputs = []
        for frame, frame_faces, frame_meshes in zip(frames, faces, meshes, strict=True):
            out = frame if in_place else frame.copy()
            union = np.zeros(frame.shape[:2], dtype=np.float32)
            paths = []
            for face, pts in zip(frame_faces, frame_meshes, strict=True):
                if pts is not None:
                    self.swap_face_into(out, union, pts)
                    paths.append(self.name)
                else:
                    out, mask = self._classic_swapper().swap_face(out, face)  # type: ignore[attr-defined]
                    np.maximum(union, mask, out=union)
                    paths.append("classic")
            if in_place and out is not frame:  # the classic path returns a new frame
                frame[...] = out
                out = frame
            outputs.append(SwapOutput(frame=out, mask=union, paths=paths))
        return outputs

    def _swap_batch_batched(
        self,
        frames: np.ndarray,
        faces: Sequence[Sequence[Face]],
        meshes: Sequence[Sequence[np.ndarray | None]],
        compositor: BatchedCompositor,
        in_place: bool,
    ) -> list[SwapOutput]:
        """``swap_batch`` with every mesh face of the batch blended on the device in one pass per overlap
        layer; classic faces run on the host between layers, in their frame's order."""
        items: list[list[Item]] = []
        paths: list[list[str]] = []
        mesh_faces = [pts for frame_meshes in meshes for pts in frame_meshes if pts is not None]
        plans = iter(self._plans(frames.shape[1:3], mesh_faces))
        for frame_faces, frame_meshes in zip(faces, meshes, strict=True):
            row: list[Item] = []
            for face, pts in zip(frame_faces, frame_meshes, strict=True):
                row.append(partial(self._swap_classic, face) if pts is None else next(plans))
            items.append(row)
            paths.append(["classic" if pts is None else self.name for pts in frame_meshes])
        out, union = compositor.composite(frames, items, in_place=in_place)
        return [SwapOutput(frame=out[i], mask=union[i], paths=p) for i, p in enumerate(paths)]

    def _swap_classic(self, face: Face, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._classic_swapper().swap_face(frame, face)  # type: ignore[attr-defined,no-any-return]

    def _swap_batch_torch(
        self,
        frames: np.ndarray,
        faces: Sequence[Sequence[Face]],
        meshes: Sequence[Sequence[np.ndarray | None]],
        compositor: TorchCompositor,
    ) -> list[SwapOutput]:
        """``swap_batch`` with the mesh faces blended on the device: each frame's face rectangle goes up
        once and every frame comes back after the whole batch is queued (classic faces, on the host,
        take the rectangle back first so faces still stack in order)."""
        outputs, open_canvases = [], []
        for frame, frame_faces, frame_meshes in zip(frames, faces, meshes, strict=True):
            out = frame.copy()
            union = np.zeros(frame.shape[:2], dtype=np.float32)
            plans = [None if pts is None else self._plan(frame.shape[:2], pts) for pts in frame_meshes]
            windows = [plan.window for plan in plans if plan is not None]
            canvas: DeviceCanvas | None = None
            paths = []
            for face, pts, plan in zip(frame_faces, frame_meshes, plans, strict=True):
                if pts is None:
                    if canvas is not None:
                        canvas.write_back(out, union)
                        canvas = None
                    out, mask = self._classic_swapper().swap_face(out, face)  # type: ignore[attr-defined]
                    np.maximum(union, mask, out=union)
                    paths.append("classic")
                    continue
                if plan is not None:
                    if canvas is None:
                        canvas = DeviceCanvas(out, bounding_rect(windows), compositor.device)
                    compositor.composite(canvas, plan)
                paths.append(self.name)
            open_canvases.append((canvas, out, union))
            outputs.append(SwapOutput(frame=out, mask=union, paths=paths))
        for canvas, out, union in open_canvases:
            if canvas is not None:
                canvas.write_back(out, union)
        return outputs

    def _hidden_in_source(self, points: np.ndarray) -> np.ndarray:
        """Per triangle, 1 where the source photo shows it folded or squeezed flat (turned away), else 0.

        Those triangles would sample the source's background; the target's own skin is the better fill
        there. Only near-edge-on triangles count: a merely foreshortened cheek still carries the
        source's identity, and giving it back to the target would leak the target's face.
        ``points`` is one mesh (468,3) or a stack (F,468,3); the result is (T,) or (F,T).
        """
        tris = self.topology.triangles
        xy = np.asarray(points, dtype=np.float64)[..., :2]
        a, b, c = xy[..., tris[:, 0], :], xy[..., tris[:, 1], :], xy[..., tris[:, 2], :]
        dst = (b[..., 0] - a[..., 0]) * (c[..., 1] - a[..., 1]) - (c[..., 0] - a[..., 0]) * (
            b[..., 1] - a[..., 1]
        )
        front = dst > 0
        ratio = np.where(front, self._source_areas / np.where(front, dst, 1.0), 1.0)
        # each face's median over its front-facing triangles (1 when none faces the camera)
        flat_ratio, flat_front = ratio.reshape(-1, ratio.shape[-1]), front.reshape(-1, front.shape[-1])
        ref = np.array(
            [float(np.median(r[f])) if f.any() else 1.0 for r, f in zip(flat_ratio, flat_front, strict=True)]
        ).reshape(ratio.shape[:-1] + (1,))
        rel = ratio / np.maximum(ref, 1e-6)
        # eye/mouth fills are thin by nature (the mouth has its own mask)
        rel[..., self.topology.groups["surface"][1] :] = 1.0
        return np.clip((self.hidden_rel - rel) / (0.7 * self.hidden_rel), 0.0, 1.0).astype(np.float32)

    def _plan(self, shape_hw: tuple[int, int], points: np.ndarray) -> FacePlan | None:
        """The host-side geometry of one face (window, source level, hidden triangles, outline)."""
        return self._plans(shape_hw, [points])[0]

    def _plans(self, shape_hw: tuple[int, int], meshes: Sequence[np.ndarray]) -> list[FacePlan | None]:
        """``_plan`` of many faces of one frame size, with the array work done once for all of them (a
        1080p batch has ~60 faces, and per-face numpy calls hold the GIL the other stages wait for)."""
        if not meshes:
            return []
        pts = np.stack([np.asarray(m) for m in meshes])
        xy = pts[..., :2]
        iod = inter_ocular_many(pts)
        h, w = shape_hw
        lo = np.clip(np.floor(xy.min(axis=1)) - 1, 0, [w, h]).astype(np.int64)
        hi = np.clip(np.ceil(xy.max(axis=1)) + 2, 0, [w, h]).astype(np.int64)
        usable = ((hi - lo) >= 4).all(axis=1) & np.isfinite(iod) & (iod >= 1.0)
        hidden = self._hidden_in_source(pts[usable]) if usable.any() else None
        plans: list[FacePlan | None] = []
        k = 0
        for i, ok in enumerate(usable.tolist()):
            if not ok:
                plans.append(None)
                continue
            level = int(
                np.clip(math.floor(math.log2(max(self._source_iod / iod[i], 1.0))), 0, len(self._pyramid) - 1)
            )
            plans.append(
                FacePlan(
                    window=(int(lo[i, 0]), int(lo[i, 1]), int(hi[i, 0]), int(hi[i, 1])),
                    iod_px=float(iod[i]),
                    level=level,
                    src_xy=self._source_xy[level],
                    points=meshes[i],
                    hidden=hidden[k],  # type: ignore[index]
                    hull=mask_outline(meshes[i], self.topology.face_oval, self.forehead_keep),
                )
            )
            k += 1
        return plans

    def swap_face(self, frame: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Warp, colour-match and blend the source onto one target mesh; a new frame and its mask."""
        if self._batched is not None:
            with torch.inference_mode():
                outs, masks = self._batched.composite(frame[None], [[self._plan(frame.shape[:2], points)]])
            return outs[0], masks[0]
        out = frame.copy()
        mask = np.zeros(frame.shape[:2], dtype=np.float32)
        if self._compositor is None:
            self.swap_face_into(out, mask, points)
            return out, mask
        plan = self._plan(frame.shape[:2], points)
        if plan is not None:
            with torch.inference_mode():
                canvas = DeviceCanvas(out, plan.window, self._compositor.device)
                self._compositor.composite(canvas, plan)
                canvas.write_back(out, mask)
        return out, mask

    def swap_face_into(self, frame: np.ndarray, union: np.ndarray, points: np.ndarray) -> None:
        """Blend the source onto one target mesh in place (cv2); ``union`` gathers the blend mask (max)."""
        plan = self._plan(frame.shape[:2], points)
        if plan is None:
            return
        x0, y0, x1, y1 = plan.window
        origin, shape = (x0, y0), (y1 - y0, x1 - x0)
        iod, hidden = plan.iod_px, plan.hidden
        tris = self.topology.triangles
        xy = points[:, :2]
        raster = rasterise_mesh(points, tris, origin, shape)
        tri_map = raster.tri_map
        covered = tri_map >= 0
        warped = warp_through(self._pyramid[plan.level], plan.src_xy, xy, tris, raster)
        region = polygon_mask(plan.hull, origin, shape)
        mask = feather_inside(region, self.feather_frac * iod)
        # keep the target where the source cannot supply the surface, and inside the target's mouth
        keep_target = hidden[np.maximum(tri_map, 0)] * covered
        if self.mouth_mask != "off":
            start, stop = self.topology.groups["mouth"]
            mouth = ((tri_map >= start) & (tri_map < stop)).astype(np.float32)
            loop = self.topology.lips_outer if self.mouth_mask == "lips" else self.topology.lips_inner
            mouth = np.maximum(mouth, polygon_mask(xy[loop], origin, shape))
            radius = max(1, round(self.mouth_margin_frac * iod))
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
            keep_target = np.maximum(keep_target, cv2.dilate(mouth, kernel))
        keep_target = cv2.GaussianBlur(keep_target.astype(np.float32), (0, 0), sigmaX=max(0.04 * iod, 0.5))
        mask *= 1.0 - np.clip(keep_target * 1.5, 0.0, 1.0)
        mask[mask < MASK_EPS] = 0.0
        if not mask.any():
            return
        roi = frame[y0:y1, x0:x1]
        warped = match_colour(warped, roi, region * (mask > 0), self.colour_sigma_frac * iod)
        m = mask[..., None]
        blended = np.clip(roi.astype(np.float32) * (1.0 - m) + warped.astype(np.float32) * m + 0.5, 0, 255)
        roi[...] = np.where(m > 0, blended.astype(np.uint8), roi)
        np.maximum(union[y0:y1, x0:x1], mask, out=union[y0:y1, x0:x1])
