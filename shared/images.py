"""Reading a job's face image from storage with the cheap refusals first (size, format, pixels).

Used by the input check that runs before planning, so an empty, oversized or unreadable image is
refused with its own error before the face detector is even loaded.
"""

from __future__ import annotations

import cv2
import numpy as np

from shared.errors import InvalidImageError, LimitExceededError, NoFaceError
from shared.storage import Storage

MAX_FACE_IMAGE_BYTES = 50 * 1024 * 1024
MIN_FACE_IMAGE_PX = 32


def read_face_image(storage: Storage, uri: str, name: str) -> np.ndarray:
    """The image at ``uri`` as upright RGB uint8 (EXIF orientation applied), or a permanent error."""
    size = storage.size(uri)
    if size == 0:
        raise InvalidImageError(f"face image {name} is empty (0 bytes); give a JPEG or PNG photo with a face")
    if size > MAX_FACE_IMAGE_BYTES:
        raise LimitExceededError(
            f"face image {name} is {size} bytes; the limit is {MAX_FACE_IMAGE_BYTES}; give a smaller photo"
        )
    data = storage.open_range(uri, 0, size - 1)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # honours EXIF orientation
    if image is None or image.size == 0:
        raise InvalidImageError(
            f"face image {name} is not a readable image ({size} bytes); give a JPEG, PNG or WebP photo"
        )
    height, width = image.shape[:2]
    if min(height, width) < MIN_FACE_IMAGE_PX:
        raise NoFaceError(
            f"face image {name} is {width}x{height} px, too small to hold a usable face "
            f"(at least {MIN_FACE_IMAGE_PX} px a side); use a larger photo"
        )
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
