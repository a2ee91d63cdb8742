"""The model registry: explicit, unique names, useful errors, loaders that work."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from shared.errors import ModelStoreError, UnknownModelError
from shared.model_store import load_manifest
from worker.models.registry import (
    ModelRegistry,
    build_descriptors,
    get_descriptor,
    get_registry,
)

EXPECTED = {
    "mtcnn",
    "realesrgan-x4plus",
    "realesrgan-x4plus-anime",
    "realesr-animevideov3",
    "face-mesh",
    "inswapper",
    "arcface-w600k-r50",
    "scrfd-10g",
    "gfpgan",
}


def test_registry_lists_every_model_once() -> None:
    assert set(get_registry().names()) == EXPECTED
    assert len(get_registry()) == len(EXPECTED)


def test_duplicate_names_fail_at_construction() -> None:
    descriptors = build_descriptors()
    with pytest.raises(ValueError, match="duplicate model name.*mtcnn"):
        ModelRegistry([*descriptors, replace(descriptors[0])])


def test_unknown_name_lists_known_models() -> None:
    with pytest.raises(UnknownModelError) as err:
        get_descriptor("codeformer")
    assert "codeformer" in str(err.value)
    assert "realesrgan-x4plus" in str(err.value) and "gfpgan" in str(err.value)


def test_shipped_descriptors_name_files_of_the_manifest() -> None:
    shipped_files = {e.name for e in load_manifest()}
    for descriptor in get_registry():
        assert descriptor.weights_bytes > 0 and descriptor.bytes_per_pixel > 0
        if descriptor.shipped:
            assert set(descriptor.files) <= shipped_files, descriptor.name
        else:
            assert not set(descriptor.files) & shipped_files, descriptor.name


def test_sr_descriptor_loads_a_model_with_its_declared_scale(model_store: Path) -> None:
    descriptor = get_descriptor("realesr-animevideov3")
    model = descriptor.load(model_store, device="cpu")
    assert model.scale == descriptor.scale == 4
    assert sum(p.numel() for p in model.net.parameters()) == descriptor.params


def test_user_model_loader_says_how_to_add_missing_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelStoreError, match="facefarm models add"):
        get_descriptor("gfpgan").load(tmp_path)
