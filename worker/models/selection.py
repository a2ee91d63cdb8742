"""Which detected faces get swapped: ``all`` (default), ``largest``, or ``reference`` (by identity)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from shared.errors import BadInputError, ModelStoreError, UnknownModelError
from worker.models.arcface import ARCFACE_FILE, ArcFaceEmbedder
from worker.models.faces import Face, FaceDetector
from worker.models.source_face import load_source_face

SELECTOR_NAMES = ("all", "largest", "reference")


class FaceSelector(Protocol):
    """Keeps the faces to swap in each frame of a batch."""

    def select(self, frames: np.ndarray, faces: Sequence[Sequence[Face]]) -> list[list[Face]]: ...


class AllSelector:
    """Swap every detected face."""

    def select(self, frames: np.ndarray, faces: Sequence[Sequence[Face]]) -> list[list[Face]]:
        return [list(f) for f in faces]


class LargestSelector:
    """Swap only the largest face of each frame."""

    def select(self, frames: np.ndarray, faces: Sequence[Sequence[Face]]) -> list[list[Face]]:
        return [[max(f, key=lambda x: x.area_px)] if f else [] for f in faces]


class ReferenceSelector:
    """Swap the face closest in identity to a reference face (L2 between unit ArcFace embeddings),
    if it is within ``max_distance`` (0 = same, 2 = opposite)."""

    def __init__(
        self, embedder: ArcFaceEmbedder, reference_embedding: np.ndarray, max_distance: float
    ) -> None:
        self.embedder = embedder
        self.reference = reference_embedding.reshape(-1).astype(np.float32)
        self.max_distance = max_distance

    def distances(self, frame: np.ndarray, faces: Sequence[Face]) -> np.ndarray:
        """Distance of each face of one frame to the reference."""
        if not faces:
            return np.zeros(0, dtype=np.float32)
        emb = self.embedder.embed_faces(frame, faces)
        return np.linalg.norm(emb - self.reference[None], axis=1)

    def select(self, frames: np.ndarray, faces: Sequence[Sequence[Face]]) -> list[list[Face]]:
        chosen: list[list[Face]] = []
        for frame, frame_faces in zip(frames, faces, strict=True):
            dist = self.distances(frame, frame_faces)
            if len(dist) == 0 or float(dist.min()) > self.max_distance:
                chosen.append([])
                continue
            chosen.append([frame_faces[int(np.argmin(dist))]])
        return chosen


def create_selector(
    name: str,
    *,
    store: Path,
    device: torch.device | str,
    detector: FaceDetector,
    reference_image: np.ndarray | None = None,
    reference_distance: float = 1.0,
    embedder: ArcFaceEmbedder | None = None,
) -> FaceSelector:
    """Build the named selector; ``reference`` needs a reference image and ArcFace weights."""
    if name == "all":
        return AllSelector()
    if name == "largest":
        return LargestSelector()
    if name != "reference":
        raise UnknownModelError(f"unknown face selector {name!r}; choose one of {', '.join(SELECTOR_NAMES)}")
    if reference_image is None:
        raise BadInputError("--face-selector reference needs --reference IMAGE (a photo of the face to swap)")
    if embedder is None:
        try:
            embedder = ArcFaceEmbedder.from_store(store, device)
        except ModelStoreError as exc:
            raise ModelStoreError(
                f"--face-selector reference needs the ArcFace weights {ARCFACE_FILE} (user-supplied, "
                f"insightface buffalo_l) in the model store {store}: add them with "
                f"`facefarm models add --store {store} {ARCFACE_FILE} FILE --licence L --source S`, "
                f"or use --face-selector all|largest ({exc})",
                store=str(store),
                model_file=ARCFACE_FILE,
            ) from exc
    ref = load_source_face(reference_image, detector, label="reference image")
    embedding = embedder.embed_faces(ref.image, [ref.face])[0]
    return ReferenceSelector(embedder, embedding, reference_distance)
