"""GPU tests (opt-in: ``pytest -m gpu tests/gpu``), run on the lent H100; CI has no GPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.fail("tests/gpu needs a CUDA device (run them on the GPU machine with -m gpu)")
    return torch.device("cuda", 0)


@pytest.fixture(scope="session")
def gpu_store() -> Path:
    return Path(os.environ.get("FACEFARM_TEST_MODEL_STORE", "models-store"))
