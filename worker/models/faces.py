"""Shared face types and the swapper protocol: what detectors return and swappers consume."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Face:
    """One detected face in frame pixels; landmarks in insightface's 5-point order."""

    box: np.ndarray  # (4,) float32 x1,y1,x2,y2 in frame pixels
    score: float
    landmarks: np.ndarray  # (5,2) float32: left eye, right eye, nose, left mouth, right mouth

    @property
    def area_px(self) -> float:
        """Box area, used to pick the largest face."""
        w = float(self.box[2] - self.box[0])
        h = float(self.box[3] - self.box[1])
        return max(w, 0.0) * max(h, 0.0)

    @property
    def size_px(self) -> float:
        """The shorter box side: what 'face too small' limits compare against."""
        return min(float(self.box[2] - self.box[0]), float(self.box[3] - self.box[1]))


@dataclass
class SwapOutput:
    """One swapped frame; pixels where ``mask == 0`` are bit-identical to the input."""

    frame: np.ndarray  # (H,W,3) uint8 RGB result
    mask: np.ndarray  # (H,W) float32 in [0,1]: union of blend masks (0 = pixel untouched)
    paths: list[str]  # per face, which path swapped it, e.g. "classic", "mesh", "inswapper"


class Swapper(Protocol):
    """Swaps the source identity onto the given faces of a batch of frames."""

    name: str

    def swap_batch(self, frames: np.ndarray, faces: Sequence[Sequence[Face]]) -> list[SwapOutput]: ...


@runtime_checkable
class StagedSwapper(Protocol):
    """A swapper whose batch work splits in two: ``track_batch`` keeps state across batches (tracks,
    smoothing), so it runs once per batch in frame order; ``blend_batch`` reads only its arguments and
    the swapper's constants, so several batches may blend at once in other threads (the render
    worker's blend pool). ``swap_batch`` is the two in a row. ``frames_on_device``: the batch already
    on the swapper's device (a tensor, ``FramesOnDevice``), or None. ``in_place``: ``blend_batch`` may
    write the swapped frames into ``frames`` (the caller gives its batch up)."""

    name: str

    def swap_batch(self, frames: np.ndarray, faces: Sequence[Sequence[Face]]) -> list[SwapOutput]: ...

    def track_batch(
        self, frames: np.ndarray, faces: Sequence[Sequence[Face]], frames_on_device: Any = None
    ) -> Any: ...

    def blend_batch(
        self, frames: np.ndarray, faces: Sequence[Sequence[Face]], tracked: Any, in_place: bool = False
    ) -> list[SwapOutput]: ...


class FaceDetector(Protocol):
    """Finds faces in a batch of same-size RGB frames ((N,H,W,3) uint8); MTCNN and SCRFD implement it."""

    def detect(self, frames: np.ndarray) -> list[list[Face]]: ...
