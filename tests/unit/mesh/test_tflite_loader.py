"""The hand-written TFLite -> torch loader matches the TFLite interpreter on real face crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from shared.errors import ModelStoreError
from worker.models.mesh.landmarker import INPUT_PX, cut_crop, roi_from_face
from worker.models.mesh.tflite_loader import _same_pads, load_tflite

litert = pytest.importorskip(
    "ai_edge_litert.interpreter", reason="ai-edge-litert is the TFLite oracle (dev extra)"
)


def _interpreter_outputs(path: Path, batch_nhwc: np.ndarray) -> dict[str, np.ndarray]:
    interp = litert.Interpreter(model_path=str(path))
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]["index"]
    outs: dict[str, list[np.ndarray]] = {}
    for item in batch_nhwc:
        interp.set_tensor(inp, item[None].astype(np.float32))
        interp.invoke()
        for d in interp.get_output_details():
            outs.setdefault(d["name"], []).append(interp.get_tensor(d["index"])[0].copy())
    return {k: np.stack(v) for k, v in outs.items()}


@pytest.fixture(scope="module")
def face_crops(detector, astronaut, camera_rgb, t1) -> np.ndarray:
    """192x192 landmark-net crops of 8 real faces (astronaut, camera, six t1 faces), uint8 RGB."""
    crops = []
    for image in (astronaut, camera_rgb, t1):
        for face in detector.detect(image)[0]:
            crops.append(cut_crop(image, roi_from_face(face, 0)))
    assert len(crops) == 8
    return np.stack(crops)


def test_landmarks_match_the_tflite_interpreter_within_0_01_px(mesh_store, face_crops):
    path = mesh_store / "mediapipe" / "face_landmark.tflite"
    x = face_crops.astype(np.float32) / 255.0
    ref = _interpreter_outputs(path, x)
    net = load_tflite(path)
    with torch.inference_mode():
        mesh, flag = net(torch.from_numpy(x).permute(0, 3, 1, 2))
    points = mesh.reshape(len(x), 468, 3).numpy()
    ref_points = ref["conv2d_21"].reshape(len(x), 468, 3)
    assert np.abs(points[..., :2] - ref_points[..., :2]).max() < 0.01
    assert np.abs(points[..., 2] - ref_points[..., 2]).max() < 0.01
    assert np.abs(flag.reshape(-1).numpy() - ref["conv2d_31"].reshape(-1)).max() < 1e-3
    assert (ref["conv2d_31"].reshape(-1) > 5).all()  # real faces: presence logits far above 0


def test_detector_graph_with_reshape_and_concat_matches_the_interpreter(mesh_store, face_crops):
    import cv2

    path = mesh_store / "mediapipe" / "face_detection_short_range.tflite"
    x = np.stack([cv2.resize(c, (128, 128), interpolation=cv2.INTER_AREA) for c in face_crops[:3]])
    x = x.astype(np.float32) / 127.5 - 1.0
    ref = _interpreter_outputs(path, x)
    net = load_tflite(path)
    with torch.inference_mode():
        outs = dict(zip(net.output_names, net(torch.from_numpy(x).permute(0, 3, 1, 2)), strict=True))
    for name in ("regressors", "classificators"):
        assert outs[name].shape == ref[name].shape
        assert np.abs(outs[name].numpy() - ref[name]).max() < 2e-3


def test_tflite_same_padding_puts_the_odd_pixel_after():
    assert _same_pads(192, 3, 2, 1) == (0, 1)
    assert _same_pads(96, 3, 1, 1) == (1, 1)
    assert _same_pads(8, 2, 2, 1) == (0, 0)


def test_batched_run_equals_one_by_one(mesh_store, face_crops):
    net = load_tflite(mesh_store / "mediapipe" / "face_landmark.tflite")
    x = torch.from_numpy(face_crops[:4].astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    with torch.inference_mode():
        together = net(x)[0]
        alone = torch.cat([net(x[i : i + 1])[0] for i in range(4)])
    assert torch.allclose(together, alone, atol=1e-3)
    assert INPUT_PX == x.shape[-1]


def test_missing_or_garbage_file_raises_model_store_error(tmp_path):
    with pytest.raises(ModelStoreError, match="models fetch"):
        load_tflite(tmp_path / "absent.tflite")
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelStoreError):
        load_tflite(bad)
