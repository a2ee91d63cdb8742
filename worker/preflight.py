"""The face check a job passes before it is planned: its face image shows a usable face.

The dispatcher never imports the detector (the import contract), so this runs in a CPU-only worker
process on the ``check`` queue, before any chunk exists: a photo with no face, or one too small,
ends the job FAILED within a second instead of at its first render attempt. It uses the render's
own detector and thresholds (``load_source_face``), so what passes here is what a render accepts.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from worker.models.engine import create_detector
from worker.models.faces import FaceDetector
from worker.models.source_face import SourceFace, load_source_face

CHECK_DETECTOR = "mtcnn"  # FaceEngine's default detector: the check must agree with the render

_detectors: dict[str, FaceDetector] = {}
_detectors_lock = threading.Lock()


def cpu_detector(store: Path) -> FaceDetector:
    """The process's CPU detector for ``store`` (loaded once; the check never touches a GPU)."""
    key = str(store)
    with _detectors_lock:
        if key not in _detectors:
            _detectors[key] = create_detector(CHECK_DETECTOR, store, torch.device("cpu"))
        return _detectors[key]


def check_face(image: np.ndarray, store: Path, *, label: str) -> SourceFace:
    """The face the render will use; ``NoFaceError`` (naming ``label``) when there is none to use."""
    return load_source_face(image, cpu_detector(store), label=label)
