"""A test clip with real faces, made with PyAV only (the GPU machine has no ffmpeg binary).

Frames pan across a canvas of insightface's ``t1.jpg`` (six faces, scaled up) and skimage's
astronaut, so every frame differs (the encoder sees motion) and the detector finds faces. The GPU
machine has neither package: ``export_source_images`` writes the images into a folder that travels
with the device call, and everything here reads them from that folder.

    python bench/make_clip.py --out clip.mp4 --width 1920 --height 1080 --frames 240
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

GROUP_PHOTO = "t1.jpg"
ASTRONAUT = "astronaut.png"
SOURCE_FACE = "source_face.png"
PAN_PERIOD_FRAMES = 90
CANVAS_MARGIN = 1.2  # the canvas is this much larger than a frame, so the window can pan
SMALL_FRAME_PX = 360  # below this height the canvas is the astronaut's face, so faces stay detectable


@dataclass(frozen=True)
class ClipInfo:
    """What the pipeline needs of a clip, read back with PyAV (no ffprobe)."""

    path: Path
    width: int
    height: int
    fps: Fraction
    time_base: Fraction
    frames: int
    first_pts: int


def _read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(f"cannot read image {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def load_source_images(images_dir: Path | None) -> dict[str, np.ndarray]:
    """The group photo, the astronaut and the swap's source face, as RGB uint8.

    From ``images_dir`` when given (the device machine), else from the installed packages.
    """
    if images_dir is not None:
        return {name: _read_rgb(Path(images_dir) / name) for name in (GROUP_PHOTO, ASTRONAUT, SOURCE_FACE)}
    import insightface
    from skimage import data

    package_images = Path(insightface.__file__).parent / "data" / "images"
    astronaut = data.astronaut()
    return {
        GROUP_PHOTO: _read_rgb(package_images / GROUP_PHOTO),
        ASTRONAUT: astronaut,
        SOURCE_FACE: astronaut[40:290, 110:340].copy(),
    }


def export_source_images(images_dir: Path) -> list[Path]:
    """Write the three images into ``images_dir`` (run where skimage and insightface exist)."""
    images_dir = Path(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, rgb in load_source_images(None).items():
        path = images_dir / name
        if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
            raise OSError(f"cannot write {path}")
        written.append(path)
    return written


def build_canvas(images: dict[str, np.ndarray], width: int, height: int) -> np.ndarray:
    """A canvas ``CANVAS_MARGIN`` times the frame: group photo left, astronauts stacked right."""
    canvas_w, canvas_h = math.ceil(width * CANVAS_MARGIN), math.ceil(height * CANVAS_MARGIN)
    if height < SMALL_FRAME_PX:
        face = images[ASTRONAUT][40:240, 130:330]
        return cv2.resize(face, (canvas_w, canvas_h), interpolation=cv2.INTER_AREA)
    group = images[GROUP_PHOTO]
    group_w = min(canvas_w, round(group.shape[1] * canvas_h / group.shape[0]))
    canvas = np.empty((canvas_h, canvas_w, 3), np.uint8)
    canvas[:, :group_w] = cv2.resize(group, (group_w, canvas_h), interpolation=cv2.INTER_CUBIC)
    rest = canvas_w - group_w
    if rest > 0:
        tile = cv2.resize(images[ASTRONAUT], (rest, rest), interpolation=cv2.INTER_AREA)
        column = np.concatenate([tile] * math.ceil(canvas_h / rest))[:canvas_h]
        canvas[:, group_w:] = column
    return canvas


def frame_at(canvas: np.ndarray, index: int, width: int, height: int) -> np.ndarray:
    """Frame ``index``: a ``width x height`` window panning smoothly over the canvas."""
    phase = 2 * math.pi * index / PAN_PERIOD_FRAMES
    x = round((canvas.shape[1] - width) * (0.5 + 0.5 * math.sin(phase)))
    y = round((canvas.shape[0] - height) * (0.5 + 0.5 * math.cos(phase)))
    return np.ascontiguousarray(canvas[y : y + height, x : x + width])


def write_clip(
    path: Path,
    images: dict[str, np.ndarray],
    *,
    width: int,
    height: int,
    frames: int,
    fps: int = 30,
    crf: int = 18,
    preset: str = "veryfast",
    gop_frames: int = 60,
) -> ClipInfo:
    """Encode ``frames`` panning frames as H.264 yuv420p in ``path`` (.mp4); returns its stream info."""
    import av

    canvas = build_canvas(images, width, height)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop_frames
        stream.options = {"crf": str(crf), "preset": preset}
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(frame_at(canvas, index, width, height), format="rgb24")
            frame = frame.reformat(format="yuv420p")
            frame.pts = index
            frame.time_base = Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return read_clip_info(path)


def read_clip_info(path: Path) -> ClipInfo:
    """Size, rate, time base, frame count and first pts of the first video stream, by demuxing."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        pts = sorted(p.pts for p in container.demux(stream) if p.size and p.pts is not None)
        rate = stream.average_rate or stream.guessed_rate
        return ClipInfo(
            path=Path(path),
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            fps=Fraction(rate) if rate is not None else Fraction(30),
            time_base=Fraction(stream.time_base or Fraction(1, 90000)),
            frames=len(pts),
            first_pts=pts[0] if pts else 0,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=Path, default=None, help="folder from export_source_images")
    parser.add_argument(
        "--export-images", type=Path, default=None, help="write the source images here and stop"
    )
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--frames", type=int, default=240)
    parser.add_argument("--fps", type=int, default=30)
    args = parser.parse_args(argv)
    if args.export_images is not None:
        for path in export_source_images(args.export_images):
            print(path)
        return
    info = write_clip(
        args.out,
        load_source_images(args.images),
        width=args.width,
        height=args.height,
        frames=args.frames,
        fps=args.fps,
    )
    print(info)


if __name__ == "__main__":
    main()
