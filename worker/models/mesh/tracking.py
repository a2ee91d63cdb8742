"""Per-face landmark smoothing across frames: a One-Euro filter keyed by a simple IoU track.

Still faces jitter by a fraction of a pixel from frame to frame (compression noise moves the net's
output); the One-Euro filter removes that while its cutoff rises with speed, so real motion (a turning
head, a mouth opening) is followed without lag. Units are per frame and per inter-ocular distance, so the
same settings work at any resolution and frame rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def _alpha(cutoff_per_frame: np.ndarray | float) -> np.ndarray | float:
    """Smoothing factor of a first-order low-pass at ``cutoff`` cycles per frame (1 frame step)."""
    tau = 1.0 / (2.0 * math.pi * np.asarray(cutoff_per_frame))
    return 1.0 / (1.0 + tau)


@dataclass
class OneEuroPoints:
    """One-Euro filter over an (P,D) point set; speed is measured per point in face-scale units."""

    min_cutoff: float = 0.04  # cycles/frame when still: strong smoothing
    beta: float = 25.0  # cutoff gain per (face scale / frame) of speed
    d_cutoff: float = 0.1  # smoothing of the speed estimate itself
    _x: np.ndarray | None = None
    _dx: np.ndarray | None = None

    def __call__(self, points: np.ndarray, scale_px: float) -> np.ndarray:
        """The smoothed points for this frame; ``scale_px`` is the face's size unit (inter-ocular px)."""
        x = np.asarray(points, dtype=np.float64)
        if self._x is None or self._x.shape != x.shape:
            self._x, self._dx = x.copy(), np.zeros_like(x)
            return x.copy()
        assert self._dx is not None
        dx = x - self._x
        self._dx = self._dx + _alpha(self.d_cutoff) * (dx - self._dx)
        speed = np.linalg.norm(self._dx[:, :2], axis=1, keepdims=True) / max(scale_px, 1e-6)
        # a point's cutoff follows the faster of its own and the whole face's motion: a moving head
        # moves every point together, while an opening mouth moves only its own points
        speed = np.maximum(speed, float(np.median(speed)))
        a = _alpha(self.min_cutoff + self.beta * speed)
        self._x = self._x + a * (x - self._x)
        return self._x.copy()


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two x1,y1,x2,y2 boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


@dataclass
class Track:
    """One face followed across frames: its last box, its smoother, when it was last seen."""

    box: np.ndarray
    last_frame: int
    smoother: OneEuroPoints = field(default_factory=OneEuroPoints)


class FaceTracker:
    """Greedy IoU matching of each frame's faces to the tracks seen in the previous frames."""

    def __init__(self, *, iou_min: float = 0.3, max_gap_frames: int = 2) -> None:
        self.iou_min = iou_min
        self.max_gap_frames = max_gap_frames
        self.tracks: list[Track] = []
        self.frame = -1

    def assign(self, boxes: list[np.ndarray]) -> list[Track]:
        """Advance one frame; the track of each box (new tracks for faces that match none)."""
        self.frame += 1
        self.tracks = [t for t in self.tracks if self.frame - t.last_frame <= self.max_gap_frames]
        pairs = sorted(
            ((box_iou(b, t.box), bi, ti) for bi, b in enumerate(boxes) for ti, t in enumerate(self.tracks)),
            reverse=True,
        )
        chosen: dict[int, Track] = {}
        used: set[int] = set()
        for iou, bi, ti in pairs:
            if iou < self.iou_min:
                break
            if bi in chosen or ti in used:
                continue
            chosen[bi] = self.tracks[ti]
            used.add(ti)
        out = []
        for bi, b in enumerate(boxes):
            track = chosen.get(bi)
            if track is None:
                track = Track(box=np.asarray(b, np.float64), last_frame=self.frame)
                self.tracks.append(track)
            track.box = np.asarray(b, np.float64)
            track.last_frame = self.frame
            out.append(track)
        return out
