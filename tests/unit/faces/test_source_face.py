"""The user's face image: clear permanent errors for unusable inputs; EXIF orientation honoured."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.errors import InvalidImageError, NoFaceError
from worker.models.source_face import decode_image, load_source_face


def test_empty_file_is_an_invalid_image(tmp_path: Path, detector) -> None:
    path = tmp_path / "face.jpg"
    path.write_bytes(b"")
    with pytest.raises(InvalidImageError, match=r"face\.jpg is empty"):
        load_source_face(path, detector)


def test_text_file_is_not_an_image(tmp_path: Path, detector) -> None:
    path = tmp_path / "face.png"
    path.write_text("definitely not a picture\n")
    with pytest.raises(InvalidImageError, match="not a readable image"):
        load_source_face(path, detector)


def test_missing_file_is_an_invalid_image(tmp_path: Path, detector) -> None:
    with pytest.raises(InvalidImageError, match="cannot read"):
        load_source_face(tmp_path / "nope.jpg", detector)


def test_photo_without_a_face_raises_no_face(detector) -> None:
    import insightface

    mask = Path(insightface.__file__).parent / "data" / "images" / "mask_blue.jpg"
    with pytest.raises(NoFaceError, match="no face found"):
        load_source_face(mask, detector)
    with pytest.raises(NoFaceError, match="no face found"):
        load_source_face(np.full((128, 128, 3), 127, dtype=np.uint8), detector)


def test_face_smaller_than_the_limit_is_refused(detector, astronaut_rgb: np.ndarray) -> None:
    with pytest.raises(NoFaceError, match=r"too small \(\d+ px, need at least 200 px\)"):
        load_source_face(astronaut_rgb, detector, min_face_px=200)


def test_largest_face_is_chosen_from_bytes(detector, t1_half_rgb: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(t1_half_rgb).save(buf, format="PNG")
    source = load_source_face(buf.getvalue(), detector)
    faces = detector.detect(t1_half_rgb[None])[0]
    assert source.face.area_px == pytest.approx(max(f.area_px for f in faces), rel=1e-4)
    assert source.image.shape == t1_half_rgb.shape


def test_exif_orientation_is_applied(tmp_path: Path, astronaut_rgb: np.ndarray, detector) -> None:
    stored = np.ascontiguousarray(np.rot90(astronaut_rgb, 1))  # sideways on disk
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "sideways.jpg"
    Image.fromarray(stored).save(path, format="JPEG", quality=95, exif=exif.tobytes())
    upright = decode_image(path)
    assert upright.shape == astronaut_rgb.shape
    assert np.abs(upright.astype(int) - astronaut_rgb.astype(int)).mean() < 4
    assert load_source_face(path, detector).face.landmarks[0, 1] < 150  # eyes near the top
