"""FaceEngine: what the pipeline calls per decoded batch (detect -> smooth -> select -> swap -> enhance).

One engine serves one chunk (or several, in order). Warm-up frames (``output_mask`` False) feed the
tracker/smoother so the first output frame of a chunk matches the previous chunk's last one.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.errors import GpuOutOfMemoryError, UnknownModelError
from worker.models.align import estimate_similarity, paste_back, square_mask
from worker.models.arcface import ArcFaceEmbedder
from worker.models.detect_mtcnn import MtcnnDetector
from worker.models.faces import Face, FaceDetector, StagedSwapper, Swapper
from worker.models.frames_on_device import FramesOnDevice
from worker.models.selection import create_selector
from worker.models.smoothing import FaceSmoother
from worker.models.source_face import SourceFace, load_source_face

SWAPPER_NAMES = ("classic", "inswapper", "mesh")
DETECTOR_NAMES = ("mtcnn", "scrfd")
# facexlib's FFHQ 512 template (GFPGAN's alignment), insightface landmark order.
FFHQ_512 = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.1936],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    dtype=np.float64,
)


def create_detector(name: str, store: Path, device: torch.device, *, cuda_graph: bool = False) -> FaceDetector:
    """``mtcnn`` (shipped) or ``scrfd`` (user-supplied det_10g.onnx); ``cuda_graph``: MTCNN's first
    stage replayed from CUDA graphs (``MtcnnDetector``), for the render worker's many batches."""
    if name == "mtcnn":
        return MtcnnDetector(store, device, cuda_graph=cuda_graph)
    if name == "scrfd":
        from worker.models.scrfd import ScrfdDetector

        return ScrfdDetector.from_store(store, device)
    raise UnknownModelError(f"unknown face detector {name!r}; choose one of {', '.join(DETECTOR_NAMES)}")


def create_swapper(
    name: str,
    source: SourceFace,
    store: Path,
    device: torch.device,
    *,
    arcface: ArcFaceEmbedder | None = None,
    mesh_compositor: str = "auto",
) -> Swapper:
    """Build the named swapper; ``mesh`` is imported lazily (it lives in its own package).

    ``mesh_compositor`` picks where the mesh swapper blends (``MeshSwapper``'s ``compositor``)."""
    if name == "classic":
        from worker.models.swap_classic import ClassicSwapper

        return ClassicSwapper(source)
    if name == "inswapper":
        from worker.models.inswapper import InswapperSwapper

        return InswapperSwapper.from_store(source, store, device, arcface=arcface)
    if name == "mesh":
        try:
            from worker.models.mesh.swapper import MeshSwapper
        except ImportError as exc:
            raise UnknownModelError(
                f"the mesh swapper is not available in this installation ({exc}); use --swapper classic"
            ) from exc
        return MeshSwapper(source.image, source.face, store, device, compositor=mesh_compositor)  # type: ignore[arg-type,return-value]
    raise UnknownModelError(f"unknown swapper {name!r}; choose one of {', '.join(SWAPPER_NAMES)}")


@dataclass
class SwapWork:
    """One batch between ``FaceEngine.plan_swap`` (in frame order) and ``finish_swap`` (any thread)."""

    frames: np.ndarray
    output_mask: tuple[bool, ...]
    wanted: list[int]  # the frames the swapper sees (output frames, and warm-up ones for a tracker)
    batch: np.ndarray | None = None  # frames[wanted]
    selected: list[list[Face]] = field(default_factory=list)  # per wanted frame, the faces to swap
    tracked: Any = None  # a StagedSwapper's track_batch result (one entry per frame)
    in_place: bool = False  # blend into ``frames`` itself (the caller gave the batch up)

    def split(self, parts: int) -> list[SwapWork]:
        """This batch as up to ``parts`` runs of consecutive frames, each finished on its own: the
        render worker splits a chunk's last batch so that its blend, SR and encode overlap instead of
        running one after another once the face thread is done. A work whose swapper did not see every
        frame (warm-up frames left out) comes back whole."""
        n = len(self.frames)
        if parts <= 1 or n < 2 or self.batch is not self.frames:
            return [self]
        bounds = np.linspace(0, n, min(parts, n) + 1).round().astype(int).tolist()
        works = []
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            view = self.frames[a:b]  # a view: in place, the swap still writes into the caller's batch
            works.append(
                SwapWork(
                    frames=view,
                    output_mask=self.output_mask[a:b],
                    wanted=list(range(b - a)),
                    batch=view,
                    selected=self.selected[a:b],
                    tracked=None if self.tracked is None else self.tracked[a:b],
                    in_place=self.in_place,
                )
            )
        return works


class FaceEngine:
    """Swaps the source face into batches of frames, with tracking state across calls."""

    def __init__(
        self,
        *,
        swapper_name: str,
        source_image: np.ndarray,
        store: Path,
        device: torch.device | str,
        selector: str = "all",
        reference_image: np.ndarray | None = None,
        reference_distance: float = 1.0,
        enhance_crops: Callable[[np.ndarray], np.ndarray] | None = None,
        detect_batch: int = 8,
        detector: str = "mtcnn",
        enhance_size_px: int = 512,
        smoothing: bool = True,
        mesh_compositor: str = "auto",
        detector_cuda_graph: bool = False,
    ) -> None:
        if swapper_name not in SWAPPER_NAMES:
            raise UnknownModelError(
                f"unknown swapper {swapper_name!r}; choose one of {', '.join(SWAPPER_NAMES)}"
            )
        self.device = torch.device(device)
        self.store = Path(store)
        self.detect_batch = max(1, detect_batch)
        self.detector = create_detector(detector, self.store, self.device, cuda_graph=detector_cuda_graph)
        self.source = load_source_face(source_image, self.detector)
        # inswapper and the reference selector share one ArcFace network.
        arcface = ArcFaceEmbedder.from_store(self.store, self.device) if swapper_name == "inswapper" else None
        self.selector = create_selector(
            selector,
            store=self.store,
            device=self.device,
            detector=self.detector,
            reference_image=reference_image,
            reference_distance=reference_distance,
            embedder=arcface,
        )
        self.swapper = create_swapper(
            swapper_name,
            self.source,
            self.store,
            self.device,
            arcface=arcface,
            mesh_compositor=mesh_compositor,
        )
        # The mesh swapper tracks and smooths on its own, so it must see the warm-up frames too.
        self._swap_warmup = swapper_name == "mesh"
        self.smoother = FaceSmoother() if smoothing else None
        self.enhance_crops = enhance_crops
        self.enhance_size_px = enhance_size_px
        self._faces = 0
        self._by_path: Counter[str] = Counter()
        self._seconds: dict[str, float] = {"detect": 0.0, "swap": 0.0}
        self._lock = threading.Lock()
        # On CUDA, detection and the mesh landmarks read one device copy of each batch.
        self._on_device = FramesOnDevice(self.device) if self.device.type == "cuda" else None
        if enhance_crops is not None:
            self._seconds["enhance"] = 0.0

    @property
    def stats(self) -> dict[str, Any]:
        """Faces swapped on output frames, by path, and seconds spent per stage."""
        return {
            "faces": self._faces,
            "faces_by_path": dict(self._by_path),
            "stage_seconds": {
                **self._seconds,
                **{f"swap.{k}": v for k, v in getattr(self.swapper, "seconds", {}).items()},
            },
        }

    def detect(self, frames: np.ndarray) -> list[list[Face]]:
        """Raw detections, in sub-batches of ``detect_batch`` frames."""
        faces: list[list[Face]] = []
        shared = self._on_device is not None and isinstance(self.detector, MtcnnDetector)
        on_device = self._on_device.get(frames) if shared else None  # type: ignore[union-attr]
        for start in range(0, len(frames), self.detect_batch):
            part = slice(start, start + self.detect_batch)
            if on_device is None:
                faces.extend(self.detector.detect(frames[part]))
            else:
                faces.extend(self.detector.detect(frames[part], on_device=on_device[part]))  # type: ignore[call-arg]
        return faces

    def process(self, frames: np.ndarray, output_mask: Sequence[bool]) -> np.ndarray:
        """Swapped frames (N,H,W,3) uint8; frames whose ``output_mask`` is False come back unswapped."""
        if len(output_mask) != len(frames):
            raise ValueError(f"output_mask has {len(output_mask)} entries for {len(frames)} frames")
        return self.swap_found(frames, self.find_faces(frames), output_mask)

    def upload_ahead(self, frames: np.ndarray) -> None:
        """Start this batch's one upload to the device now, from the calling thread (the render worker's
        decoder, ahead of ``find_faces``), so the face thread does not spend its time staging 50 MB
        1080p batches through pinned memory. A no-op off CUDA.

        Best effort: out of device memory, the batch simply goes up later, when detection asks for it
        (where an out-of-memory error is the face stage's, handled as such)."""
        if self._on_device is None:
            return
        with suppress(torch.cuda.OutOfMemoryError):
            self._on_device.get(frames)

    def find_faces(self, frames: np.ndarray) -> list[list[Face]]:
        """The detection half of ``process``: each frame's faces, smoothed over the frames seen so far.

        Stateful (the smoother): call it on every batch, in frame order. It touches nothing that
        ``swap_found`` uses, so a pipeline may run it one batch ahead in another thread.
        """
        t0 = time.perf_counter()
        try:
            detections = self.detect(frames) if len(frames) else []
        except torch.cuda.OutOfMemoryError as exc:
            raise GpuOutOfMemoryError(
                f"CUDA out of memory detecting faces on {self.device} ({len(frames)} frames)"
            ) from exc
        if self.smoother is not None:
            detections = [self.smoother.update(f) for f in detections]
        self._add_seconds("detect", time.perf_counter() - t0)
        return detections

    def swap_found(
        self, frames: np.ndarray, detections: Sequence[list[Face]], output_mask: Sequence[bool]
    ) -> np.ndarray:
        """The swapping half of ``process``, for the faces ``find_faces`` returned for these frames."""
        return self.finish_swap(self.plan_swap(frames, detections, output_mask))

    def plan_swap(
        self,
        frames: np.ndarray,
        detections: Sequence[list[Face]],
        output_mask: Sequence[bool],
        *,
        in_place: bool = False,
    ) -> SwapWork:
        """The in-order half of ``swap_found``: face selection and the swapper's tracking.

        Stateful: call it on every batch, in frame order. ``finish_swap`` then does the rest, and may
        run for several planned batches at once, each in its own thread (the render worker's blend pool).
        ``in_place``: the caller gives ``frames`` up, so ``finish_swap`` may write the swapped frames into
        it and return it (no 50 MB copies per 1080p batch) when a staged swapper sees every frame.
        """
        if len(output_mask) != len(frames) or len(detections) != len(frames):
            raise ValueError(
                f"{len(frames)} frames with {len(output_mask)} output_mask entries and "
                f"{len(detections)} detection lists"
            )
        wanted = [i for i, keep in enumerate(output_mask) if keep or self._swap_warmup]
        work = SwapWork(frames=frames, output_mask=tuple(bool(k) for k in output_mask), wanted=wanted)
        if not wanted:
            return work
        t0 = time.perf_counter()
        # swappers never write into their input, so a batch of all the frames needs no copy (a 1080p
        # batch is 50 MB, copied in the face thread)
        work.batch = frames if len(wanted) == len(frames) else frames[wanted]
        work.in_place = (
            in_place
            and work.batch is frames
            and all(work.output_mask)
            and isinstance(self.swapper, StagedSwapper)
            and frames.flags.writeable
        )
        try:
            work.selected = self.selector.select(work.batch, [detections[i] for i in wanted])
            if isinstance(self.swapper, StagedSwapper):
                on_device = self._on_device.get(work.batch) if self._on_device is not None else None
                work.tracked = self.swapper.track_batch(work.batch, work.selected, on_device)
        except torch.cuda.OutOfMemoryError as exc:
            raise GpuOutOfMemoryError(
                f"CUDA out of memory tracking faces on {self.device} ({len(frames)} frames)"
            ) from exc
        finally:
            self._add_seconds("swap", time.perf_counter() - t0)
        return work

    def finish_swap(self, work: SwapWork) -> np.ndarray:
        """Swapped frames (N,H,W,3) uint8 for a batch ``plan_swap`` planned. Thread-safe: it reads
        only ``work`` and the engine's constants (the statistics are summed under a lock)."""
        try:
            return self._finish(work)
        except torch.cuda.OutOfMemoryError as exc:
            raise GpuOutOfMemoryError(
                f"CUDA out of memory in the face stage on {self.device} ({len(work.frames)} frames)"
            ) from exc

    def _finish(self, work: SwapWork) -> np.ndarray:
        frames = work.frames
        if not work.wanted:
            return np.array(frames, dtype=np.uint8, copy=True)
        assert work.batch is not None
        t0 = time.perf_counter()
        if isinstance(self.swapper, StagedSwapper):
            outputs = self.swapper.blend_batch(
                work.batch, work.selected, work.tracked, in_place=work.in_place
            )
        else:
            outputs = self.swapper.swap_batch(work.batch, work.selected)
        self._add_seconds("swap", time.perf_counter() - t0)

        # in place, the swapped frames are already ``frames``' rows; else every row is written once, below
        result = frames if work.in_place else np.empty(frames.shape, dtype=np.uint8)
        swapped = dict(zip(work.wanted, range(len(work.wanted)), strict=True))
        faces, paths, enhance_s = 0, Counter[str](), 0.0
        for i in range(len(frames)):
            j = swapped.get(i)
            if j is None or not work.output_mask[i]:
                if not work.in_place:
                    result[i] = frames[i]
                continue
            frame = outputs[j].frame
            faces += len(outputs[j].paths)
            paths.update(outputs[j].paths)
            if self.enhance_crops is not None and work.selected[j]:
                t0 = time.perf_counter()
                frame = self._enhance(frame, work.selected[j])
                enhance_s += time.perf_counter() - t0
            if not (work.in_place and frame is outputs[j].frame):  # in place, that frame is row i already
                result[i] = frame
        with self._lock:
            self._faces += faces
            self._by_path.update(paths)
        if self.enhance_crops is not None:
            self._add_seconds("enhance", enhance_s)
        return result

    def _add_seconds(self, stage: str, seconds: float) -> None:
        with self._lock:  # summed over the threads that ran the stage: may exceed the wall time
            self._seconds[stage] += seconds

    def _enhance(self, frame: np.ndarray, faces: Sequence[Face]) -> np.ndarray:
        """Restore each swapped face with the enhancer on FFHQ-aligned crops, pasted back softly."""
        import cv2

        assert self.enhance_crops is not None
        size = self.enhance_size_px
        template = FFHQ_512 * (size / 512.0)
        matrices = [estimate_similarity(f.landmarks, template) for f in faces]
        crops = np.stack(
            [
                cv2.warpAffine(
                    frame, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
                )
                for m in matrices
            ]
        )
        restored = self.enhance_crops(crops)
        mask = square_mask(size, erode_frac=0.06, blur_frac=0.04)
        out = frame
        for crop, m in zip(restored, matrices, strict=True):
            out, _ = paste_back(out, crop, mask, m)
        return out
