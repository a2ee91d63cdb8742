"""Fixtures for the face pipeline tests: real photos from installed packages, generated ONNX models.

The insightface models (inswapper, ArcFace, SCRFD) are never shipped or downloaded; tests use small
generated graphs with the same input/output names, shapes and initializer layout.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from shared.model_store import add_model, ensure_store
from worker.models.detect_mtcnn import MtcnnDetector

DEFAULT_TEST_MODEL_STORE = str(Path.home() / ".cache" / "facefarm" / "models")


def insightface_image(name: str) -> np.ndarray:
    """An RGB image from the installed insightface package's data/images."""
    import insightface

    path = Path(insightface.__file__).parent / "data" / "images" / name
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None, path
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="session")
def face_store() -> Path:
    """The shipped weights (MTCNN etc.), fetched once per machine."""
    return ensure_store(Path(os.environ.get("FACEFARM_TEST_MODEL_STORE", DEFAULT_TEST_MODEL_STORE)))


@pytest.fixture(scope="session")
def detector(face_store: Path) -> MtcnnDetector:
    return MtcnnDetector(face_store, "cpu")


@pytest.fixture(scope="session")
def t1_rgb() -> np.ndarray:
    return insightface_image("t1.jpg")


@pytest.fixture(scope="session")
def t1_half_rgb(t1_rgb: np.ndarray) -> np.ndarray:
    """t1.jpg at 640x443: still 6 detectable faces (~50 px), four times less detection work."""
    return cv2.resize(t1_rgb, (640, 443), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="session")
def hanks_rgb() -> np.ndarray:
    return insightface_image("Tom_Hanks_54745.png")


@pytest.fixture(scope="session")
def astronaut_rgb() -> np.ndarray:
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="session")
def camera_rgb() -> np.ndarray:
    from skimage import data

    return np.repeat(data.camera()[..., None], 3, axis=2)


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(arr, name)


def make_inswapper_onnx(path: Path, *, seed: int = 0) -> np.ndarray:
    """A tiny graph shaped like inswapper_128: target [1,3,128,128] + source [1,512] -> output
    [1,3,128,128] in [0,1]; its last initializer is a 512x512 emap. Returns the emap."""
    rng = np.random.default_rng(seed)
    w_style = (rng.standard_normal((512, 16)) * 0.05).astype(np.float32)
    w_conv1 = (rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32)
    w_conv2 = (rng.standard_normal((3, 16, 1, 1)) * 0.3).astype(np.float32)
    emap = rng.standard_normal((512, 512)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["source", "w_style"], ["style"]),
        helper.make_node("Reshape", ["style", "style_shape"], ["style4"]),
        helper.make_node("Conv", ["target", "w_conv1"], ["feat"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["feat", "style4"], ["mixed"]),
        helper.make_node("Relu", ["mixed"], ["act"]),
        helper.make_node("Conv", ["act", "w_conv2"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "inswapper_like",
        [
            helper.make_tensor_value_info("target", TensorProto.FLOAT, [1, 3, 128, 128]),
            helper.make_tensor_value_info("source", TensorProto.FLOAT, [1, 512]),
        ],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 128, 128])],
        initializer=[
            _init("w_style", w_style),
            _init("style_shape", np.array([1, 16, 1, 1], dtype=np.int64)),
            _init("w_conv1", w_conv1),
            _init("w_conv2", w_conv2),
            _init("emap", emap),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return emap


def make_arcface_onnx(path: Path, *, seed: int = 1) -> None:
    """A tiny ArcFace-shaped graph: input [1,3,112,112] -> [1,512] (a fixed random projection)."""
    rng = np.random.default_rng(seed)
    w_conv = (rng.standard_normal((8, 3, 8, 8)) * 0.05).astype(np.float32)
    w_fc = (rng.standard_normal((8 * 14 * 14, 512)) * 0.05).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["input.1", "w_conv"], ["feat"], strides=[8, 8]),
        helper.make_node("Flatten", ["feat"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w_fc"], ["683"]),
    ]
    graph = helper.make_graph(
        nodes,
        "arcface_like",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, [1, 512])],
        initializer=[_init("w_conv", w_conv), _init("w_fc", w_fc)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.fixture(scope="session")
def user_store(tmp_path_factory: pytest.TempPathFactory, face_store: Path) -> Path:
    """A store with the shipped MTCNN weights linked in and generated insightface-like user models."""
    store = tmp_path_factory.mktemp("user_store")
    for sub in ("facenet-pytorch",):
        (store / sub).symlink_to(face_store / sub, target_is_directory=True)
    gen = tmp_path_factory.mktemp("generated")
    make_inswapper_onnx(gen / "inswapper_128.onnx")
    make_arcface_onnx(gen / "w600k_r50.onnx")
    for name in ("inswapper_128.onnx", "w600k_r50.onnx"):
        add_model(store, name, gen / name, licence="test-only", source="generated by the test suite")
    return store
