"""MTCNN on CUDA finds the CPU path's faces (which the unit tests hold equal to the original algorithm)
and waits for the device at most four times per ``detect()``, whatever the batch.

Images: insightface's t1.jpg and skimage's astronaut, or ``$FACEFARM_TEST_IMAGES`` (t1.jpg,
astronaut.png) on the GPU machine, which has neither package.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from worker.models.detect_mtcnn import MtcnnDetector

pytestmark = pytest.mark.gpu


def _image(name: str) -> np.ndarray:
    folder = os.environ.get("FACEFARM_TEST_IMAGES")
    if folder:
        bgr = cv2.imread(str(Path(folder) / name), cv2.IMREAD_COLOR)
        assert bgr is not None, name
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    if name == "t1.jpg":
        from tests.unit.faces.conftest import insightface_image

        return insightface_image(name)
    from skimage import data

    return data.astronaut()


def _syncs(call: Callable[[], object]) -> list[str]:
    """Where ``call`` made what the driver calls a synchronizing CUDA operation (file:line each)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


@pytest.fixture(scope="module")
def frames_by_size() -> dict[tuple[int, int], np.ndarray]:
    t1, astronaut = _image("t1.jpg"), _image("astronaut.png")
    noise = np.random.default_rng(0).integers(0, 256, astronaut.shape, dtype=np.uint8)
    photos = [t1, astronaut, np.zeros_like(astronaut), noise, t1[:, ::-1]]
    out = {}
    for size in ((640, 360), (1920, 1080)):
        out[size] = np.stack([cv2.resize(p, size, interpolation=cv2.INTER_AREA) for p in photos])
    return out


@pytest.mark.parametrize("size", [(640, 360), (1920, 1080)])
def test_cuda_finds_the_cpu_faces_with_four_syncs(cuda, gpu_store, frames_by_size, size):
    frames = frames_by_size[size]
    want = MtcnnDetector(gpu_store, "cpu").detect(frames)
    detector = MtcnnDetector(gpu_store, cuda)
    # true fp32 on the GPU: with TF32 convs, 1080p boxes moved ~1 px and landmarks over 2 px on an H200
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        got = detector.detect(frames)
    assert [len(f) for f in got] == [len(f) for f in want] and sum(map(len, want)) >= 7
    for got_frame, want_frame in zip(got, want, strict=True):
        for g, w in zip(got_frame, want_frame, strict=True):
            np.testing.assert_allclose(g.box, w.box, atol=0.05)
            np.testing.assert_allclose(g.landmarks, w.landmarks, atol=0.05)
    syncs = _syncs(lambda: detector.detect(frames))
    assert len(syncs) <= 4, syncs


def test_the_graphed_first_stage_gives_the_eager_faces_and_is_shared_per_process(
    cuda, gpu_store, frames_by_size
):
    """``cuda_graph=True`` (the render worker's setting): each batch shape captured once per process, shared by
    the detectors of later chunks, and the faces of the eager CUDA path bit for bit, ragged batches included;
    no sync more than the eager path."""
    frames = frames_by_size[(1920, 1080)]
    batch = np.concatenate([frames, frames[:3]])  # 8 frames, as the render worker's batches
    eager = MtcnnDetector(gpu_store, cuda)
    first, second = (
        MtcnnDetector(gpu_store, cuda, cuda_graph=True),
        MtcnnDetector(gpu_store, cuda, cuda_graph=True),
    )
    assert first._graphed is not None and first._graphed is second._graphed
    replays = first._graphed.replays
    for part in (batch, batch[:3], batch, frames_by_size[(640, 360)]):
        got, want = second.detect(part), eager.detect(part)
        assert [len(f) for f in got] == [len(f) for f in want]
        for got_frame, want_frame in zip(got, want, strict=True):
            for g, w in zip(got_frame, want_frame, strict=True):
                assert np.array_equal(g.box, w.box) and np.array_equal(g.landmarks, w.landmarks)
                assert g.score == w.score
    assert first._graphed.replays == replays + 4
    assert len([g for g in first._graphed._graphs.values() if g is not None]) >= 3  # one per batch shape

    # the graph adds none: this many candidates take the fifth, counting sync of the cross-scale NMS
    # (CROSS_NMS_BLIND_PAIRS) either way, all of them in ``_fetch``
    graphed = _syncs(lambda: first.detect(batch))
    assert graphed == _syncs(lambda: eager.detect(batch)) and len(graphed) <= 5
