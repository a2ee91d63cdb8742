"""Side-by-side strips (input | classic | mesh) for the docs, from skimage's public-domain photos only.

Source face: the astronaut; targets: the camera man, and the astronaut's own photo with the camera man's
face as source. ``python scripts/make_strips.py [--store DIR]`` writes ``docs/strips/*.png`` and a
``manifest.json`` with the sha256 of every strip, which ``tests/unit/mesh/test_strips.py`` checks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STRIPS_DIR = ROOT / "docs" / "strips"
STRIP_HEIGHT_PX = 256


def _inputs() -> dict[str, np.ndarray]:
    from skimage import data

    return {"astronaut": data.astronaut(), "camera": np.repeat(data.camera()[..., None], 3, axis=2)}


def _crop_around(image: np.ndarray, box: np.ndarray, scale: float = 2.2) -> tuple[slice, slice]:
    cx, cy = (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
    half = scale * max(box[2] - box[0], box[3] - box[1]) / 2.0
    h, w = image.shape[:2]
    y0, y1 = int(max(cy - half, 0)), int(min(cy + half, h))
    x0, x1 = int(max(cx - half, 0)), int(min(cx + half, w))
    return slice(y0, y1), slice(x0, x1)


def make_strips(store: Path) -> dict[str, np.ndarray]:
    """name -> RGB strip: the target, the classic swap and the mesh swap of each pair, side by side."""
    from worker.models.detect_mtcnn import MtcnnDetector
    from worker.models.mesh.swapper import MeshSwapper
    from worker.models.source_face import SourceFace
    from worker.models.swap_classic import ClassicSwapper

    detector = MtcnnDetector(store, "cpu")
    images = _inputs()
    faces = {name: detector.detect(img)[0][0] for name, img in images.items()}
    strips = {}
    for source, target in (("astronaut", "camera"), ("camera", "astronaut")):
        src_img, tgt_img = images[source], images[target]
        classic = ClassicSwapper(SourceFace(src_img, faces[source])).swap_batch(
            tgt_img[None], [[faces[target]]]
        )[0]
        mesh = MeshSwapper(src_img, faces[source], store, "cpu", smooth=False).swap_batch(
            tgt_img[None], [[faces[target]]]
        )[0]
        rows, cols = _crop_around(tgt_img, faces[target].box)
        panels = []
        for panel in (tgt_img, classic.frame, mesh.frame):
            crop = panel[rows, cols]
            width = round(crop.shape[1] * STRIP_HEIGHT_PX / crop.shape[0])
            panels.append(cv2.resize(crop, (width, STRIP_HEIGHT_PX), interpolation=cv2.INTER_AREA))
        strips[f"{source}_onto_{target}"] = np.concatenate(panels, axis=1)
    return strips


def encode_png(strip: np.ndarray) -> bytes:
    ok, png = cv2.imencode(".png", cv2.cvtColor(strip, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return png.tobytes()


def main() -> None:
    from shared.model_store import ensure_store
    from shared.settings import get_settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path(get_settings().model_store))
    parser.add_argument("--out", type=Path, default=STRIPS_DIR)
    args = parser.parse_args()
    strips = make_strips(ensure_store(args.store))
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name, strip in strips.items():
        data = encode_png(strip)
        (args.out / f"{name}.png").write_bytes(data)
        manifest[name] = hashlib.sha256(strip.tobytes()).hexdigest()
        print(f"wrote {args.out / name}.png {strip.shape[1]}x{strip.shape[0]}")
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
