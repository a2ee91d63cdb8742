"""The MTCNN detector on real photos with known faces."""

from __future__ import annotations

import numpy as np
import pytest

from shared.errors import ModelStoreError
from worker.models.detect_mtcnn import MtcnnDetector, batched_nms, nms


def test_t1_has_exactly_six_faces_at_default_threshold(detector: MtcnnDetector, t1_rgb: np.ndarray) -> None:
    faces = detector.detect(t1_rgb[None])[0]
    assert len(faces) == 6
    assert all(f.score >= 0.9 for f in faces)


def test_astronaut_has_one_face_with_landmarks_inside_its_box(
    detector: MtcnnDetector, astronaut_rgb: np.ndarray
) -> None:
    faces = detector.detect(astronaut_rgb[None])[0]
    assert len(faces) == 1
    face = faces[0]
    np.testing.assert_allclose(face.box, [181, 62, 268, 172], atol=2.0)
    x1, y1, x2, y2 = face.box
    assert np.all((face.landmarks[:, 0] > x1) & (face.landmarks[:, 0] < x2))
    assert np.all((face.landmarks[:, 1] > y1) & (face.landmarks[:, 1] < y2))
    # insightface order: left eye left of right eye, eyes above nose above mouth
    lm = face.landmarks
    assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]
    assert lm[0, 1] < lm[2, 1] < lm[3, 1]


def test_batched_detection_equals_one_frame_at_a_time(
    detector: MtcnnDetector, astronaut_rgb: np.ndarray
) -> None:
    frames = np.stack([astronaut_rgb, np.zeros_like(astronaut_rgb), astronaut_rgb[:, ::-1].copy()])
    batched = detector.detect(frames)
    single = [detector.detect(f[None])[0] for f in frames]
    assert [len(b) for b in batched] == [1, 0, 1]
    for b, s in zip(batched, single, strict=True):
        for fb, fs in zip(b, s, strict=True):
            np.testing.assert_allclose(fb.box, fs.box, atol=1e-3)
            np.testing.assert_allclose(fb.landmarks, fs.landmarks, atol=1e-3)


def test_nms_keeps_the_best_of_overlapping_boxes_per_group() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 10]], dtype=np.float64)
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    assert list(nms(boxes, scores, 0.5)) == [0, 2]
    groups = np.array([0, 0, 0, 1])
    assert sorted(batched_nms(boxes, scores, groups, 0.5)) == [0, 2, 3]


def test_missing_weights_raise_model_store_error(tmp_path) -> None:
    with pytest.raises(ModelStoreError, match="pnet.pt"):
        MtcnnDetector(tmp_path, "cpu")
