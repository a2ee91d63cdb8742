"""Fixtures for the face-mesh tests: the real shipped weights and real face photos from packages."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from shared.model_store import ensure_store

DEFAULT_TEST_MODEL_STORE = str(Path.home() / ".cache" / "facefarm" / "models")
TILE_PX = 224


@pytest.fixture(scope="session")
def mesh_store() -> Path:
    """The model store with mediapipe's face_landmark.tflite (env FACEFARM_TEST_MODEL_STORE)."""
    store = Path(os.environ.get("FACEFARM_TEST_MODEL_STORE", DEFAULT_TEST_MODEL_STORE))
    return ensure_store(store)


def insightface_image(name: str) -> np.ndarray:
    """An RGB image bundled with the installed insightface package (never copied into the repo);
    from ``$FACEFARM_TEST_IMAGES`` where insightface is not installed (the GPU machine)."""
    folder = os.environ.get("FACEFARM_TEST_IMAGES")
    if folder:
        path = Path(folder) / name
    else:
        import insightface

        path = Path(insightface.__file__).parent / "data" / "images" / name
    bgr = cv2.imread(str(path))
    assert bgr is not None, f"missing {path}"
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="session")
def camera_rgb() -> np.ndarray:
    from skimage import data

    return np.repeat(data.camera()[..., None], 3, axis=2)


@pytest.fixture(scope="session")
def t1() -> np.ndarray:
    return insightface_image("t1.jpg")


@pytest.fixture(scope="session")
def tom_hanks() -> np.ndarray:
    """The 112x112 aligned crop, padded so the detector and the 1.5x ROI have context."""
    return cv2.copyMakeBorder(insightface_image("Tom_Hanks_54745.png"), 56, 56, 56, 56, cv2.BORDER_REPLICATE)


@pytest.fixture(scope="session")
def detector(mesh_store: Path):
    from worker.models.detect_mtcnn import MtcnnDetector

    return MtcnnDetector(mesh_store, "cpu")


@pytest.fixture(scope="session")
def landmarker(mesh_store: Path):
    from worker.models.mesh.landmarker import FaceMeshLandmarker

    return FaceMeshLandmarker(mesh_store, "cpu")


def tile_around(
    image: np.ndarray, box: np.ndarray, *, face_frac: float = 0.45, angle_deg: float = 0.0
) -> np.ndarray:
    """A TILE_PX square frame centred on a face box, scaled so the face spans ``face_frac``, rotated."""
    cx, cy = (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
    scale = face_frac * TILE_PX / max(box[2] - box[0], box[3] - box[1])
    m = cv2.getRotationMatrix2D((float(cx), float(cy)), angle_deg, float(scale))
    m[:, 2] += (TILE_PX / 2.0 - cx, TILE_PX / 2.0 - cy)
    return cv2.warpAffine(image, m, (TILE_PX, TILE_PX), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


@pytest.fixture(scope="session")
def target_clip(detector, camera_rgb, t1, tom_hanks) -> tuple[np.ndarray, list[str]]:
    """Frames cycling through distinct real faces (camera, six t1 faces, Tom Hanks), an in-plane
    rotation sweep of two of them, and two frames with no face; all TILE_PX squares."""
    frames, labels = [], []
    for name, image in (("camera", camera_rgb), ("tom", tom_hanks)):
        box = detector.detect(image)[0][0].box
        frames.append(tile_around(image, box))
        labels.append(name)
    t1_faces = detector.detect(t1)[0]
    for k, face in enumerate(sorted(t1_faces, key=lambda f: float(f.box[0]))):
        frames.append(tile_around(t1, face.box))
        labels.append(f"t1-{k}")
        if k in (1, 4):
            for angle in (-40.0, -20.0, 20.0, 40.0):
                frames.append(tile_around(t1, face.box, angle_deg=angle))
                labels.append(f"t1-{k}-rot{int(angle)}")
    wall = cv2.resize(np.ascontiguousarray(t1[20:200, 330:460]), (TILE_PX, TILE_PX))  # wall + lamp, no face
    frames += [wall, np.full((TILE_PX, TILE_PX, 3), 90, np.uint8)]
    labels += ["no-face-wall", "no-face-flat"]
    return np.stack(frames), labels


@pytest.fixture(scope="session")
def source_tom(detector, tom_hanks):
    """The swap source: Tom Hanks (closed mouth, frontal), padded aligned crop, and its face."""
    return tom_hanks, detector.detect(tom_hanks)[0][0]


@pytest.fixture(scope="session")
def swap_clip(detector, target_clip, astronaut) -> tuple[np.ndarray, list[str], list]:
    """The target clip with the astronaut (open smile) in place of the source's own face."""
    frames, labels = target_clip
    frames = frames.copy()
    labels = list(labels)
    i = labels.index("tom")
    frames[i] = tile_around(astronaut, detector.detect(astronaut)[0][0].box)
    labels[i] = "astronaut"
    return frames, labels, detector.detect(frames)
