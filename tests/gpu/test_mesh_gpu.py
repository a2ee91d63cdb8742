"""The mesh swapper's device compositors on CUDA (batched: the default there; per-face torch) give the
cv2 compositor's picture.

Run on the GPU machine: ``FACEFARM_TEST_IMAGES=<dir with t1.jpg, Tom_Hanks_54745.png>
pytest -m gpu tests/gpu/test_mesh_gpu.py``. Its cost is in bench/RESULTS.md (slower than cv2 there).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from tests.unit.mesh.conftest import insightface_image, tile_around
from worker.models.mesh.swapper import MeshSwapper

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def scene(cuda, gpu_store):
    """Source (Tom Hanks), six real t1 target faces as tiles, their faces, and a 4x upscaled copy
    (faces ~400 px, the size of a 1080p close-up) for timing."""
    from worker.models.detect_mtcnn import MtcnnDetector

    detector = MtcnnDetector(gpu_store, cuda)
    tom = cv2.copyMakeBorder(insightface_image("Tom_Hanks_54745.png"), 56, 56, 56, 56, cv2.BORDER_REPLICATE)
    t1 = insightface_image("t1.jpg")
    targets = sorted(detector.detect(t1)[0], key=lambda f: float(f.box[0]))
    frames = np.stack([tile_around(t1, f.box) for f in targets])
    big = np.stack([cv2.resize(f, None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC) for f in frames])
    return {
        "source": (tom, detector.detect(tom)[0][0]),
        "frames": frames,
        "faces": detector.detect(frames),
        "big": big,
        "big_faces": detector.detect(big),
    }


def _swappers(scene, cuda, gpu_store, compositor):
    image, face = scene["source"]
    on_gpu = MeshSwapper(image, face, gpu_store, cuda, smooth=False, compositor=compositor)
    reference = MeshSwapper(image, face, gpu_store, cuda, smooth=False, compositor="cv2")
    return on_gpu, reference


@pytest.mark.parametrize("compositor", ["batched", "torch"])
def test_cuda_mesh_swap_matches_the_cpu_blend(scene, cuda, gpu_store, compositor):
    on_gpu, reference = _swappers(scene, cuda, gpu_store, compositor)
    device_side = on_gpu._batched if compositor == "batched" else on_gpu._compositor
    assert device_side is not None and reference._compositor is None and reference._batched is None
    for frames, faces in ((scene["frames"], scene["faces"]), (scene["big"], scene["big_faces"])):
        meshes = on_gpu.track_batch(frames, faces)
        assert sum(m is not None for row in meshes for m in row) >= 5
        got = on_gpu.blend_batch(frames, faces, meshes)
        want = reference.blend_batch(frames, faces, meshes)
        for k, (a, b) in enumerate(zip(got, want, strict=True)):
            assert a.paths == b.paths
            assert np.abs(a.mask - b.mask).max() < 0.02, k
            touched = (a.mask > 0) | (b.mask > 0)
            assert np.array_equal(a.frame[~touched], frames[k][~touched]), k
            ys, xs = np.nonzero(touched)
            window = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
            diff = np.abs(a.frame[window].astype(int) - b.frame[window].astype(int))
            assert diff.mean() < 1.0 and np.percentile(diff, 99) < 4, (k, diff.mean(), diff.max())
