"""SCRFD decoding on a generated ONNX with det_10g's output layout and planted detections."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from shared.errors import ModelStoreError
from worker.models.scrfd import STRIDES, ScrfdDetector, anchor_centers

INPUT_PX = 640
ANCHORS = 2


def _anchor_index(stride: int, x_cell: int, y_cell: int, anchor: int = 0) -> int:
    return (y_cell * (INPUT_PX // stride) + x_cell) * ANCHORS + anchor


def _plant(
    outputs: dict[str, np.ndarray], stride: int, cell: tuple[int, int], score: float, box_ltrb, kps_xy
):
    """Write one detection at an anchor: distances and keypoint offsets in input pixels."""
    k = _anchor_index(stride, *cell)
    cx, cy = cell[0] * stride, cell[1] * stride
    outputs[f"score_{stride}"][k, 0] = score
    outputs[f"bbox_{stride}"][k] = np.asarray(box_ltrb, dtype=np.float32) / stride
    outputs[f"kps_{stride}"][k] = ((np.asarray(kps_xy, dtype=np.float32) - [cx, cy]) / stride).ravel()
    l_, t_, r_, b_ = box_ltrb
    return np.array([cx - l_, cy - t_, cx + r_, cy + b_], dtype=np.float32), np.asarray(kps_xy, np.float32)


def make_scrfd_onnx(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """A graph whose 9 outputs are constants (plus 0 x the input): the planted faces, in input px."""
    outputs: dict[str, np.ndarray] = {}
    for s in STRIDES:
        n = (INPUT_PX // s) ** 2 * ANCHORS
        outputs[f"score_{s}"] = np.zeros((n, 1), dtype=np.float32)
        outputs[f"bbox_{s}"] = np.zeros((n, 4), dtype=np.float32)
        outputs[f"kps_{s}"] = np.zeros((n, 10), dtype=np.float32)
    kps_a = [[300, 140], [340, 140], [320, 160], [305, 185], [335, 185]]
    face_a = _plant(outputs, 16, (20, 10), 0.95, (40, 50, 40, 60), kps_a)
    # a weaker duplicate of face A at the neighbouring anchor: NMS must drop it
    _plant(outputs, 16, (21, 10), 0.7, (52, 48, 30, 62), kps_a)
    kps_b = [[110, 300], [170, 300], [140, 330], [115, 370], [165, 370]]
    face_b = _plant(outputs, 32, (4, 10), 0.88, (60, 40, 60, 100), kps_b)
    # below the 0.5 threshold: must not appear
    _plant(outputs, 8, (60, 60), 0.3, (10, 10, 10, 10), [[480, 480]] * 5)

    names = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in STRIDES]
    nodes = [helper.make_node("ReduceMean", ["input.1"], ["mean"], keepdims=0)]
    nodes.append(helper.make_node("Mul", ["mean", "zero"], ["nothing"]))
    inits = [numpy_helper.from_array(np.zeros((), dtype=np.float32), "zero")]
    for name in names:
        inits.append(numpy_helper.from_array(outputs[name], f"{name}_const"))
        nodes.append(helper.make_node("Add", [f"{name}_const", "nothing"], [name]))
    graph = helper.make_graph(
        nodes,
        "scrfd_like",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, INPUT_PX, INPUT_PX])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(outputs[n].shape)) for n in names],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return [face_a, face_b]


def test_anchor_centres_follow_insightface_layout() -> None:
    c = anchor_centers(64, 64, 16, 2)
    assert c.shape == (4 * 4 * 2, 2)
    np.testing.assert_array_equal(c[:4], [[0, 0], [0, 0], [16, 0], [16, 0]])
    np.testing.assert_array_equal(c[8], [0, 16])


def test_scrfd_decoder_returns_the_planted_faces_in_frame_pixels(tmp_path: Path) -> None:
    planted = make_scrfd_onnx(tmp_path / "det_10g.onnx")
    detector = ScrfdDetector(tmp_path / "det_10g.onnx", "cpu")
    # a 480x320 (WxH) frame letterboxes to 640x427: frame px = input px * 0.75
    frames = np.zeros((2, 320, 480, 3), dtype=np.uint8)
    results = detector.detect(frames)
    assert len(results) == 2
    for faces in results:
        assert len(faces) == 2
        scale = 427 / 320
        by_score = sorted(faces, key=lambda f: -f.score)
        for face, (box, kps) in zip(by_score, planted, strict=True):
            np.testing.assert_allclose(face.box, box / scale, atol=1e-3)
            np.testing.assert_allclose(face.landmarks, kps / scale, atol=1e-3)
        assert [round(f.score, 2) for f in by_score] == [0.95, 0.88]


def test_scrfd_refuses_a_graph_without_nine_outputs(user_store: Path) -> None:
    with pytest.raises(ModelStoreError, match="9"):
        ScrfdDetector(user_store / "user" / "w600k_r50.onnx", "cpu")
