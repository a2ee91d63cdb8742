"""A short real-face clip (astronaut, camera, face-free frames) and its rotated twin, for the
render pipeline's tests; plus a settings object pointing at the shared model store."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data

from shared.model_store import ensure_store
from shared.settings import Settings

SIZE_PX = 224
FPS = 25


def clip_frames() -> np.ndarray:
    """8 astronaut frames (slow pan), 4 face-free frames, 8 camera frames: (20, 224, 224, 3)."""
    astronaut = cv2.resize(data.astronaut(), (SIZE_PX + 16, SIZE_PX + 16), interpolation=cv2.INTER_AREA)
    camera = np.repeat(
        cv2.resize(data.camera(), (SIZE_PX, SIZE_PX), interpolation=cv2.INTER_AREA)[..., None], 3, 2
    )
    coffee = cv2.resize(data.coffee(), (SIZE_PX, SIZE_PX), interpolation=cv2.INTER_AREA)  # no face
    frames = [astronaut[i : i + SIZE_PX, i : i + SIZE_PX] for i in range(0, 16, 2)]
    frames += [coffee] * 4
    frames += [camera] * 8
    return np.stack(frames)


def write_lossless(frames: np.ndarray, path: Path, *extra: str) -> Path:
    """RGB frames -> lossless H.264 4:4:4 (bit-exact RGB round trip is not needed: same YUV in, same out)."""
    h, w = frames.shape[1:3]
    subprocess.run(
        [
            "ffmpeg",
            "-y",
            "-v",
            "error",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-s",
            f"{w}x{h}",
            "-r",
            str(FPS),
            "-i",
            "-",
            "-c:v",
            "libx264",
            "-qp",
            "0",
            "-pix_fmt",
            "yuv444p",
            "-g",
            "6",
            *extra,
            str(path),
        ],
        input=frames.tobytes(),
        check=True,
    )
    return path


@dataclass(frozen=True)
class Clip:
    video: Path
    rotated: Path
    face: Path
    frames: np.ndarray


@pytest.fixture(scope="session")
def pipeline_store() -> Path:
    return ensure_store(
        Path(os.environ.get("FACEFARM_TEST_MODEL_STORE", str(Path.home() / ".cache" / "facefarm" / "models")))
    )


@pytest.fixture(scope="session")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Clip:
    root = tmp_path_factory.mktemp("pipeline-clip")
    frames = clip_frames()
    video = write_lossless(frames, root / "clip.mp4")
    rotated = root / "rotated.mp4"
    subprocess.run(
        [
            "ffmpeg",
            "-y",
            "-v",
            "error",
            "-i",
            str(video),
            "-c",
            "copy",
            "-metadata:s:v:0",
            "rotate=90",
            str(rotated),
        ],
        check=True,
    )
    import insightface

    hanks = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    return Clip(video=video, rotated=rotated, face=hanks, frames=frames)


@pytest.fixture()
def cpu_settings(pipeline_store: Path) -> Settings:
    return Settings(device="cpu", model_store=str(pipeline_store), batch_frames=4, encoder_threads=1)


@pytest.fixture(scope="session")
def face_detector(pipeline_store: Path):
    from worker.models.detect_mtcnn import MtcnnDetector

    return MtcnnDetector(pipeline_store, "cpu")
