"""Fixtures shared by the model tests (models and faces helpers: only add fixtures here)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from shared.model_store import ensure_store

DEFAULT_TEST_MODEL_STORE = str(Path.home() / ".cache" / "facefarm" / "models")


@pytest.fixture(scope="session")
def model_store() -> Path:
    """The real shipped weights, fetched once per machine (env FACEFARM_TEST_MODEL_STORE)."""
    store = Path(os.environ.get("FACEFARM_TEST_MODEL_STORE", DEFAULT_TEST_MODEL_STORE))
    return ensure_store(store)


@pytest.fixture(scope="session")
def astronaut_rgb() -> np.ndarray:
    """skimage's public-domain astronaut photo, 512x512 RGB uint8."""
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="session")
def astronaut_face_rgb(astronaut_rgb: np.ndarray) -> np.ndarray:
    """A 64x64 crop of the astronaut's face (rows 100.., cols 190..), for heavy SR nets."""
    return astronaut_rgb[100:164, 190:254].copy()
