"""``facefarm swap-image``: swap the face of one photo into another, labelled as synthetic media."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from shared.errors import BadInputError, NoFaceError, StorageAccessError
from worker.models.engine import FaceEngine
from worker.models.source_face import decode_image

DEFAULT_LABEL = "synthetic media: face-swapped with FaceFarm"
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def write_labelled_image(rgb: np.ndarray, output_path: Path, *, label: str, jpeg_quality: int = 95) -> None:
    """Write PNG (tEXt ``Comment``) or JPEG (COM segment) carrying ``label``, atomically."""
    output_path = Path(output_path)
    fmt = OUTPUT_FORMATS.get(output_path.suffix.lower())
    if fmt is None:
        raise BadInputError(
            f"output {output_path} must end in .png, .jpg or .jpeg (got {output_path.suffix or 'no extension'})"
        )
    image = Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")
    options: dict[str, Any]
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("Comment", label)
        info.add_text("Software", "FaceFarm")
        options = {"pnginfo": info}
    else:
        options = {"comment": label.encode("utf-8"), "quality": jpeg_quality}
    try:
        output_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=output_path.parent, prefix=f".{output_path.name}.", suffix=".part")
        os.close(fd)
    except OSError as exc:
        raise StorageAccessError(f"cannot write {output_path}: {exc.strerror or exc}") from exc
    try:
        image.save(tmp, format=fmt, **options)
        os.replace(tmp, output_path)
    except OSError as exc:
        raise StorageAccessError(f"cannot write {output_path}: {exc.strerror or exc}") from exc
    finally:
        Path(tmp).unlink(missing_ok=True)


def swap_image(
    face_path: Path | str,
    target_path: Path | str,
    output_path: Path | str,
    *,
    swapper: str,
    store: Path,
    device: torch.device | str,
    label: str = DEFAULT_LABEL,
    selector: str = "all",
) -> dict[str, Any]:
    """Swap the face from ``face_path`` into every (selected) face of ``target_path``; return stats."""
    source = decode_image(face_path, label="face image")
    target = decode_image(target_path, label="target image")
    engine = FaceEngine(
        swapper_name=swapper,
        source_image=source,
        store=store,
        device=device,
        selector=selector,
        smoothing=False,
    )
    out = engine.process(target[None], [True])[0]
    stats = engine.stats
    if stats["faces"] == 0:
        raise NoFaceError(
            f"no face found in the target image {target_path} ({target.shape[1]}x{target.shape[0]} px); "
            "nothing to swap"
        )
    write_labelled_image(out, Path(output_path), label=label)
    return {
        **stats,
        "width": int(target.shape[1]),
        "height": int(target.shape[0]),
        "output": str(output_path),
    }
