"""The committed docs strips are what scripts/make_strips.py makes from the current code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[3]


def _load_script():
    spec = importlib.util.spec_from_file_location("make_strips", ROOT / "scripts" / "make_strips.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_strips_are_not_stale(mesh_store):
    script = _load_script()
    fresh = script.make_strips(mesh_store)
    assert fresh, "no strips generated"
    for name, strip in fresh.items():
        path = script.STRIPS_DIR / f"{name}.png"
        assert path.is_file(), f"{path} missing: run `python scripts/make_strips.py`"
        committed = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        assert committed.shape == strip.shape, f"{path} is stale: run `python scripts/make_strips.py`"
        diff = np.abs(committed.astype(np.int16) - strip.astype(np.int16))
        assert diff.mean() < 0.5 and np.mean(diff > 8) < 0.002, (
            f"{path} is stale: run `python scripts/make_strips.py`"
        )
