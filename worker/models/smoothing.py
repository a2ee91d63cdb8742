"""Temporal landmark smoothing: an IoU tracker with a One-Euro filter per tracked face.

Per-frame detections jitter by a pixel or two, which makes a pasted face shimmer. The One-Euro
filter (Casiez et al., CHI 2012) smooths hard when the face is still and follows quickly when it
moves. Chunks start with warm-up frames that feed the same state, so chunk joins do not jump.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from worker.models.faces import Face


def _alpha(cutoff: float) -> float:
    """Smoothing factor for a cutoff in cycles per frame (time step = one frame)."""
    tau = 1.0 / (2.0 * math.pi * cutoff)
    return 1.0 / (1.0 + tau)


@dataclass
class OneEuroFilter:
    """One-Euro filter over a vector; one cutoff for all values keeps the face shape rigid.

    Speeds are divided by ``scale`` (the face size) so the parameters do not depend on resolution.
    """

    min_cutoff: float = 0.04
    beta: float = 12.0
    d_cutoff: float = 0.1
    _x: np.ndarray | None = None
    _dx: np.ndarray | None = None

    def __call__(self, x: np.ndarray, scale: float) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if self._x is None or self._dx is None:
            self._x = x.copy()
            self._dx = np.zeros_like(x)
            return x
        a_d = _alpha(self.d_cutoff)
        dx = a_d * (x - self._x) + (1.0 - a_d) * self._dx
        speed = float(np.mean(np.abs(dx))) / max(scale, 1e-6)
        a = _alpha(self.min_cutoff + self.beta * speed)
        self._x = a * x + (1.0 - a) * self._x
        self._dx = dx
        return self._x.copy()


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two x1,y1,x2,y2 boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


@dataclass
class _Track:
    track_id: int
    box: np.ndarray
    filter: OneEuroFilter
    missed: int = 0


@dataclass
class FaceSmoother:
    """Tracks faces across consecutive frames by IoU and smooths each track's box and landmarks."""

    min_iou: float = 0.3
    max_missed: int = 2
    min_cutoff: float = 0.04
    beta: float = 12.0
    d_cutoff: float = 0.1
    _tracks: list[_Track] = field(default_factory=list)
    _next_id: int = 0

    def reset(self) -> None:
        """Forget all tracks (a scene cut, or a new chunk without warm-up)."""
        self._tracks.clear()

    def update(self, faces: list[Face]) -> list[Face]:
        """Feed one frame's detections (in order); returns the smoothed faces in the same order."""
        pairs = sorted(
            (
                (box_iou(t.box, f.box), ti, fi)
                for ti, t in enumerate(self._tracks)
                for fi, f in enumerate(faces)
            ),
            reverse=True,
        )
        track_for: dict[int, _Track] = {}
        used_tracks: set[int] = set()
        for iou, ti, fi in pairs:
            if iou < self.min_iou:
                break
            if ti in used_tracks or fi in track_for:
                continue
            used_tracks.add(ti)
            track_for[fi] = self._tracks[ti]
        for ti, old in enumerate(self._tracks):
            if ti not in used_tracks:
                old.missed += 1
        self._tracks = [t for t in self._tracks if t.missed <= self.max_missed]

        smoothed: list[Face] = []
        for fi, face in enumerate(faces):
            found = track_for.get(fi)
            if found is None:
                found = _Track(
                    self._next_id, face.box, OneEuroFilter(self.min_cutoff, self.beta, self.d_cutoff)
                )
                self._next_id += 1
                self._tracks.append(found)
            track = found
            track.missed = 0
            track.box = face.box
            size = math.sqrt(max(face.area_px, 1.0))
            vec = np.concatenate([face.box.astype(np.float64), face.landmarks.astype(np.float64).ravel()])
            out = track.filter(vec, size)
            smoothed.append(
                Face(
                    box=out[:4].astype(np.float32),
                    score=face.score,
                    landmarks=out[4:].reshape(5, 2).astype(np.float32),
                )
            )
        return smoothed

    @property
    def track_count(self) -> int:
        return len(self._tracks)
