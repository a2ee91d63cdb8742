"""The input check before planning: the render's own detector, on the CPU, over the stored image."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from shared.errors import InvalidImageError, LimitExceededError, NoFaceError
from shared.images import read_face_image
from shared.settings import Settings
from shared.storage import create_storage
from worker.preflight import check_face, cpu_detector


def _stored(tmp_path: Path, name: str, data: bytes):  # type: ignore[no-untyped-def]
    storage = create_storage(Settings(storage_url=(tmp_path / "store").as_uri()))
    path = tmp_path / name
    path.write_bytes(data)
    return storage, storage.put_file(f"jobs/j/input/{name}", path).uri


def _png(rgb: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return data.tobytes()


def test_a_real_face_passes_and_is_the_face_the_render_would_use(tmp_path, face_store, hanks_rgb) -> None:  # type: ignore[no-untyped-def]
    storage, uri = _stored(tmp_path, "face.png", _png(hanks_rgb))
    image = read_face_image(storage, uri, "me.png")
    assert np.array_equal(image, hanks_rgb)  # upright RGB, exactly the stored pixels
    source = check_face(image, face_store, label="face image me.png")
    assert source.face.size_px > 60
    assert cpu_detector(face_store).device.type == "cpu"  # the check never touches a GPU


def test_a_photo_without_a_face_is_refused_naming_the_file(tmp_path, face_store) -> None:  # type: ignore[no-untyped-def]
    ramp = np.linspace(0, 255, 200, dtype=np.uint8)
    storage, uri = _stored(tmp_path, "face.png", _png(np.dstack([np.tile(ramp, (200, 1))] * 3)))
    with pytest.raises(NoFaceError, match=r"no face found in the face image holiday\.png \(200x200 px\)"):
        check_face(read_face_image(storage, uri, "holiday.png"), face_store, label="face image holiday.png")


@pytest.mark.parametrize(
    ("data", "error", "words"),
    [
        (b"", InvalidImageError, "empty"),
        (b"not an image\n" * 20, InvalidImageError, "not a readable image"),
        (_png(np.zeros((20, 40, 3), np.uint8)), NoFaceError, "40x20 px, too small"),
    ],
)
def test_cheap_refusals_come_before_the_detector(tmp_path, data, error, words) -> None:  # type: ignore[no-untyped-def]
    storage, uri = _stored(tmp_path, "face.png", data)
    with pytest.raises(error, match=words):
        read_face_image(storage, uri, "x.png")


def test_an_oversized_face_image_is_refused_by_its_size_alone(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import shared.images

    monkeypatch.setattr(shared.images, "MAX_FACE_IMAGE_BYTES", 10)
    storage, uri = _stored(tmp_path, "face.png", b"x" * 11)
    with pytest.raises(LimitExceededError, match="11 bytes; the limit is 10"):
        read_face_image(storage, uri, "x.png")
