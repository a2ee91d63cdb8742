"""``swap-image``: a labelled PNG/JPEG with the face swapped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.errors import BadInputError, NoFaceError
from worker.models.swap_image import swap_image, write_labelled_image


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, astronaut_rgb: np.ndarray, camera_rgb: np.ndarray):
    d = tmp_path_factory.mktemp("swap_image")
    Image.fromarray(camera_rgb).save(d / "face.png")
    Image.fromarray(astronaut_rgb).save(d / "target.jpg", quality=95)
    Image.fromarray(np.full((96, 96, 3), 90, dtype=np.uint8)).save(d / "blank.png")
    return d


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_swap_image_writes_a_labelled_swapped_image(images: Path, face_store: Path, suffix: str) -> None:
    out = images / f"out{suffix}"
    stats = swap_image(
        images / "face.png",
        images / "target.jpg",
        out,
        swapper="classic",
        store=face_store,
        device="cpu",
        label="synthetic media: test",
    )
    assert stats["faces"] == 1 and stats["faces_by_path"] == {"classic": 1}
    with Image.open(out) as img:
        assert img.size == (512, 512)
        if suffix == ".png":
            assert img.info["Comment"] == "synthetic media: test"
        else:
            assert img.info["comment"] == b"synthetic media: test"
        result = np.asarray(img.convert("RGB"))
    with Image.open(images / "target.jpg") as original:
        target = np.asarray(original.convert("RGB"))
    face_diff = np.abs(result[80:160, 190:260].astype(int) - target[80:160, 190:260].astype(int)).mean()
    corner_diff = np.abs(result[400:, :100].astype(int) - target[400:, :100].astype(int)).mean()
    assert face_diff > 10 and corner_diff < 2


def test_swap_image_without_a_target_face_fails_clearly(images: Path, face_store: Path) -> None:
    with pytest.raises(NoFaceError, match="target image"):
        swap_image(
            images / "face.png",
            images / "blank.png",
            images / "x.png",
            swapper="classic",
            store=face_store,
            device="cpu",
        )
    assert not (images / "x.png").exists()


def test_unsupported_output_extension_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match=r"\.png, \.jpg or \.jpeg"):
        write_labelled_image(np.zeros((8, 8, 3), dtype=np.uint8), tmp_path / "out.gif", label="x")
