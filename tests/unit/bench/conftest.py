"""Fixtures for the benchmark and speed-lever tests (bench helper: only add fixtures here)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from shared.model_store import ensure_store

DEFAULT_TEST_MODEL_STORE = str(Path.home() / ".cache" / "facefarm" / "models")


@pytest.fixture(scope="session")
def model_store() -> Path:
    """The real shipped weights, fetched once per machine (env FACEFARM_TEST_MODEL_STORE)."""
    return ensure_store(Path(os.environ.get("FACEFARM_TEST_MODEL_STORE", DEFAULT_TEST_MODEL_STORE)))


@pytest.fixture()
def seeded() -> None:
    torch.manual_seed(0)
