"""FaceEngine, the pipeline's entry point: output frames, warm-up frames, stats, errors."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from shared.errors import UnknownModelError
from worker.models.engine import FaceEngine


@pytest.fixture(scope="module")
def engine_frames(astronaut_rgb: np.ndarray) -> np.ndarray:
    face = cv2.resize(astronaut_rgb, (256, 256), interpolation=cv2.INTER_AREA)
    return np.stack([face, np.zeros_like(face), face[:, ::-1].copy()])


@pytest.fixture(scope="module")
def classic_engine(face_store: Path, camera_rgb: np.ndarray, detector) -> FaceEngine:
    return FaceEngine(
        swapper_name="classic", source_image=camera_rgb, store=face_store, device="cpu", detect_batch=2
    )


def _changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.any(a != b, axis=-1)


def test_engine_swaps_faces_and_leaves_blank_frames_and_background_bit_identical(
    classic_engine: FaceEngine, engine_frames: np.ndarray
) -> None:
    before = classic_engine.stats["faces"]
    out = classic_engine.process(engine_frames, [True, True, True])
    assert out.shape == engine_frames.shape and out.dtype == np.uint8
    assert np.array_equal(out[1], engine_frames[1])
    for i in (0, 2):
        changed = _changed(out[i], engine_frames[i])
        assert changed.any()
        ys, xs = np.nonzero(changed)
        # the astronaut's face sits in the upper middle at this size; nothing else may change
        assert 70 < xs.mean() < 190 and ys.mean() < 110
        assert changed[180:].sum() == 0
    stats = classic_engine.stats
    assert stats["faces"] - before == 2
    assert stats["faces_by_path"]["classic"] >= 2
    assert set(stats["stage_seconds"]) >= {"detect", "swap"}
    assert all(v >= 0 for v in stats["stage_seconds"].values())


def test_warm_up_frames_come_back_unswapped_and_are_not_counted(
    classic_engine: FaceEngine, engine_frames: np.ndarray
) -> None:
    before = classic_engine.stats["faces"]
    out = classic_engine.process(engine_frames, [False, True, False])
    assert np.array_equal(out, engine_frames)
    assert classic_engine.stats["faces"] == before
    with pytest.raises(ValueError, match="output_mask"):
        classic_engine.process(engine_frames, [True])


def test_engine_returns_an_empty_batch_unchanged(classic_engine: FaceEngine) -> None:
    empty = np.zeros((0, 32, 32, 3), dtype=np.uint8)
    assert classic_engine.process(empty, []).shape == (0, 32, 32, 3)


def test_unknown_swapper_and_selector_names_are_refused(face_store: Path, camera_rgb: np.ndarray) -> None:
    with pytest.raises(UnknownModelError, match="unknown swapper 'deepfake'"):
        FaceEngine(swapper_name="deepfake", source_image=camera_rgb, store=face_store, device="cpu")
    with pytest.raises(UnknownModelError, match="face selector"):
        FaceEngine(
            swapper_name="classic",
            source_image=camera_rgb,
            store=face_store,
            device="cpu",
            selector="tallest",
        )


def test_inswapper_engine_swaps_with_user_weights(
    user_store: Path, camera_rgb: np.ndarray, engine_frames: np.ndarray
) -> None:
    engine = FaceEngine(swapper_name="inswapper", source_image=camera_rgb, store=user_store, device="cpu")
    out = engine.process(engine_frames, [True, True, True])
    assert np.array_equal(out[1], engine_frames[1])
    assert _changed(out[0], engine_frames[0]).any()
    assert engine.stats["faces_by_path"] == {"inswapper": 2}


def test_an_in_place_swap_hands_back_the_batch_itself_holding_the_copys_frames(
    face_store: Path, camera_rgb: np.ndarray, engine_frames: np.ndarray
) -> None:
    """``plan_swap(in_place=True)`` with the mesh swapper: the frames a copying engine returns, written
    into the caller's batch; a batch with warm-up frames is never written into."""

    def engine() -> FaceEngine:
        return FaceEngine(swapper_name="mesh", source_image=camera_rgb, store=face_store, device="cpu")

    copying, in_place = engine(), engine()
    for mask in ([False, True, True], [True, True, True]):
        batch = engine_frames.copy()
        want = copying.finish_swap(copying.plan_swap(batch, copying.find_faces(batch), mask))
        assert np.array_equal(batch, engine_frames)
        work = in_place.plan_swap(batch, in_place.find_faces(batch), mask, in_place=True)
        got = in_place.finish_swap(work)
        assert np.array_equal(got, want)
        if all(mask):
            assert got is batch and not np.array_equal(batch, engine_frames)
        else:
            assert got is not batch and np.array_equal(batch, engine_frames)
    assert in_place.stats["faces"] == copying.stats["faces"] > 0


def test_a_planned_batch_splits_into_views_that_finish_to_the_whole_batchs_frames(
    face_store: Path, camera_rgb: np.ndarray, engine_frames: np.ndarray
) -> None:
    """``SwapWork.split``: consecutive runs of frames, each finished alone, give the frames of the whole
    batch finished at once, written into the caller's batch when in place."""

    def engine() -> FaceEngine:
        return FaceEngine(swapper_name="mesh", source_image=camera_rgb, store=face_store, device="cpu")

    whole, halves = engine(), engine()
    batch = engine_frames.copy()
    want = whole.finish_swap(whole.plan_swap(batch, whole.find_faces(batch), [True] * 3))
    work = halves.plan_swap(batch, halves.find_faces(batch), [True] * 3, in_place=True)
    parts = work.split(2)
    assert [len(p.frames) for p in parts] == [2, 1] and all(p.in_place for p in parts)
    assert all(np.shares_memory(p.frames, batch) and p.batch is p.frames for p in parts)
    assert [len(p.selected) for p in parts] == [2, 1] and [len(p.tracked) for p in parts] == [2, 1]
    outs = [halves.finish_swap(p) for p in parts]
    assert np.array_equal(np.concatenate(outs), want) and np.array_equal(batch, want)
    assert halves.stats["faces"] == whole.stats["faces"]
    assert work.split(1) == [work]
    classic = FaceEngine(swapper_name="classic", source_image=camera_rgb, store=face_store, device="cpu")
    warm = classic.plan_swap(engine_frames, classic.find_faces(engine_frames), [False, True, True])
    assert warm.split(2) == [warm]  # its swapper skips the warm-up frame: not split


def test_an_upload_ahead_that_runs_out_of_device_memory_is_skipped(classic_engine: FaceEngine) -> None:
    """Uploading ahead only saves time: out of memory there, the batch goes up when detection needs it."""
    import torch

    class Full:
        def get(self, frames: np.ndarray) -> None:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")

    real = classic_engine._on_device
    classic_engine._on_device = Full()  # type: ignore[assignment]
    try:
        classic_engine.upload_ahead(np.zeros((2, 8, 8, 3), np.uint8))  # no error
    finally:
        classic_engine._on_device = real
