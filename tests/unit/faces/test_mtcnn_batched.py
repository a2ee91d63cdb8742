"""The device-side MTCNN path against the one it replaced, kept here as the reference.

``reference_detect`` is the detector as it was: one pyramid scale at a time, candidates copied to
the host after each, numpy NMS per group. The new path must give the very same faces (boxes,
scores, landmarks, order) with a fixed, small number of device-to-host syncs per ``detect``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import worker.models.detect_mtcnn as mtcnn
from tests.unit.faces.conftest import insightface_image
from worker.models.detect_mtcnn import (
    STAGE_THRESHOLDS,
    GroupNms,
    MtcnnDetector,
    area_resize_boxes,
    batched_nms,
    pyramid_scales,
)
from worker.models.faces import Face

# ---------------------------------------------------------------- the reference (the replaced path)


def _rerec(boxes: np.ndarray) -> np.ndarray:
    out = boxes.copy()
    h = out[:, 3] - out[:, 1]
    w = out[:, 2] - out[:, 0]
    side = np.maximum(w, h)
    out[:, 0] = out[:, 0] + w * 0.5 - side * 0.5
    out[:, 1] = out[:, 1] + h * 0.5 - side * 0.5
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def _bbreg(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    out = boxes.copy()
    w = out[:, 2] - out[:, 0] + 1
    h = out[:, 3] - out[:, 1] + 1
    out[:, 0] += reg[:, 0] * w
    out[:, 1] += reg[:, 1] * h
    out[:, 2] += reg[:, 2] * w
    out[:, 3] += reg[:, 3] * h
    return out


def _generate_boxes(
    reg: torch.Tensor, probs: torch.Tensor, scale: float, thresh: float
) -> tuple[np.ndarray, np.ndarray]:
    stride, cell = 2, 12
    mask = probs >= thresh
    idx = mask.nonzero()
    score = probs[mask]
    reg_sel = reg.permute(1, 0, 2, 3)[:, mask].permute(1, 0)
    bb = idx[:, 1:].to(reg.dtype).flip(1)
    q1 = ((stride * bb + 1) / scale).floor()
    q2 = ((stride * bb + cell) / scale).floor()
    boxes = torch.cat([q1, q2, score[:, None], reg_sel], dim=1)
    return boxes.double().cpu().numpy(), idx[:, 0].cpu().numpy()


def _reference_stage1(
    det: MtcnnDetector, imgs: torch.Tensor, h: int, w: int
) -> tuple[np.ndarray, np.ndarray]:
    all_boxes: list[np.ndarray] = []
    all_inds: list[np.ndarray] = []
    for scale in pyramid_scales(h, w, det.min_face_px):
        size = (int(h * scale + 1), int(w * scale + 1))
        data = (F.interpolate(imgs, size=size, mode="area") - 127.5) * 0.0078125
        reg, probs = det.pnet(data)
        boxes_s, inds_s = _generate_boxes(reg, probs[:, 1], scale, STAGE_THRESHOLDS[0])
        pick = batched_nms(boxes_s[:, :4], boxes_s[:, 4], inds_s, 0.5)
        all_boxes.append(boxes_s[pick])
        all_inds.append(inds_s[pick])
    if not all_boxes:
        return np.zeros((0, 9)), np.zeros(0, dtype=np.int64)
    boxes = np.concatenate(all_boxes)
    inds = np.concatenate(all_inds)
    pick = batched_nms(boxes[:, :4], boxes[:, 4], inds, 0.7)
    boxes, inds = boxes[pick], inds[pick]
    regw = boxes[:, 2] - boxes[:, 0]
    regh = boxes[:, 3] - boxes[:, 1]
    refined = np.stack(
        [
            boxes[:, 0] + boxes[:, 5] * regw,
            boxes[:, 1] + boxes[:, 6] * regh,
            boxes[:, 2] + boxes[:, 7] * regw,
            boxes[:, 3] + boxes[:, 8] * regh,
            boxes[:, 4],
        ],
        axis=1,
    )
    return _rerec(refined), inds


def _reference_crops(
    det: MtcnnDetector, integral: torch.Tensor, boxes: np.ndarray, inds: np.ndarray, h: int, w: int, size: int
) -> tuple[torch.Tensor, np.ndarray]:
    b = np.trunc(boxes[:, :4]).astype(np.int64)
    x = np.maximum(b[:, 0], 1)
    y = np.maximum(b[:, 1], 1)
    ex = np.minimum(b[:, 2], w)
    ey = np.minimum(b[:, 3], h)
    valid = (ey > y - 1) & (ex > x - 1)
    if not valid.any():
        return torch.zeros((0, 3, size, size), device=integral.device), valid
    parts = []
    idx = np.flatnonzero(valid)
    for start in range(0, len(idx), det.crop_batch):
        k = idx[start : start + det.crop_batch]
        img, x0, y0, x1, y1 = (
            torch.from_numpy(a).to(integral.device) for a in (inds[k], x[k] - 1, y[k] - 1, ex[k], ey[k])
        )
        parts.append(area_resize_boxes(integral, img, x0, y0, x1, y1, size))
    return (torch.cat(parts) - 127.5) * 0.0078125, valid


def _reference_run(det: MtcnnDetector, net: nn.Module, data: torch.Tensor) -> list[np.ndarray]:
    outs = [list(net(data[k : k + det.crop_batch])) for k in range(0, len(data), det.crop_batch)]
    return [torch.cat([o[i] for o in outs]).double().cpu().numpy() for i in range(len(outs[0]))]


@torch.inference_mode()
def reference_detect(det: MtcnnDetector, frames: np.ndarray) -> list[list[Face]]:
    """``MtcnnDetector.detect`` as it was before its stage 1 moved to the device.

    Its NMS is numpy's on any device; on CUDA it used to run mid-sized groups through an exact matrix
    form of the same greedy pass, with the same results.
    """
    n, h, w = frames.shape[:3]
    raw = torch.from_numpy(np.ascontiguousarray(frames)).to(det.device)
    boxes, inds = _reference_stage1(det, raw.permute(0, 3, 1, 2).float(), h, w)
    points = np.zeros((0, 5, 2))
    if len(boxes):
        integral = F.pad(raw.permute(0, 3, 1, 2).long().cumsum(2).cumsum(3), (1, 0, 1, 0))
        data, valid = _reference_crops(det, integral, boxes, inds, h, w, 24)
        boxes, inds = boxes[valid], inds[valid]
        if len(boxes):
            reg, probs = _reference_run(det, det.rnet, data)
            score = probs[:, 1]
            ok = score > STAGE_THRESHOLDS[1]
            boxes = np.concatenate([boxes[ok, :4], score[ok, None]], axis=1)
            inds, reg = inds[ok], reg[ok]
            pick = batched_nms(boxes[:, :4], boxes[:, 4], inds, 0.7)
            boxes, inds = _rerec(_bbreg(boxes[pick], reg[pick])), inds[pick]
        if len(boxes):
            data, valid = _reference_crops(det, integral, boxes, inds, h, w, 48)
            boxes, inds = boxes[valid], inds[valid]
        if len(boxes):
            reg, pts, probs = _reference_run(det, det.onet, data)
            score = probs[:, 1]
            ok = score > STAGE_THRESHOLDS[2]
            boxes = np.concatenate([boxes[ok, :4], score[ok, None]], axis=1)
            inds, reg, pts = inds[ok], reg[ok], pts[ok]
            px = (boxes[:, 2] - boxes[:, 0] + 1)[:, None] * pts[:, :5] + boxes[:, 0:1] - 1
            py = (boxes[:, 3] - boxes[:, 1] + 1)[:, None] * pts[:, 5:10] + boxes[:, 1:2] - 1
            points = np.stack([px, py], axis=2)
            boxes = _bbreg(boxes, reg)
            pick = batched_nms(boxes[:, :4], boxes[:, 4], inds, 0.7, by_min=True)
            boxes, inds, points = boxes[pick], inds[pick], points[pick]
    out: list[list[Face]] = [[] for _ in range(n)]
    for k in range(len(boxes)):
        if boxes[k, 4] >= det.threshold:
            face = Face(boxes[k, :4].astype(np.float32), float(boxes[k, 4]), points[k].astype(np.float32))
            out[int(inds[k])].append(face)
    for faces in out:
        faces.sort(key=lambda f: -f.area_px)
    return out


# ---------------------------------------------------------------- counting device-to-host syncs


class SyncCounter(TorchFunctionMode):
    """Counts the calls that make the host wait for the device on CUDA, on whatever device runs them.

    Reads of data or data-dependent sizes (``.cpu()``, ``.item()``, ``nonzero``, boolean-mask
    indexing, ``torch.equal``, ``bool(tensor)``) and blocking host-to-device copies (``.to(device)``
    of a host tensor: from pageable memory these wait for the stream too).
    """

    READS = {
        torch.Tensor.cpu,
        torch.Tensor.item,
        torch.Tensor.tolist,
        torch.Tensor.__bool__,
        torch.Tensor.__int__,
        torch.Tensor.__float__,
        torch.Tensor.nonzero,
        torch.nonzero,
        torch.Tensor.masked_select,
        torch.masked_select,
        torch.equal,
    }

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in self.READS:
            self.count += 1
        elif func is torch.Tensor.__getitem__ and _has_mask_index(args[1]):
            self.count += 1
        elif func is torch.Tensor.to and _is_blocking_upload(args, kwargs):
            self.count += 1
        return func(*args, **kwargs)


def _has_mask_index(index: object) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


def _is_blocking_upload(args: tuple, kwargs: dict) -> bool:
    to_device = "device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args[1:])
    return to_device and args[0].device.type == "cpu" and not kwargs.get("non_blocking", False)


def count_syncs(fn: Callable[[], object]) -> int:
    with SyncCounter() as counter:
        fn()
    return counter.count


# ---------------------------------------------------------------- frames


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _mosaic(astronaut: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """15 faces on a 3 x 5 grid (astronaut and Tom Hanks alternating)."""
    faces = [astronaut[30:210, 150:300], insightface_image("Tom_Hanks_54745.png")]
    rows = [
        np.concatenate([_resize(faces[(r + c) % 2], (128, 120)) for c in range(5)], axis=1) for r in range(3)
    ]
    return _resize(np.concatenate(rows, axis=0), size)


def mixed_frames(
    size: tuple[int, int], t1: np.ndarray, astronaut: np.ndarray, camera: np.ndarray
) -> np.ndarray:
    """Eight frames: 6, 1, 15 faces, textured photos, a black and a noise frame."""
    from skimage import data

    width, height = size
    photos = [t1, astronaut, _mosaic(astronaut, size), data.coffee(), data.chelsea(), camera]
    noise = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return np.stack([_resize(p, size) for p in photos] + [np.zeros_like(noise), noise])


@pytest.fixture(scope="module")
def frames_360p(t1_rgb: np.ndarray, astronaut_rgb: np.ndarray, camera_rgb: np.ndarray) -> np.ndarray:
    return mixed_frames((640, 360), t1_rgb, astronaut_rgb, camera_rgb)


def assert_same_faces(got: list[list[Face]], want: list[list[Face]]) -> None:
    assert [len(f) for f in got] == [len(f) for f in want]
    for got_frame, want_frame in zip(got, want, strict=True):
        for g, w in zip(got_frame, want_frame, strict=True):
            np.testing.assert_allclose(g.box, w.box, rtol=0, atol=1e-4)
            np.testing.assert_allclose(g.landmarks, w.landmarks, rtol=0, atol=1e-4)
            assert g.score == pytest.approx(w.score, abs=1e-7)


# ---------------------------------------------------------------- detect() against the reference


@pytest.fixture
def as_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every NMS on the device's pair band, as on CUDA (the CPU sends large ones to numpy)."""
    monkeypatch.setattr(mtcnn, "CPU_NMS_MAX_PAIRS", mtcnn.DEVICE_NMS_MAX_PAIRS)


@pytest.mark.parametrize("pairs_cap", ["cpu", "cuda"])
def test_mixed_batch_gives_the_reference_faces(
    detector: MtcnnDetector, frames_360p: np.ndarray, pairs_cap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if pairs_cap == "cuda":
        monkeypatch.setattr(mtcnn, "CPU_NMS_MAX_PAIRS", mtcnn.DEVICE_NMS_MAX_PAIRS)
    want = reference_detect(detector, frames_360p)
    assert [len(f) for f in want] == [6, 1, 15, 0, 0, 1, 0, 0]  # the cameraman's face too
    assert_same_faces(detector.detect(frames_360p), want)


def test_each_frame_alone_gives_the_reference_faces(detector: MtcnnDetector, frames_360p: np.ndarray) -> None:
    for frame in frames_360p[[0, 2, 6]]:
        assert_same_faces(detector.detect(frame), reference_detect(detector, frame[None]))


def test_720p_frames_give_the_reference_faces(
    detector: MtcnnDetector,
    t1_rgb: np.ndarray,
    astronaut_rgb: np.ndarray,
    camera_rgb: np.ndarray,
    as_on_cuda: None,
) -> None:
    frames = mixed_frames((1280, 720), t1_rgb, astronaut_rgb, camera_rgb)[[0, 2, 3, 7]]
    assert_same_faces(detector.detect(frames), reference_detect(detector, frames))


@pytest.mark.parametrize(("min_face_px", "threshold"), [(12, 0.7), (40, 0.9)])
def test_other_settings_give_the_reference_faces(
    face_store, frames_360p: np.ndarray, min_face_px: int, threshold: float
) -> None:
    det = MtcnnDetector(face_store, "cpu", min_face_px=min_face_px, threshold=threshold, crop_batch=64)
    frames = frames_360p[[0, 1, 2, 4]]
    assert_same_faces(det.detect(frames), reference_detect(det, frames))


def _stage1(detector: MtcnnDetector, level: Callable, n: int, h: int, w: int) -> mtcnn.Candidates | None:
    """Stage 1 with the pyramid levels from ``level`` (the detector's own ``_pyramid_stage`` picks them by device)."""
    scales = pyramid_scales(h, w, detector.min_face_px)
    values = mtcnn.pnet_pyramid(detector.pnet, level, scales, h, w)
    return detector._stage1(values, (values[4] >= mtcnn.STAGE_THRESHOLDS[0]).cumsum(0), scales, n, h, w)


def test_pnet_map_size_is_the_nets_output_size(detector: MtcnnDetector) -> None:
    """The cell tables are made from ``pnet_map_size``, not from the maps: every pyramid size of a few
    frame sizes, odd and even."""
    with torch.inference_mode():
        for h, w in [(360, 640), (353, 501), (1080, 1920), (25, 30)]:
            for scale in pyramid_scales(h, w, 20):
                size = (int(h * scale + 1), int(w * scale + 1))
                _, probs = detector.pnet(torch.zeros(1, 3, *size))
                assert tuple(probs.shape[2:]) == mtcnn.pnet_map_size(size), size


def test_stage1_keeps_the_reference_candidates_in_order(
    detector: MtcnnDetector, frames_360p: np.ndarray
) -> None:
    imgs = torch.from_numpy(frames_360p).permute(0, 3, 1, 2).float()
    with torch.inference_mode():
        boxes, inds = _reference_stage1(detector, imgs, 360, 640)
        pooled = functools.partial(F.interpolate, imgs, mode="area")
        found = _stage1(detector, pooled, len(frames_360p), 360, 640)
    assert found is not None
    b = np.trunc(boxes[:, :4]).astype(np.int64)
    valid = (np.minimum(b[:, 3], 360) > np.maximum(b[:, 1], 1) - 1) & (
        np.minimum(b[:, 2], 640) > np.maximum(b[:, 0], 1) - 1
    )
    np.testing.assert_array_equal(found.boxes.numpy(), boxes[valid])
    np.testing.assert_array_equal(found.image.numpy(), inds[valid])
    np.testing.assert_array_equal(found.per_image, np.bincount(inds[valid], minlength=len(frames_360p)))


def test_pyramid_levels_from_the_integral_image_equal_the_pooling_bit_for_bit(
    frames_360p: np.ndarray,
) -> None:
    """``area_resize_full`` (the CUDA path's pyramid) against ``F.interpolate(mode="area")`` at every
    pyramid scale of real 360p frames, a 1080p noise frame (the largest bin sums) and odd sizes."""
    rng = np.random.default_rng(3)
    batches = [
        frames_360p,
        rng.integers(0, 256, (1, 1080, 1920, 3), dtype=np.uint8),
        frames_360p[:2, :353, :501],
    ]
    for frames in batches:
        raw = torch.from_numpy(np.ascontiguousarray(frames))
        h, w = raw.shape[1:3]
        imgs = raw.permute(0, 3, 1, 2).float()
        narrow = mtcnn.integral_image(raw)  # int32: these frames' sums fit
        wide = F.pad(raw.permute(0, 3, 1, 2).long().cumsum(2).cumsum(3), (1, 0, 1, 0))
        assert narrow.dtype == torch.int32 and torch.equal(narrow.long(), wide)
        for scale in pyramid_scales(h, w, 20):
            size = (int(h * scale + 1), int(w * scale + 1))
            want = F.interpolate(imgs, size=size, mode="area")
            for integral in (narrow, wide):
                assert torch.equal(mtcnn.area_resize_full(integral, size), want), (frames.shape, size)


def test_stage1_from_the_integral_image_finds_the_pooled_candidates(
    detector: MtcnnDetector, frames_360p: np.ndarray
) -> None:
    """The same levels in the same (NCHW) memory, so P-Net runs the same kernels: the same candidates.
    (CUDA pooled NCHW memory before this path too.)"""
    raw = torch.from_numpy(frames_360p)
    imgs = raw.permute(0, 3, 1, 2).float().contiguous()
    integral = mtcnn.integral_image(raw)
    n = len(frames_360p)
    with torch.inference_mode():
        pooled = _stage1(detector, functools.partial(F.interpolate, imgs, mode="area"), n, 360, 640)
        summed = _stage1(detector, functools.partial(mtcnn.area_resize_full, integral), n, 360, 640)
    assert pooled is not None and summed is not None
    assert torch.equal(pooled.boxes, summed.boxes) and torch.equal(pooled.image, summed.image)


def test_detect_with_the_cuda_pyramid_path_gives_the_reference_faces(
    detector: MtcnnDetector, frames_360p: np.ndarray, monkeypatch: pytest.MonkeyPatch, as_on_cuda: None
) -> None:
    """``detect()`` as CUDA runs it (the integral image made first, the pyramid read from it), on CPU
    tensors: the reference faces."""
    calls: list[str] = []

    def spy(name: str) -> Callable:
        real = getattr(mtcnn, name)
        return lambda *args: (calls.append(name), real(*args))[1]

    monkeypatch.setattr(mtcnn, "integral_image", spy("integral_image"))
    monkeypatch.setattr(mtcnn, "area_resize_full", spy("area_resize_full"))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    got = detector.detect(frames_360p)
    monkeypatch.undo()
    # one integral image, made before stage 1, which reads every pyramid level from it
    assert calls[0] == "integral_image" and calls.count("integral_image") == 1
    assert calls.count("area_resize_full") == len(pyramid_scales(360, 640, detector.min_face_px))
    assert_same_faces(got, reference_detect(detector, frames_360p))


def test_long_suppression_chains_settle_to_the_reference(
    detector: MtcnnDetector, frames_360p: np.ndarray, monkeypatch: pytest.MonkeyPatch, as_on_cuda: None
) -> None:
    monkeypatch.setattr(mtcnn, "NMS_STEPS", 1)  # every NMS reports "not converged" and settles step by step
    frames = frames_360p[:3]
    assert_same_faces(detector.detect(frames), reference_detect(detector, frames))


def test_compacted_cross_scale_nms_gives_the_reference_faces(
    detector: MtcnnDetector, frames_360p: np.ndarray, monkeypatch: pytest.MonkeyPatch, as_on_cuda: None
) -> None:
    monkeypatch.setattr(mtcnn, "CROSS_NMS_BLIND_PAIRS", 0)  # count per-scale survivors first, as with many
    frames = frames_360p[:3]
    assert_same_faces(detector.detect(frames), reference_detect(detector, frames))
    assert count_syncs(lambda: detector.detect(frames)) == 5


def test_host_fallback_gives_the_reference_faces(
    detector: MtcnnDetector, frames_360p: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mtcnn, "CPU_NMS_MAX_PAIRS", 0)  # every NMS through batched_nms on the host
    frames = frames_360p[:3]
    assert_same_faces(detector.detect(frames), reference_detect(detector, frames))


def test_no_frames_and_faceless_frames(detector: MtcnnDetector, frames_360p: np.ndarray) -> None:
    assert detector.detect(frames_360p[:0]) == []
    assert detector.detect(frames_360p[6:7]) == [[]]
    assert detector.detect(np.zeros((2, 10, 10, 3), dtype=np.uint8)) == [
        [],
        [],
    ]  # smaller than one P-Net cell


# ---------------------------------------------------------------- syncs


def test_detect_syncs_four_times_whatever_the_batch(
    detector: MtcnnDetector, frames_360p: np.ndarray, as_on_cuda: None
) -> None:
    assert count_syncs(lambda: detector.detect(frames_360p)) == 4
    assert count_syncs(lambda: detector.detect(frames_360p[:1])) == 4
    assert count_syncs(lambda: detector.detect(frames_360p[6:7])) == 1  # nothing past P-Net's threshold
    # The replaced path read back five times per pyramid scale, more per crop batch (and per NMS group on a GPU).
    assert count_syncs(lambda: reference_detect(detector, frames_360p)) >= 5 * len(
        pyramid_scales(360, 640, 20)
    )


# ---------------------------------------------------------------- GroupNms against batched_nms


def _random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    xy = rng.integers(0, 120, (n, 2)).astype(np.float64)
    wh = rng.integers(0, 40, (n, 2)).astype(np.float64)  # zero sizes make 0/0 overlaps: NaN suppresses
    boxes = np.concatenate([xy, xy + wh], axis=1)
    boxes[n // 2 :] += rng.uniform(-0.5, 0.5, (n - n // 2, 4))  # fractional boxes too (stages 2 and 3)
    boxes[-10:] = boxes[:10]  # exact duplicates
    return boxes


@pytest.mark.parametrize("by_min", [False, True])
@pytest.mark.parametrize("iou_max", [0.5, 0.7])
@pytest.mark.parametrize("steps", [1, 8])
def test_group_nms_equals_batched_nms(by_min: bool, iou_max: float, steps: int) -> None:
    rng = np.random.default_rng(7)
    n = 600
    boxes = _random_boxes(rng, n)
    scores = rng.integers(0, 20, n) / 20  # many ties: order among equals must be by index
    groups = rng.integers(0, 5, n)  # unsorted groups
    active = rng.uniform(size=n) < 0.8
    members = np.flatnonzero(active)
    with np.errstate(invalid="ignore"):
        want = members[batched_nms(boxes[members], scores[members], groups[members], iou_max, by_min=by_min)]
    nms = GroupNms(
        torch.from_numpy(boxes),
        torch.from_numpy(scores),
        torch.from_numpy(groups),
        torch.from_numpy(active),
        iou_max,
        by_min=by_min,
        max_group=int(np.bincount(groups).max()),
    ).step(steps)
    nms.settle()
    assert bool(nms.converged)
    np.testing.assert_array_equal(np.flatnonzero(nms.keep().numpy()), want)


def test_group_nms_of_singletons_keeps_the_active_boxes() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    active = torch.tensor([True, False])
    nms = GroupNms(boxes, torch.tensor([0.9, 0.8]), torch.tensor([0, 1]), active, 0.5, max_group=1).step()
    assert nms.keep().tolist() == [True, False]


# ---------------------------------------------------------------- on CUDA (opt-in: pytest -m gpu <this file>)


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "graphed"])
@pytest.mark.parametrize("size", [(640, 360), (1920, 1080)])
def test_cuda_gives_the_reference_faces_with_four_syncs(
    face_store,
    t1_rgb: np.ndarray,
    astronaut_rgb: np.ndarray,
    camera_rgb: np.ndarray,
    size: tuple[int, int],
    cuda_graph: bool,
) -> None:
    import warnings

    if not torch.cuda.is_available():
        pytest.fail("needs a CUDA device (run on the GPU machine with -m gpu)")
    det = MtcnnDetector(face_store, "cuda", cuda_graph=cuda_graph)
    frames = mixed_frames(size, t1_rgb, astronaut_rgb, camera_rgb)
    assert_same_faces(det.detect(frames), reference_detect(det, frames))
    if cuda_graph:  # replayed, not run eagerly: one capture for this shape, and the eager net's faces
        assert det._graphed is not None and det._graphed.replays >= 1
        eager = MtcnnDetector(face_store, "cuda").detect(frames)
        for got, want in zip(det.detect(frames), eager, strict=True):
            assert [f.box.tolist() for f in got] == [f.box.tolist() for f in want]
            assert [f.score for f in got] == [f.score for f in want]
    assert count_syncs(lambda: det.detect(frames)) == 4
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(
        "warn"
    )  # what the driver calls synchronizing, not what the code looks like
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            det.detect(frames)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchronizing" in str(w.message)]
    assert len(syncs) == 4, [str(w.message) for w in syncs]
