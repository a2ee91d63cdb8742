"""Landmark smoothing: less jitter on a still face, still follows a moving one."""

from __future__ import annotations

import numpy as np
import pytest

from worker.models.faces import Face
from worker.models.smoothing import FaceSmoother, OneEuroFilter


def _jitter(seq: np.ndarray) -> float:
    return float(np.abs(np.diff(seq, axis=0)).mean())


@pytest.fixture(scope="module")
def noisy_still_faces(detector, astronaut_rgb: np.ndarray) -> list[list[Face]]:
    """The same photo with fresh noise in every frame, re-detected: detection jitter only."""
    base = astronaut_rgb[0:256, 100:356].astype(np.int16)
    rng = np.random.default_rng(7)
    frames = np.stack(
        [np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8) for _ in range(16)]
    )
    faces = detector.detect(frames)
    assert all(len(f) == 1 for f in faces)
    return faces


def test_smoothing_lowers_landmark_jitter_on_a_still_face(noisy_still_faces: list[list[Face]]) -> None:
    smoother = FaceSmoother()
    raw = np.stack([f[0].landmarks for f in noisy_still_faces])
    smooth = np.stack([smoother.update(f)[0].landmarks for f in noisy_still_faces])
    assert _jitter(raw) > 0.05  # the detector does jitter under noise
    assert _jitter(smooth[4:]) < 0.6 * _jitter(raw[4:])
    assert np.abs(smooth[-1] - raw.mean(axis=0)).max() < 2.0


def _face_at(x: float, y: float, size: float = 100.0) -> Face:
    box = np.array([x, y, x + size, y + size], dtype=np.float32)
    lms = np.array(
        [[0.3, 0.4], [0.7, 0.4], [0.5, 0.6], [0.35, 0.8], [0.65, 0.8]], dtype=np.float32
    ) * size + [x, y]
    return Face(box=box, score=0.99, landmarks=lms.astype(np.float32))


def test_smoothing_follows_a_moving_face_closely() -> None:
    smoother = FaceSmoother()
    lag = []
    for t in range(40):
        face = _face_at(100 + 4.0 * t, 50)
        out = smoother.update([face])[0]
        lag.append(np.abs(out.landmarks - face.landmarks).max())
    assert max(lag[10:]) < 4.0  # under one frame of motion behind


def test_tracks_keep_their_own_filters_when_faces_reorder() -> None:
    smoother = FaceSmoother()
    a, b = _face_at(0, 0), _face_at(300, 0)
    smoother.update([a, b])
    out = smoother.update([b, a])
    np.testing.assert_allclose(out[0].landmarks, b.landmarks, atol=1e-4)
    np.testing.assert_allclose(out[1].landmarks, a.landmarks, atol=1e-4)
    assert smoother.track_count == 2


def test_lost_tracks_expire_and_new_faces_start_fresh() -> None:
    smoother = FaceSmoother(max_missed=1)
    smoother.update([_face_at(0, 0)])
    smoother.update([])
    smoother.update([])
    assert smoother.track_count == 0
    far = _face_at(500, 500)
    np.testing.assert_array_equal(smoother.update([far])[0].landmarks, far.landmarks)


def test_one_euro_first_value_passes_through_then_smooths() -> None:
    f = OneEuroFilter()
    x0 = np.array([10.0, 20.0])
    np.testing.assert_array_equal(f(x0, 100.0), x0)
    out = f(x0 + 1.0, 100.0)
    assert np.all(out > x0) and np.all(out < x0 + 1.0)
