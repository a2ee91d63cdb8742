"""The bad-input corpus: every case is generated here (nothing binary is committed).

Each ``Case`` builds its input in a directory and says what must happen: the job renders
(``COMPLETED``) or ends with one of the permanent error classes in ``allowed``. The limits the cases
probe are the reliability farm's small ones (``CORPUS_LIMITS``), so every file stays tiny.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

CORPUS_LIMITS = {
    "FACEFARM_MAX_WIDTH": "320",
    "FACEFARM_MAX_HEIGHT": "240",
    "FACEFARM_MAX_DURATION_S": "8",
    "FACEFARM_MAX_FRAMES": "200",
    "FACEFARM_MAX_UPLOAD_BYTES": "3000000",
}
COMPLETED = "COMPLETED"
INVALID_VIDEO, INVALID_IMAGE = "InvalidVideoError", "InvalidImageError"
LIMIT, HDR, NO_FACE, BAD_INPUT = "LimitExceededError", "HdrRefusedError", "NoFaceError", "BadInputError"


@dataclass(frozen=True)
class Case:
    """One input: how to make it, whether it is the video or the face, and the allowed endings."""

    name: str
    make: Callable[[Path], Path]
    role: str  # "video" | "face"
    allowed: frozenset[str]
    options: dict[str, object] = field(default_factory=dict)

    @property
    def renders(self) -> bool:
        return COMPLETED in self.allowed


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True, timeout=60, capture_output=True)


def _lavfi(size: str, frames: int, fps: int = 15) -> list[str]:
    return ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate={fps}", "-frames:v", str(frames)]


def x264(
    name: str, size: str = "160x96", frames: int = 15, fps: int = 15, *extra: str
) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        out = d / name
        ffmpeg(
            *_lavfi(size, frames, fps),
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-pix_fmt",
            "yuv420p",
            *extra,
            str(out),
        )
        return out

    return make


def raw_bytes(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        (d / name).write_bytes(data)
        return d / name

    return make


def cut(name: str, source: Callable[[Path], Path], fraction: float) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        full = source(d)
        data = full.read_bytes()
        (d / name).write_bytes(data[: int(len(data) * fraction)])
        return d / name

    return make


def corrupt_middle(name: str) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        full = x264("corrupt-src-" + name, "160x96", 30, 15, "-g", "10")(d)
        data = bytearray(full.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 1500] = bytes(1500)
        (d / name).write_bytes(bytes(data))
        return d / name

    return make


def audio(name: str, codec: list[str]) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        ffmpeg("-f", "lavfi", "-i", "sine=frequency=300:duration=1", *codec, str(d / name))
        return d / name

    return make


def image(name: str, pixels: np.ndarray, ext: str = ".png") -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        ok, data = cv2.imencode(ext, pixels)
        assert ok
        (d / name).write_bytes(data.tobytes())
        return d / name

    return make


def insightface_image(name: str) -> Path:
    import insightface

    return Path(insightface.__file__).parent / "data" / "images" / name


def face_photo(
    name: str, side_px: int | None = None, source: str = "Tom_Hanks_54745.png"
) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        img = cv2.imread(str(insightface_image(source)))
        if side_px is not None:
            img = cv2.resize(img, (side_px, side_px), interpolation=cv2.INTER_AREA)
        ext = Path(name).suffix
        ok, data = cv2.imencode(ext, img)
        assert ok
        (d / name).write_bytes(data.tobytes())
        return d / name

    return make


def remux_rotated(name: str, degrees: int) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        src = x264("rot-src-" + name, "160x96", 15)(d)
        ffmpeg("-i", str(src), "-c", "copy", "-metadata:s:v:0", f"rotate={degrees}", str(d / name))
        return d / name

    return make


def vfr(name: str) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        ffmpeg(*_lavfi("160x96", 15, 15), "-vf", "setpts='N/15/TB+if(gt(N,7),0.05/TB,0)+if(gt(N,11),0.1/TB,0)'",
               "-fps_mode", "vfr", "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
               str(d / name))  # fmt: skip
        return d / name

    return make


def hdr(name: str, transfer: str) -> Callable[[Path], Path]:
    return x264(
        name, "160x96", 15, 15, "-pix_fmt", "yuv420p10le", "-color_primaries", "bt2020",
        "-color_trc", transfer, "-colorspace", "bt2020nc",
    )  # fmt: skip


def one_pixel(name: str) -> Callable[[Path], Path]:
    """A 1x1 lossless (FFV1) video: decodable, but far too small to encode as 4:2:0."""

    def make(d: Path) -> Path:
        args = ["ffmpeg", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "1x1", "-r", "15"]
        args += ["-i", "-", "-c:v", "ffv1", str(d / name)]
        subprocess.run(args, input=b"\xff\x00\x00" * 5, check=True, timeout=60, capture_output=True)
        return d / name

    return make


def raw_h264(name: str) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        ffmpeg(
            *_lavfi("160x96", 15),
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-pix_fmt",
            "yuv420p",
            "-f",
            "h264",
            str(d / name),
        )
        return d / name

    return make


def copy_of(name: str, path: Path, limit_bytes: int) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        (d / name).write_bytes(path.read_bytes()[:limit_bytes])
        return d / name

    return make


def _rng_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _gradient() -> np.ndarray:
    ramp = np.linspace(0, 255, 200, dtype=np.uint8)
    return np.dstack([np.tile(ramp, (200, 1))] * 3)


def _video(name: str, make: Callable[[Path], Path], *allowed: str, **options: object) -> Case:
    return Case(name, make, "video", frozenset(allowed), dict(options))


def _face(name: str, make: Callable[[Path], Path], *allowed: str) -> Case:
    return Case(name, make, "face", frozenset(allowed))


def corpus() -> list[Case]:
    """Every case, in a fixed order (the table lists them in this order)."""
    valid = x264("valid15.mp4")
    return [
        # --- not a video at all
        _video("zero_bytes.mp4", raw_bytes("zero_bytes.mp4", b""), INVALID_VIDEO),
        _video("text_named.mp4", raw_bytes("text_named.mp4", b"this is not a video\n" * 40), INVALID_VIDEO),
        _video("random_bytes.mp4", raw_bytes("random_bytes.mp4", _rng_bytes(4096, 1)), INVALID_VIDEO),
        _video(
            "html_named.mov",
            raw_bytes("html_named.mov", b"<html><body>hi</body></html>\n" * 20),
            INVALID_VIDEO,
        ),
        _video(
            "pdf_named.mp4", raw_bytes("pdf_named.mp4", b"%PDF-1.4\n" + _rng_bytes(2000, 2)), INVALID_VIDEO
        ),
        _video(
            "zip_named.mkv", raw_bytes("zip_named.mkv", b"PK\x03\x04" + _rng_bytes(2000, 3)), INVALID_VIDEO
        ),
        _video(
            "executable_named.mp4",
            copy_of("executable_named.mp4", Path(sys.executable).resolve(), 16384),
            INVALID_VIDEO,
        ),
        _video(
            "subtitles_named.mp4",
            raw_bytes("subtitles_named.mp4", b"1\n00:00:00,000 --> 00:00:01,000\nhello\n\n"),
            INVALID_VIDEO,
        ),
        # --- truncated / corrupt
        _video(
            "truncated_half.mp4", cut("truncated_half.mp4", x264("full-a.mp4", frames=30), 0.5), INVALID_VIDEO
        ),
        _video(
            "truncated_faststart.mp4",
            cut(
                "truncated_faststart.mp4",
                x264("full-b.mp4", "160x96", 30, 15, "-movflags", "+faststart"),
                0.6,
            ),
            INVALID_VIDEO,
        ),
        _video(
            "truncated_header.mp4",
            cut(
                "truncated_header.mp4", x264("full-c.mp4", "160x96", 30, 15, "-movflags", "+faststart"), 0.02
            ),
            INVALID_VIDEO,
        ),
        _video(
            "truncated.mkv",
            cut("truncated.mkv", x264("full-d.mkv", frames=30), 0.5),
            COMPLETED,
            INVALID_VIDEO,
        ),
        _video("corrupt_mid_stream.mp4", corrupt_middle("corrupt_mid_stream.mp4"), INVALID_VIDEO),
        # --- no video stream / not moving pictures
        _video("audio_only.m4a", audio("audio_only.m4a", ["-c:a", "aac"]), INVALID_VIDEO),
        _video(
            "audio_wav_named.mp4",
            audio("audio_wav_named.mp4", ["-c:a", "pcm_s16le", "-f", "wav"]),
            INVALID_VIDEO,
        ),
        _video("still_png_named.mp4", image("still_png_named.mp4", _gradient()), INVALID_VIDEO),
        _video("still_image.jpg", image("still_image.jpg", _gradient(), ".jpg"), INVALID_VIDEO),
        _video(
            "animated.gif",
            lambda d: (ffmpeg(*_lavfi("64x48", 5), str(d / "animated.gif")), d / "animated.gif")[1],
            INVALID_VIDEO,
        ),
        _video("raw_h264_stream.h264", raw_h264("raw_h264_stream.h264"), INVALID_VIDEO, COMPLETED),
        # --- dimensions, duration, frame count over the (small) limits
        _video("too_wide_400x96.mp4", x264("too_wide_400x96.mp4", "400x96"), LIMIT),
        _video("too_tall_96x300.mp4", x264("too_tall_96x300.mp4", "96x300"), LIMIT),
        _video("huge_1280x720.mp4", x264("huge_1280x720.mp4", "1280x720", 3), LIMIT),
        _video("too_long_10s.mp4", x264("too_long_10s.mp4", "64x48", 10, 1), LIMIT),
        _video("too_many_frames_240.mp4", x264("too_many_frames_240.mp4", "64x48", 240, 120), LIMIT),
        _video("one_pixel_1x1.mkv", one_pixel("one_pixel_1x1.mkv"), INVALID_VIDEO),
        _video("upload_over_limit.mp4", raw_bytes("upload_over_limit.mp4", _rng_bytes(3_200_000, 4)), LIMIT),
        # --- colour, bit depth, timing, geometry: rendered (or refused on purpose)
        _video("hdr_pq.mp4", hdr("hdr_pq.mp4", "smpte2084"), HDR),
        _video("hdr_hlg.mp4", hdr("hdr_hlg.mp4", "arib-std-b67"), HDR),
        _video("hdr_pq_tonemap.mp4", hdr("hdr_pq_tonemap.mp4", "smpte2084"), COMPLETED, hdr="tonemap"),
        _video(
            "ten_bit_sdr.mp4", x264("ten_bit_sdr.mp4", "160x96", 15, 15, "-pix_fmt", "yuv420p10le"), COMPLETED
        ),
        _video("variable_frame_rate.mp4", vfr("variable_frame_rate.mp4"), COMPLETED),
        _video("rotated_90.mp4", remux_rotated("rotated_90.mp4", 90), COMPLETED),
        _video(
            "odd_size_161x97.mp4",
            x264("odd_size_161x97.mp4", "161x97", 15, 15, "-pix_fmt", "yuv444p"),
            COMPLETED,
        ),
        # --- options that cannot apply to this video
        _video("start_beyond_end.mp4", valid, BAD_INPUT, start_s=100.0),
        _video("end_before_start.mp4", valid, BAD_INPUT, start_s=0.6, end_s=0.3),
        # --- face images
        _face("face_zero_bytes.png", raw_bytes("face_zero_bytes.png", b""), INVALID_IMAGE),
        _face("face_text.png", raw_bytes("face_text.png", b"not an image\n" * 20), INVALID_IMAGE),
        _face(
            "face_corrupt.jpg",
            raw_bytes("face_corrupt.jpg", b"\xff\xd8\xff\xe0" + _rng_bytes(3000, 5)),
            INVALID_IMAGE,
        ),
        _face(
            "face_truncated.png",
            cut("face_truncated.png", face_photo("face_full.png"), 0.3),
            INVALID_IMAGE,
            NO_FACE,
            COMPLETED,
        ),
        _face("face_is_a_video.mp4", x264("face_is_a_video.mp4"), INVALID_IMAGE),
        _face(
            "face_svg.svg",
            raw_bytes("face_svg.svg", b'<svg xmlns="http://www.w3.org/2000/svg"><circle r="5"/></svg>'),
            INVALID_IMAGE,
        ),
        _face("face_tiny_16px.png", face_photo("face_tiny_16px.png", 16), NO_FACE),
        _face("face_small_40px.png", face_photo("face_small_40px.png", 40), NO_FACE, COMPLETED),
        _face("face_no_face.png", image("face_no_face.png", _gradient()), NO_FACE),
        _face("face_several_faces.jpg", face_photo("face_several_faces.jpg", None, "t1.jpg"), COMPLETED),
    ]


def build(case: Case, directory: Path) -> Path:
    """The case's input file, made fresh in its own subdirectory."""
    where = directory / case.name.replace(".", "_")
    if where.exists():
        shutil.rmtree(where)
    where.mkdir(parents=True)
    return case.make(where)
