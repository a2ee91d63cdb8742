"""Face selectors: all, largest, and reference (by ArcFace identity)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shared.errors import BadInputError, ModelStoreError
from worker.models.arcface import ArcFaceEmbedder
from worker.models.selection import LargestSelector, ReferenceSelector, create_selector
from worker.models.smoothing import box_iou


@pytest.fixture(scope="module")
def t1_faces(detector, t1_half_rgb: np.ndarray):
    return detector.detect(t1_half_rgb[None])[0]


def _reference_crop(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """A crop around one face with generous context, upscaled x2 (a 'different photo')."""
    import cv2

    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    xa, ya = int(max(0, x1 - w)), int(max(0, y1 - h))
    xb, yb = int(min(image.shape[1], x2 + w)), int(min(image.shape[0], y2 + h))
    crop = image[ya:yb, xa:xb]
    return cv2.resize(crop, (crop.shape[1] * 2, crop.shape[0] * 2), interpolation=cv2.INTER_CUBIC)


@pytest.mark.parametrize("pick", [0, 3, 5])
def test_reference_selector_picks_the_face_closest_to_the_reference(
    user_store: Path, detector, t1_half_rgb: np.ndarray, t1_faces, pick: int
) -> None:
    target = t1_faces[pick]
    reference = _reference_crop(t1_half_rgb, target.box)
    selector = create_selector(
        "reference",
        store=user_store,
        device="cpu",
        detector=detector,
        reference_image=reference,
        reference_distance=2.0,
    )
    assert isinstance(selector, ReferenceSelector)
    chosen = selector.select(t1_half_rgb[None], [t1_faces])[0]
    assert len(chosen) == 1
    assert box_iou(chosen[0].box, target.box) > 0.9
    dist = selector.distances(t1_half_rgb, t1_faces)
    assert int(np.argmin(dist)) == pick
    # a strict distance keeps nobody
    strict = ReferenceSelector(selector.embedder, selector.reference, max_distance=0.0)
    assert strict.select(t1_half_rgb[None], [t1_faces]) == [[]]


def test_reference_selector_without_arcface_weights_says_what_to_add(
    face_store: Path, detector, astronaut_rgb: np.ndarray
) -> None:
    with pytest.raises(ModelStoreError, match=r"w600k_r50\.onnx.*facefarm models add"):
        create_selector(
            "reference", store=face_store, device="cpu", detector=detector, reference_image=astronaut_rgb
        )


def test_reference_selector_without_a_reference_image_is_bad_input(user_store: Path, detector) -> None:
    embedder = ArcFaceEmbedder.from_store(user_store, "cpu")
    with pytest.raises(BadInputError, match="--reference"):
        create_selector("reference", store=user_store, device="cpu", detector=detector, embedder=embedder)


def test_largest_and_all_selectors(t1_faces, t1_half_rgb: np.ndarray, detector, face_store: Path) -> None:
    frames = np.stack([t1_half_rgb, t1_half_rgb])
    chosen = LargestSelector().select(frames, [t1_faces, []])
    assert chosen[1] == []
    assert chosen[0][0].area_px == max(f.area_px for f in t1_faces)
    everyone = create_selector("all", store=face_store, device="cpu", detector=detector)
    assert [len(x) for x in everyone.select(frames, [t1_faces, []])] == [6, 0]
