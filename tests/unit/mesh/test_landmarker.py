"""Landmarks in frame pixels: presence, rotation handling, batching, and the benchmark entry point."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from worker.models.faces import Face
from worker.models.mesh.landmarker import benchmark_landmarks, roi_from_face
from worker.models.mesh.swapper import inter_ocular_px


def test_real_faces_have_high_presence_and_non_faces_low(detector, landmarker, astronaut, t1):
    faces = detector.detect(t1)[0]
    rois = [roi_from_face(f, 0) for f in faces]
    _, presence, _ = landmarker.landmarks_refined([t1], rois)
    assert (presence > 0.9).all()
    wall = Face(
        box=np.array([340, 30, 440, 130], np.float32),
        score=1.0,
        landmarks=np.array([[370, 70], [410, 70], [390, 90], [372, 110], [408, 110]], np.float32),
    )
    flat = np.full_like(astronaut, 128)
    _, low = landmarker.landmarks([t1, flat], [roi_from_face(wall, 0), roi_from_face(wall, 1)])
    assert (low < 0.5).all()


@pytest.mark.parametrize("angle_deg", [-40.0, -20.0, 20.0, 40.0])
def test_in_plane_rotation_moves_the_landmarks_with_the_face(detector, landmarker, astronaut, angle_deg):
    """Rotating the photo rotates the mesh: back-rotated points agree within 2% of the eye distance."""
    base_face = detector.detect(astronaut)[0][0]
    base, _, _ = landmarker.landmarks_refined([astronaut], [roi_from_face(base_face, 0)])
    m = cv2.getRotationMatrix2D((256.0, 256.0), angle_deg, 1.0)
    rotated = cv2.warpAffine(astronaut, m, (512, 512), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    faces = detector.detect(rotated)[0]
    assert faces
    points, presence, _ = landmarker.landmarks_refined([rotated], [roi_from_face(faces[0], 0)])
    assert presence[0] > 0.9
    back = (points[0][:, :2] - m[:, 2]) @ np.linalg.inv(m[:, :2]).T
    err = np.linalg.norm(back - base[0][:, :2], axis=1)
    assert err.mean() < 0.02 * inter_ocular_px(base[0])


def test_batch_of_many_frames_equals_one_by_one(detector, landmarker, t1, astronaut):
    faces = detector.detect(t1)[0][:3]
    rois = [roi_from_face(f, 0) for f in faces] + [roi_from_face(detector.detect(astronaut)[0][0], 1)]
    together, _ = landmarker.landmarks([t1, astronaut], rois)
    alone = np.stack([landmarker.landmarks([t1, astronaut], [r])[0][0] for r in rois])
    assert np.abs(together - alone).max() < 1e-2


def test_benchmark_reports_throughput_on_cpu(mesh_store):
    result = benchmark_landmarks("cpu", batch=2, dtype="float32", store=mesh_store, iterations=2)
    assert result["batch"] == 2 and result["faces_per_s"] > 0 and result["ms_per_batch"] > 0


def test_batches_are_padded_to_a_few_sizes_without_changing_the_points(detector, landmarker, t1, monkeypatch):
    """Face counts map to powers of two up to 16, then multiples of 16 (cuDNN plans are per shape);
    the padding rows never reach the results."""
    from worker.models.mesh import landmarker as module

    assert [module.batch_bucket(n) for n in (1, 2, 3, 5, 9, 16, 17, 33, 64)] == [1, 2, 4, 8, 16, 16, 32, 48, 64]
    seen: list[int] = []
    net = landmarker.net
    monkeypatch.setattr(landmarker, "net", lambda x: (seen.append(len(x)), net(x))[1])
    rois = [roi_from_face(f, 0) for f in detector.detect(t1)[0]][:5]
    assert len(rois) == 5
    together, presence_together = landmarker.landmarks([t1], rois)
    alone = [landmarker.landmarks([t1], [roi]) for roi in rois]
    assert seen[0] == 8 and seen[1:] == [1] * 5
    np.testing.assert_allclose(together, np.concatenate([p for p, _ in alone]), atol=1e-3)
    np.testing.assert_allclose(presence_together, np.concatenate([q for _, q in alone]), atol=1e-5)


def test_device_crops_match_cv2_crops_inside_and_past_the_frame_edges(astronaut):
    """``warp_crops`` (the CUDA path's crops, run here on CPU tensors) equals ``cut_crop`` within one
    grey level, for rotated ROIs of every size, some reaching far past the frame (replicated border)."""
    import torch

    from worker.models.mesh.landmarker import (
        INPUT_PX,
        FaceRoi,
        crop_matrices,
        cut_crop,
        invert_affines,
        roi_params,
        warp_crops,
    )

    frames = np.stack([astronaut, astronaut[::-1, ::-1].copy()])
    rng = np.random.default_rng(7)
    rois = [
        FaceRoi(
            int(rng.integers(0, 2)),
            float(rng.uniform(-60, 570)),
            float(rng.uniform(-60, 570)),
            float(rng.uniform(16, 700)),
            float(rng.uniform(-np.pi, np.pi)),
        )
        for _ in range(64)
    ]
    matrices = crop_matrices(torch.from_numpy(roi_params(rois)))
    np.testing.assert_allclose(matrices.numpy(), np.stack([r.crop_matrix() for r in rois]), atol=1e-9)
    index = torch.tensor([r.frame_index for r in rois])
    got = warp_crops(torch.from_numpy(frames), index, invert_affines(matrices), INPUT_PX).numpy()
    want = np.stack([cut_crop(frames[r.frame_index], r) for r in rois])
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


def test_refinement_on_device_gives_the_host_refinement(detector, landmarker, astronaut, t1):
    """Both net passes with device crops and device ROIs (one sync) land on the host path's points."""
    import torch

    h, w = max(t1.shape[0], 512), max(t1.shape[1], 512)
    frames = np.zeros((2, h, w, 3), np.uint8)
    frames[0, : t1.shape[0], : t1.shape[1]] = t1
    frames[1, :512, :512] = astronaut
    rois = [roi_from_face(f, i) for i, found in enumerate(detector.detect(frames)) for f in found]
    assert len(rois) >= 5
    points, presence, second = landmarker.landmarks_refined(frames, rois)
    points_d, presence_d, second_d = landmarker.landmarks_refined_on_device(torch.from_numpy(frames), rois)
    assert points_d.shape == points.shape and presence_d.dtype == np.float32
    assert np.abs(points_d - points).max() < 0.1
    np.testing.assert_allclose(presence_d, presence, atol=1e-3)
    for a, b in zip(second, second_d, strict=True):
        assert a.frame_index == b.frame_index
        assert abs(a.centre_x - b.centre_x) < 0.05 and abs(a.side_px - b.side_px) < 0.05
        assert abs(a.angle_rad - b.angle_rad) < 1e-3
    empty = landmarker.landmarks_refined_on_device(torch.from_numpy(frames), [])
    assert empty[0].shape == (0, 468, 3) and empty[1].shape == (0,) and empty[2] == []
