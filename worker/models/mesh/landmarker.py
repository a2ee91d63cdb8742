"""MediaPipe's 468-point face mesh on rotated square crops, batched over all faces of a batch of frames.

The crop recipe copies MediaPipe's legacy FaceMesh graph: a square ROI rotated to the eye line, 1.5x the
face, warped to 192x192 with replicated borders, RGB in [0,1]. Points come back in frame pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from shared.model_store import require_file
from worker.models.faces import Face
from worker.models.mesh.blend_torch import upload
from worker.models.mesh.tflite_loader import TfliteModule, load_tflite

LANDMARK_FILE = "face_landmark.tflite"
INPUT_PX = 192
POINTS = 468
ROI_SCALE = 1.5
# Mesh indices MediaPipe uses for the tracking ROI's rotation (outer eye corners, image-left first).
EYE_CORNER_LEFT_IMG, EYE_CORNER_RIGHT_IMG = 33, 263


@dataclass(frozen=True)
class FaceRoi:
    """A square crop rotated so the eyes are level: what the landmark net sees for one face."""

    frame_index: int
    centre_x: float
    centre_y: float
    side_px: float
    angle_rad: float  # direction of the eye line (image-left eye -> image-right eye), y down

    def crop_matrix(self, size_px: int = INPUT_PX) -> np.ndarray:
        """(2,3) affine taking frame pixels to crop pixels (crop x runs along the eye line)."""
        c, s = math.cos(self.angle_rad), math.sin(self.angle_rad)
        k = size_px / self.side_px
        rot = np.array([[c, s], [-s, c]]) * k
        t = np.array([size_px / 2.0, size_px / 2.0]) - rot @ np.array([self.centre_x, self.centre_y])
        return np.concatenate([rot, t[:, None]], axis=1)


def eye_line_angle(left_eye: np.ndarray, right_eye: np.ndarray) -> float:
    """Angle of the eye line in y-down image coordinates (0 = level)."""
    d = np.asarray(right_eye, np.float64) - np.asarray(left_eye, np.float64)
    return math.atan2(float(d[1]), float(d[0]))


def roi_from_face(face: Face, frame_index: int) -> FaceRoi:
    """Seed crop from an MTCNN face: box centre and size, rotation from its two eye points."""
    x1, y1, x2, y2 = (float(v) for v in face.box)
    angle = eye_line_angle(face.landmarks[0], face.landmarks[1])
    side = ROI_SCALE * max(x2 - x1, y2 - y1)
    return FaceRoi(frame_index, (x1 + x2) / 2.0, (y1 + y2) / 2.0, side, angle)


def roi_from_points(points: np.ndarray, frame_index: int) -> FaceRoi:
    """MediaPipe's tracking ROI: bounding box of the mesh, 1.5x, square, rotated by points 33 -> 263."""
    xy = np.asarray(points, np.float64)[:, :2]
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    angle = eye_line_angle(xy[EYE_CORNER_LEFT_IMG], xy[EYE_CORNER_RIGHT_IMG])
    side = ROI_SCALE * float(max(hi - lo))
    centre = (lo + hi) / 2.0
    return FaceRoi(frame_index, float(centre[0]), float(centre[1]), side, angle)


def cut_crop(frame: np.ndarray, roi: FaceRoi) -> np.ndarray:
    """The 192x192 RGB crop for one ROI (bilinear, replicated border, as MediaPipe does)."""
    return cv2.warpAffine(
        frame,
        roi.crop_matrix(),
        (INPUT_PX, INPUT_PX),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )


def roi_params(rois: Sequence[FaceRoi]) -> np.ndarray:
    """(R,4) float64 rows (centre x, centre y, side, angle): ``FaceRoi`` fields as one array."""
    return np.array([[r.centre_x, r.centre_y, r.side_px, r.angle_rad] for r in rois], np.float64).reshape(
        -1, 4
    )


def crop_matrices(params: torch.Tensor, size_px: int = INPUT_PX) -> torch.Tensor:
    """(R,2,3) float64 frame-to-crop affines of (R,4) ROI params: ``FaceRoi.crop_matrix`` for many."""
    cx, cy, side, angle = params.unbind(1)
    c, s, k = torch.cos(angle), torch.sin(angle), size_px / side
    half = size_px / 2.0
    m = torch.stack([c * k, s * k, -s * k, c * k], dim=1).view(-1, 2, 2)
    t = half - (m @ torch.stack([cx, cy], dim=1)[..., None])[..., 0]
    return torch.cat([m, t[..., None]], dim=2)


def invert_affines(m: torch.Tensor) -> torch.Tensor:
    """(R,2,3) inverses, by ``cv2.invertAffineTransform``'s formula (the one ``cv2.warpAffine`` uses)."""
    m00, m01, m02 = m[:, 0].unbind(1)
    m10, m11, m12 = m[:, 1].unbind(1)
    det = m00 * m11 - m01 * m10
    d = torch.where(det != 0, 1.0 / torch.where(det != 0, det, 1.0), 0.0)
    a11, a22, a12, a21 = m11 * d, m00 * d, -m01 * d, -m10 * d
    b1 = -a11 * m02 - a12 * m12
    b2 = -a21 * m02 - a22 * m12
    return torch.stack([a11, a12, b1, a21, a22, b2], dim=1).view(-1, 2, 3)


def warp_crops(
    frames: torch.Tensor, frame_index: torch.Tensor, inverse: torch.Tensor, size_px: int
) -> torch.Tensor:
    """(R,S,S,3) uint8 crops of (N,H,W,3) uint8 ``frames``: ``cut_crop`` for many ROIs in one pass.

    ``inverse`` (R,2,3) maps crop pixels to frame pixels. Float32 bilinear taps clamped to the frame
    (BORDER_REPLICATE), rounded: OpenCV's own warpAffine arithmetic since its float kernels (4.11), so
    a crop equals the host's but for about one value in 10,000, off by one grey level.
    """
    n, h, w, _ = frames.shape
    dev = frames.device
    grid = torch.arange(size_px, device=dev, dtype=torch.float32)
    m = inverse.to(torch.float32)
    sx = m[:, 0, 0, None, None] * grid + m[:, 0, 1, None, None] * grid[:, None] + m[:, 0, 2, None, None]
    sy = m[:, 1, 0, None, None] * grid + m[:, 1, 1, None, None] * grid[:, None] + m[:, 1, 2, None, None]
    x0, y0 = torch.floor(sx), torch.floor(sy)
    ax, ay = (sx - x0)[..., None], (sy - y0)[..., None]
    x0i, y0i = x0.to(torch.int64), y0.to(torch.int64)
    flat = frames.reshape(-1, 3)
    base = frame_index.to(torch.int64)[:, None, None] * h

    def tap(dy: int, dx: int) -> torch.Tensor:
        rows = (y0i + dy).clamp(0, h - 1) + base
        return flat[rows * w + (x0i + dx).clamp(0, w - 1)].to(torch.float32)  # (R,S,S,3)

    top = tap(0, 0) * (1.0 - ax) + tap(0, 1) * ax
    bottom = tap(1, 0) * (1.0 - ax) + tap(1, 1) * ax
    return torch.round(top * (1.0 - ay) + bottom * ay).clamp(0, 255).to(torch.uint8)


def rois_from_meshes(points: torch.Tensor) -> torch.Tensor:
    """(R,4) ROI params of (R,468,3) meshes in frame pixels: ``roi_from_points`` for many, on the device."""
    xy = points[..., :2]
    lo, hi = xy.amin(dim=1), xy.amax(dim=1)
    d = xy[:, EYE_CORNER_RIGHT_IMG] - xy[:, EYE_CORNER_LEFT_IMG]
    angle = torch.atan2(d[:, 1], d[:, 0])
    side = ROI_SCALE * (hi - lo).amax(dim=1)
    centre = (lo + hi) / 2.0
    return torch.stack([centre[:, 0], centre[:, 1], side, angle], dim=1)


def project_points(crop_points: np.ndarray, roi: FaceRoi) -> np.ndarray:
    """Crop-pixel (x, y, z) -> frame pixels; z scales with the crop like x and y."""
    inv = cv2.invertAffineTransform(roi.crop_matrix())
    out = np.empty_like(crop_points, dtype=np.float64)
    out[:, :2] = crop_points[:, :2] @ inv[:, :2].T + inv[:, 2]
    out[:, 2] = crop_points[:, 2] * roi.side_px / INPUT_PX
    return out


def load_landmark_net(
    store: Path, device: torch.device | str, dtype: torch.dtype = torch.float32
) -> TfliteModule:
    """The face_landmark.tflite graph as a torch module on ``device`` (channels_last, ``dtype``)."""
    net = load_tflite(require_file(store, LANDMARK_FILE))
    net = net.to(device=torch.device(device), dtype=dtype)
    return net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


class FaceMeshLandmarker:
    """468 landmarks per face crop; every crop of a call runs through the network as one batch."""

    def __init__(
        self,
        store: Path,
        device: torch.device | str,
        *,
        dtype: torch.dtype = torch.float32,
        max_batch: int = 64,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_batch = max_batch
        self.net = load_landmark_net(store, self.device, dtype)

    @torch.inference_mode()
    def run_crops(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw net outputs for (N,192,192,3) uint8 crops: points (N,468,3) in crop px and presence (N,)."""
        if not len(crops):
            return np.zeros((0, POINTS, 3), np.float32), np.zeros((0,), np.float32)
        # pinned and queued: a pageable upload waits behind other threads' pageable copies
        both = self._forward(upload(crops, self.device)).cpu().numpy()  # one device sync for every chunk
        return both[:, :-1].reshape(-1, POINTS, 3), np.ascontiguousarray(both[:, -1])

    def _forward(self, crops: torch.Tensor) -> torch.Tensor:
        """(N, 468*3+1) float32 on the device: each (192,192,3) uint8 crop's points then presence."""
        outputs = []
        for start in range(0, len(crops), self.max_batch):
            chunk = crops[start : start + self.max_batch]
            n = len(chunk)
            x = chunk.permute(0, 3, 1, 2).to(self.dtype).div_(255.0)
            # a few batch sizes only: cuDNN builds its plans once per conv shape, and a new face count
            # every batch made the first chunks of a worker 3x slower on an H200 (bench/RESULTS.md)
            x = F.pad(x, (0, 0, 0, 0, 0, 0, 0, batch_bucket(n) - n))
            x = x.contiguous(memory_format=torch.channels_last)
            mesh, flag = self.net(x)
            presence = torch.sigmoid(flag.float().reshape(-1, 1))
            outputs.append(torch.cat([mesh.float().reshape(-1, POINTS * 3), presence], 1)[:n])
        return torch.cat(outputs)

    def _points_on_device(
        self, frames: torch.Tensor, frame_index: torch.Tensor, params: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass of the net over device crops: points (R,468,3) float64 in frame pixels, presence (R,)."""
        inverse = invert_affines(crop_matrices(params))
        raw = self._forward(warp_crops(frames, frame_index, inverse, INPUT_PX))
        crop_points = raw[:, :-1].reshape(-1, POINTS, 3).to(torch.float64)
        xy = crop_points[..., :2] @ inverse[:, :, :2].transpose(1, 2) + inverse[:, None, :, 2]
        z = crop_points[..., 2:] * (params[:, 2, None, None] / INPUT_PX)
        return torch.cat([xy, z], dim=2), raw[:, -1]

    @torch.inference_mode()
    def landmarks_refined_on_device(
        self, frames: torch.Tensor, crops: Sequence[FaceRoi]
    ) -> tuple[np.ndarray, np.ndarray, list[FaceRoi]]:
        """``landmarks_refined`` for (N,H,W,3) uint8 frames already on the device.

        The crops, both net passes and the second ROIs stay on the device, so the whole refinement
        costs one sync; on the host, the two rounds of cv2.warpAffine crops were the largest share of
        the render worker's face thread (bench/RESULTS.md, fifth and sixth sessions).
        """
        if not crops:
            return np.zeros((0, POINTS, 3), np.float64), np.zeros((0,), np.float32), []
        dev = frames.device
        index = upload(np.array([r.frame_index for r in crops], np.int64), dev)
        first, _ = self._points_on_device(frames, index, upload(roi_params(crops), dev))
        params = rois_from_meshes(first)
        points, presence = self._points_on_device(frames, index, params)
        host = torch.cat([points.reshape(-1), presence.to(torch.float64), params.reshape(-1)]).cpu().numpy()
        r = len(crops)
        points_np = host[: r * POINTS * 3].reshape(r, POINTS, 3)
        presence_np = host[r * POINTS * 3 : r * POINTS * 3 + r].astype(np.float32)
        second = [
            FaceRoi(roi.frame_index, float(cx), float(cy), float(side), float(angle))
            for roi, (cx, cy, side, angle) in zip(
                crops, host[r * POINTS * 3 + r :].reshape(r, 4), strict=True
            )
        ]
        return points_np, presence_np, second

    def landmarks(
        self, frames: Sequence[np.ndarray] | np.ndarray, crops: Sequence[FaceRoi]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Points (N,468,3) in frame pixels and presence (N,) in [0,1], one row per crop ROI."""
        if not crops:
            return np.zeros((0, POINTS, 3), np.float64), np.zeros((0,), np.float32)
        images = np.stack([cut_crop(frames[roi.frame_index], roi) for roi in crops])
        raw, presence = self.run_crops(images)
        points = np.stack([project_points(p, roi) for p, roi in zip(raw, crops, strict=True)])
        return points, presence

    def landmarks_refined(
        self, frames: Sequence[np.ndarray] | np.ndarray, crops: Sequence[FaceRoi]
    ) -> tuple[np.ndarray, np.ndarray, list[FaceRoi]]:
        """Two batched passes: seed crops, then MediaPipe's tracking ROI from the first pass's mesh.

        The second crop matches what the net was trained on far better than any detector box does.
        """
        points, presence = self.landmarks(frames, crops)
        second = [roi_from_points(p, roi.frame_index) for p, roi in zip(points, crops, strict=True)]
        points2, presence2 = self.landmarks(frames, second)
        return points2, presence2, second


def batch_bucket(n: int) -> int:
    """``n`` rounded up to a power of two up to 16, then to a multiple of 16."""
    if n <= 16:
        return 1 << max(n - 1, 0).bit_length()
    return -(-n // 16) * 16


def benchmark_landmarks(
    device: str = "cuda",
    batch: int = 16,
    dtype: str = "float16",
    *,
    store: Path | None = None,
    iterations: int = 50,
    compile_net: bool = False,
) -> dict[str, float | int | str]:
    """Landmark-net throughput on random 192x192 crops: ms per batch and faces per second.

    Random weights are never used: the real net from ``store`` (default: settings' model store).
    """
    import time

    if store is None:
        from shared.settings import get_settings

        store = Path(get_settings().model_store)
    torch_dtype = getattr(torch, dtype)
    dev = torch.device(device)
    net = load_landmark_net(store, dev, torch_dtype)
    if compile_net:
        net = torch.compile(net)  # type: ignore[assignment]
    x = torch.rand(batch, 3, INPUT_PX, INPUT_PX, device=dev, dtype=torch_dtype)
    x = x.contiguous(memory_format=torch.channels_last)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    with torch.inference_mode():
        for _ in range(5):
            net(x)
        sync()
        start = time.perf_counter()
        for _ in range(iterations):
            net(x)
        sync()
        elapsed = time.perf_counter() - start
    ms_per_batch = 1000.0 * elapsed / iterations
    return {
        "device": str(dev),
        "dtype": dtype,
        "batch": batch,
        "compiled": int(compile_net),
        "ms_per_batch": ms_per_batch,
        "faces_per_s": batch * 1000.0 / ms_per_batch,
    }
