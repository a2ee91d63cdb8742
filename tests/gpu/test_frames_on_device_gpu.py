"""On CUDA a batch goes up once for detection and the mesh landmarks, and the device crops give the
host crops' landmarks.

Run on the GPU machine: ``FACEFARM_TEST_IMAGES=<dir with t1.jpg, Tom_Hanks_54745.png>
FACEFARM_TEST_MODEL_STORE=<store> pytest -m gpu tests/gpu/test_frames_on_device_gpu.py``.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from tests.unit.mesh.conftest import insightface_image
from worker.models.frames_on_device import FramesOnDevice

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    t1 = insightface_image("t1.jpg")
    big = cv2.resize(t1, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    return np.stack([big, big[:, ::-1], np.roll(big, big.shape[1] // 3, axis=1)])


def test_a_batch_read_on_another_stream_waits_for_its_upload(cuda, frames):
    cache = FramesOnDevice(cuda)
    side = torch.cuda.Stream(cuda)
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # the upload queues behind ~20 ms of work on this stream
        up = cache.get(frames)
    got = cache.get(frames)  # the default stream: must wait for the side stream's copy
    assert got is up and cache.uploads == 1
    np.testing.assert_array_equal(got.cpu().numpy(), frames)


def test_the_engine_uploads_each_batch_once_and_finds_the_same_faces(cuda, gpu_store, frames):
    from worker.models.engine import FaceEngine

    source = insightface_image("Tom_Hanks_54745.png")
    engine = FaceEngine(swapper_name="mesh", source_image=source, store=gpu_store, device=cuda)
    assert engine._on_device is not None
    found = engine.find_faces(frames)
    work = engine.plan_swap(frames, found, [True] * len(frames))
    assert engine._on_device.uploads == 1
    alone = engine.detector.detect(frames)  # its own upload
    assert [[f.box.tolist() for f in row] for row in alone] == [
        [f.box.tolist() for f in row] for row in engine.detect(frames)
    ]
    meshes = [m for row in work.tracked for m in row if m is not None]
    assert len(meshes) >= 4
    out = engine.finish_swap(work)
    assert out.shape == frames.shape and not np.array_equal(out, frames)


def test_a_batch_uploaded_ahead_in_another_thread_is_not_uploaded_again(cuda, gpu_store, frames):
    import threading

    from worker.models.engine import FaceEngine

    source = insightface_image("Tom_Hanks_54745.png")
    engine = FaceEngine(swapper_name="mesh", source_image=source, store=gpu_store, device=cuda)
    batch = frames.copy()

    def decoder() -> None:
        with torch.cuda.stream(torch.cuda.Stream(cuda)):
            torch.cuda._sleep(50_000_000)  # the upload queues behind ~20 ms of this stream's work
            engine.upload_ahead(batch)

    thread = threading.Thread(target=decoder)
    thread.start()
    thread.join()
    found = engine.find_faces(batch)
    work = engine.plan_swap(batch, found, [True] * len(batch), in_place=True)
    assert engine._on_device is not None and engine._on_device.uploads == 1
    assert [len(row) for row in found] == [len(row) for row in engine.detector.detect(frames)]
    out = engine.finish_swap(work)
    assert out is batch and not np.array_equal(out, frames)


def test_device_crops_give_the_host_crops_landmarks(cuda, gpu_store, frames):
    from worker.models.detect_mtcnn import MtcnnDetector
    from worker.models.mesh.landmarker import FaceMeshLandmarker, roi_from_face

    detector = MtcnnDetector(gpu_store, cuda)
    landmarker = FaceMeshLandmarker(gpu_store, cuda)
    rois = [roi_from_face(f, i) for i, row in enumerate(detector.detect(frames)) for f in row]
    assert len(rois) >= 8
    host, presence, _ = landmarker.landmarks_refined(frames, rois)
    device, presence_d, _ = landmarker.landmarks_refined_on_device(torch.from_numpy(frames).to(cuda), rois)
    diff = np.abs(device - host)
    print(f"\nlandmarks, device vs host crops: max {diff.max():.3f} px, mean {diff.mean():.4f} px")
    # a crop value off by one grey level (1 in 10,000) moves a point by hundredths of a pixel; the net
    # runs TF32 convs on CUDA, which spreads that to a fifth of a pixel at worst (an H200 run: 0.20)
    assert diff.mean() < 0.03 and diff.max() < 0.5
    np.testing.assert_allclose(presence_d, presence, atol=1e-3)
