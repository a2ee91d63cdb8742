"""The user's face image: decode it upright, find its largest face, refuse unusable ones early."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from shared.errors import InvalidImageError, NoFaceError
from worker.models.faces import Face, FaceDetector

DEFAULT_MIN_FACE_PX = 40
# Detection runs on a downscaled copy of huge photos; landmarks are scaled back.
DETECT_MAX_SIDE_PX = 2048


@dataclass(frozen=True)
class SourceFace:
    """The decoded source image (RGB uint8) and its chosen face."""

    image: np.ndarray
    face: Face


def decode_image(data: bytes | Path | str, *, label: str = "image") -> np.ndarray:
    """Decode bytes or a file to upright RGB uint8 (EXIF orientation applied by OpenCV)."""
    name = label
    if isinstance(data, (str, Path)):
        path = Path(data)
        name = str(path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise InvalidImageError(
                f"cannot read {label} {path}: {exc.strerror or exc}", path=str(path)
            ) from exc
    else:
        raw = bytes(data)
    if not raw:
        raise InvalidImageError(f"{label} {name} is empty (0 bytes); give a JPEG or PNG photo with a face")
    buf = np.frombuffer(raw, dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)  # IMREAD_COLOR honours EXIF orientation
    if img is None or img.size == 0:
        raise InvalidImageError(
            f"{label} {name} is not a readable image ({len(raw)} bytes); give a JPEG, PNG or WebP photo"
        )
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def find_largest_face(image: np.ndarray, detector: FaceDetector) -> Face | None:
    """The largest detected face, detecting on a downscaled copy of very large images."""
    h, w = image.shape[:2]
    scale = min(1.0, DETECT_MAX_SIDE_PX / max(h, w))
    small = image
    if scale < 1.0:
        small = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    faces = detector.detect(small[None])[0]
    if not faces:
        return None
    best = max(faces, key=lambda f: f.area_px)
    if scale < 1.0:
        best = Face(box=best.box / scale, score=best.score, landmarks=best.landmarks / scale)
    return best


def load_source_face(
    image: bytes | Path | str | np.ndarray,
    detector: FaceDetector,
    *,
    min_face_px: int = DEFAULT_MIN_FACE_PX,
    label: str = "face image",
) -> SourceFace:
    """Decode the image and pick its largest face; raise a permanent error a user can act on."""
    rgb = image if isinstance(image, np.ndarray) else decode_image(image, label=label)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InvalidImageError(f"{label} must be an RGB uint8 image, got shape {rgb.shape} {rgb.dtype}")
    face = find_largest_face(rgb, detector)
    if face is None:
        raise NoFaceError(
            f"no face found in the {label} ({rgb.shape[1]}x{rgb.shape[0]} px); "
            "use a well-lit, frontal photo where the face is clearly visible"
        )
    if face.size_px < min_face_px:
        raise NoFaceError(
            f"the face in the {label} is too small ({face.size_px:.0f} px, need at least {min_face_px} px); "
            "use a larger or closer photo of the face"
        )
    return SourceFace(image=rgb, face=face)
