"""The classic swapper moves identity and touches nothing outside its masks."""

from __future__ import annotations

import numpy as np
import pytest

from worker.models.align import warp_face
from worker.models.detect_mtcnn import MtcnnDetector
from worker.models.faces import Face
from worker.models.source_face import SourceFace, load_source_face
from worker.models.swap_classic import ClassicSwapper


def _canvas(images: list[np.ndarray]) -> np.ndarray:
    """Same-size frames (top-left placement on black) from photos of different sizes."""
    h = max(i.shape[0] for i in images)
    w = max(i.shape[1] for i in images)
    frames = np.zeros((len(images), h, w, 3), dtype=np.uint8)
    for k, img in enumerate(images):
        frames[k, : img.shape[0], : img.shape[1]] = img
    return frames


def _inner_face(image: np.ndarray, face: Face) -> np.ndarray:
    """Normalised grayscale of the inner face (eyes, nose, mouth) of the 112 aligned crop."""
    crop, _ = warp_face(image, face.landmarks, 112)
    gray = crop.astype(np.float64).mean(axis=2)[36:100, 30:82]
    return (gray - gray.mean()) / (gray.std() + 1e-6)


@pytest.fixture(scope="module")
def swap_frames(camera_rgb, t1_half_rgb, hanks_rgb) -> np.ndarray:
    return _canvas([camera_rgb, t1_half_rgb, hanks_rgb, np.zeros_like(camera_rgb)])


@pytest.fixture(scope="module")
def swap_faces(detector: MtcnnDetector, swap_frames: np.ndarray) -> list[list[Face]]:
    return detector.detect(swap_frames)


def test_each_swapped_face_looks_more_like_the_source_than_the_target(
    detector: MtcnnDetector, astronaut_rgb: np.ndarray, swap_frames: np.ndarray, swap_faces
) -> None:
    source = load_source_face(astronaut_rgb, detector)
    source_inner = _inner_face(source.image, source.face)
    faces = swap_faces
    assert [len(f) for f in faces] == [1, 6, 1, 0]
    outputs = ClassicSwapper(source).swap_batch(swap_frames, faces)
    checked = 0
    for frame, out, frame_faces in zip(swap_frames, outputs, faces, strict=True):
        assert out.paths == ["classic"] * len(frame_faces)
        for face in frame_faces:
            swapped = _inner_face(out.frame, face)
            to_source = np.linalg.norm(swapped - source_inner)
            to_target = np.linalg.norm(swapped - _inner_face(frame, face))
            assert to_source < to_target, (face.box, to_source, to_target)
            checked += 1
    assert checked == 8


def test_swap_goes_the_other_way_too(detector: MtcnnDetector, astronaut_rgb, camera_rgb) -> None:
    source = load_source_face(camera_rgb, detector)
    face = detector.detect(astronaut_rgb[None])[0][0]
    out = ClassicSwapper(source).swap_batch(astronaut_rgb[None], [[face]])[0]
    swapped = _inner_face(out.frame, face)
    assert np.linalg.norm(swapped - _inner_face(source.image, source.face)) < np.linalg.norm(
        swapped - _inner_face(astronaut_rgb, face)
    )


def test_pixels_outside_the_masks_and_faceless_frames_are_bit_identical(
    detector: MtcnnDetector, astronaut_rgb: np.ndarray, swap_frames: np.ndarray, swap_faces
) -> None:
    source = load_source_face(astronaut_rgb, detector)
    faces = swap_faces
    for poisson in (False, True):
        outputs = ClassicSwapper(source, poisson=poisson).swap_batch(swap_frames, faces)
        for frame, out in zip(swap_frames, outputs, strict=True):
            assert out.frame.dtype == np.uint8 and out.frame.shape == frame.shape
            assert out.mask.dtype == np.float32 and out.mask.shape == frame.shape[:2]
            untouched = out.mask == 0
            assert np.array_equal(out.frame[untouched], frame[untouched])
        assert outputs[3].mask.max() == 0
        assert np.array_equal(outputs[3].frame, swap_frames[3])
        assert outputs[1].mask.max() == pytest.approx(1.0, abs=1e-3)


def test_a_frame_without_faces_is_returned_as_a_copy(astronaut_rgb: np.ndarray, detector) -> None:
    source = SourceFace(astronaut_rgb, detector.detect(astronaut_rgb[None])[0][0])
    frames = np.zeros((1, 64, 64, 3), dtype=np.uint8)
    out = ClassicSwapper(source).swap_batch(frames, [[]])[0]
    assert out.paths == [] and np.array_equal(out.frame, frames[0]) and out.frame is not frames[0]
