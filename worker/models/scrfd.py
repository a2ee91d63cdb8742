"""SCRFD face detector (user-supplied insightface ``det_10g.onnx``) with MTCNN's ``detect()`` API.

Decoding follows insightface's ``SCRFD.detect``: letterbox to 640x640 (top-left), (x-127.5)/128
RGB, per stride 8/16/32 anchors at cell corners (2 per cell), distances times stride, NMS 0.4.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from shared.errors import ModelStoreError
from shared.model_store import require_file
from worker.models.faces import Face
from worker.models.onnx_torch import convert_onnx, load_onnx

SCRFD_FILE = "det_10g.onnx"
STRIDES = (8, 16, 32)


def anchor_centers(height: int, width: int, stride: int, num_anchors: int) -> np.ndarray:
    """(H/stride * W/stride * num_anchors, 2) anchor points in input pixels, row-major, x first."""
    ys, xs = np.mgrid[: height // stride, : width // stride]
    centers = (np.stack([xs, ys], axis=-1).astype(np.float32) * stride).reshape(-1, 2)
    if num_anchors > 1:
        centers = np.repeat(centers, num_anchors, axis=0)
    return centers


def decode_scrfd(
    outputs: list[np.ndarray], input_hw: tuple[int, int], *, threshold: float, num_anchors: int = 2
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes (K,4), scores (K,), keypoints (K,5,2) in input pixels from SCRFD's 9 outputs.

    Output order: scores@8,16,32, boxes@8,16,32, keypoints@8,16,32 (each with or without batch 1).
    """
    fmc = len(STRIDES)
    all_boxes, all_scores, all_kps = [], [], []
    h, w = input_hw
    for idx, stride in enumerate(STRIDES):
        scores = outputs[idx].reshape(-1)
        dist = outputs[idx + fmc].reshape(-1, 4) * stride
        kps = outputs[idx + 2 * fmc].reshape(-1, 10) * stride
        centers = anchor_centers(h, w, stride, num_anchors)
        keep = np.flatnonzero(scores >= threshold)
        c = centers[keep]
        d = dist[keep]
        boxes = np.stack([c[:, 0] - d[:, 0], c[:, 1] - d[:, 1], c[:, 0] + d[:, 2], c[:, 1] + d[:, 3]], axis=1)
        k = kps[keep].reshape(-1, 5, 2) + c[:, None, :]
        all_boxes.append(boxes)
        all_scores.append(scores[keep])
        all_kps.append(k)
    return np.concatenate(all_boxes), np.concatenate(all_scores), np.concatenate(all_kps)


def nms_plus_one(boxes: np.ndarray, scores: np.ndarray, iou_max: float) -> np.ndarray:
    """insightface's NMS (areas with +1 px)."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        order = rest[inter / (areas[i] + areas[rest] - inter) <= iou_max]
    return np.asarray(keep, dtype=np.int64)


class ScrfdDetector:
    """Detects faces with SCRFD; one network call per frame (the ONNX output has no batch axis)."""

    name = "scrfd"

    def __init__(
        self,
        path: Path,
        device: torch.device | str,
        *,
        threshold: float = 0.5,
        input_px: int = 640,
        nms_iou: float = 0.4,
    ) -> None:
        self.device = torch.device(device)
        self.threshold = threshold
        self.input_px = input_px
        self.nms_iou = nms_iou
        graph = load_onnx(path, purpose="SCRFD")
        if len(graph.graph.output) != 9:
            raise ModelStoreError(
                f"{path} has {len(graph.graph.output)} outputs; SCRFD with keypoints has 9 ({SCRFD_FILE})"
            )
        self.onnx_model = graph
        self.module = convert_onnx(graph, self.device, check_batch=0)

    @classmethod
    def from_store(cls, store: Path, device: torch.device | str, **kwargs: float) -> ScrfdDetector:
        return cls(require_file(Path(store), SCRFD_FILE), device, **kwargs)  # type: ignore[arg-type]

    def _letterbox(self, frame: np.ndarray) -> tuple[np.ndarray, float]:
        h, w = frame.shape[:2]
        scale = self.input_px / max(h, w)
        new_w, new_h = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
        canvas = np.zeros((self.input_px, self.input_px, 3), dtype=np.uint8)
        canvas[:new_h, :new_w] = cv2.resize(frame, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        return canvas, new_h / h

    @torch.inference_mode()
    def detect(self, frames: np.ndarray) -> list[list[Face]]:
        """Faces per frame, largest first; ``frames`` is (N,H,W,3) uint8 RGB."""
        if frames.ndim == 3:
            frames = frames[None]
        results: list[list[Face]] = []
        for frame in frames:
            canvas, scale = self._letterbox(frame)
            x = torch.from_numpy(canvas).to(self.device).permute(2, 0, 1)[None].float()
            x = (x - 127.5) / 128.0
            raw = self.module(x)
            outs = [o.float().cpu().numpy() for o in (raw if isinstance(raw, tuple | list) else (raw,))]
            boxes, scores, kps = decode_scrfd(outs, (self.input_px, self.input_px), threshold=self.threshold)
            keep = nms_plus_one(boxes, scores, self.nms_iou) if len(boxes) else np.zeros(0, dtype=np.int64)
            faces = [
                Face(
                    box=(boxes[i] / scale).astype(np.float32),
                    score=float(scores[i]),
                    landmarks=(kps[i] / scale).astype(np.float32),
                )
                for i in keep
            ]
            faces.sort(key=lambda f: -f.area_px)
            results.append(faces)
        return results
