"""The ``classic`` swapper: geometric 5-point alignment, colour transfer and a feathered blend.

Honest about its limits: the source face keeps its own expression; only pose (similarity),
lighting (LAB statistics) and placement follow the target.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from shared.cpus import usable_cpu_count
from worker.models.align import (
    align_matrix,
    crop_size_for,
    face_mask,
    paste_back,
    transfer_colour_lab,
    warp_face,
)
from worker.models.faces import Face, SwapOutput
from worker.models.source_face import SourceFace


class ClassicSwapper:
    """Pastes the aligned source face over every given target face."""

    name = "classic"

    def __init__(self, source: SourceFace, *, poisson: bool = False, colour_transfer: bool = True) -> None:
        self.source = source
        self.poisson = poisson
        self.colour_transfer = colour_transfer
        self._source_crops: dict[int, np.ndarray] = {}
        self._masks: dict[int, np.ndarray] = {}

    def _source_crop(self, size_px: int) -> np.ndarray:
        if size_px not in self._source_crops:
            crop, _ = warp_face(self.source.image, self.source.face.landmarks, size_px)
            self._source_crops[size_px] = crop
        return self._source_crops[size_px]

    def _mask(self, size_px: int) -> np.ndarray:
        if size_px not in self._masks:
            self._masks[size_px] = face_mask(size_px)
        return self._masks[size_px]

    def swap_face(self, frame: np.ndarray, face: Face) -> tuple[np.ndarray, np.ndarray]:
        """Swap one face; returns the new frame and this face's full-frame mask."""
        size = crop_size_for(face.landmarks)
        frame_to_crop = align_matrix(face.landmarks, size)
        if not np.all(np.isfinite(frame_to_crop)):
            return frame, np.zeros(frame.shape[:2], dtype=np.float32)
        mask = self._mask(size)
        crop = self._source_crop(size)
        if self.colour_transfer:
            target_crop, _ = warp_face(frame, face.landmarks, size)
            crop = transfer_colour_lab(crop, target_crop, mask)
        return paste_back(frame, crop, mask, frame_to_crop, poisson=self.poisson)

    def swap_batch(self, frames: np.ndarray, faces: Sequence[Sequence[Face]]) -> list[SwapOutput]:
        """Frames are independent here, so they are swapped side by side (OpenCV releases the GIL)."""
        pairs = list(zip(frames, faces, strict=True))
        busy = sum(1 for _, frame_faces in pairs if frame_faces)
        if busy > 1 and frames[0].size >= _PARALLEL_MIN_PIXELS * 3:
            return list(_swap_pool().map(lambda pair: self._swap_frame(*pair), pairs))
        return [self._swap_frame(frame, frame_faces) for frame, frame_faces in pairs]

    def _swap_frame(self, frame: np.ndarray, frame_faces: Sequence[Face]) -> SwapOutput:
        out = frame
        union = np.zeros(frame.shape[:2], dtype=np.float32)
        for face in frame_faces:
            out, mask = self.swap_face(out, face)
            np.maximum(union, mask, out=union)
        if out is frame:
            out = frame.copy()
        return SwapOutput(frame=out, mask=union, paths=[self.name] * len(frame_faces))


_PARALLEL_MIN_PIXELS = 640 * 360
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _swap_pool() -> ThreadPoolExecutor:
    """One pool per process for per-frame swaps of large frames (made on first use)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            workers = max(1, min(8, usable_cpu_count() - 2))
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="swap")
        return _pool
