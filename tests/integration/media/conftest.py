"""Tiny real test videos made with the ffmpeg CLI from a pan/zoom over skimage's astronaut.

Session-scoped: each file is encoded once (a few frames at 160x96) and only read by the tests.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest

from shared.ffmpeg import raw_encode_args, run_ffmpeg

WIDTH, HEIGHT = 160, 96
NTSC = "30000/1001"
# VFR: frame N at N*1001 + 7*floor(N^2/30) ticks of 1/30000 s, i.e. gaps grow from 33 ms to ~45 ms.
VFR_SETPTS = "settb=1/30000,setpts='N*1001+floor(N*N/30)*7'"
VFR_OUTPUT = ["-fps_mode", "passthrough", "-enc_time_base", "1/30000", "-video_track_timescale", "30000"]


def pan_zoom_frames(count: int, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """``count`` distinct RGB frames: a window sliding and zooming over the astronaut photo."""
    from skimage import data

    photo = data.astronaut()
    frames = np.empty((count, height, width, 3), np.uint8)
    for i in range(count):
        t = i / max(1, count - 1)
        crop_h = int(300 - 120 * t)
        crop_w = int(crop_h * width / height)
        y = int(20 + 150 * t)
        x = int(10 + (512 - crop_w - 20) * t)
        frames[i] = cv2.resize(
            photo[y : y + crop_h, x : x + crop_w], (width, height), interpolation=cv2.INTER_AREA
        )
    return frames


def make_video(
    path: Path,
    frames: int,
    *,
    keyint: int = 250,
    audio: bool = False,
    extra_output: Sequence[str] = (),
    width: int = WIDTH,
    height: int = HEIGHT,
) -> Path:
    pixels = pan_zoom_frames(frames, width, height)
    args = raw_encode_args(
        output=path,
        width=width,
        height=height,
        fps=NTSC,
        frames=frames,
        keyint=keyint,
        audio=audio,
        extra_output=extra_output,
    )
    run_ffmpeg(args, timeout_s=60, input_bytes=pixels.tobytes())
    return path


def remux(source: Path, path: Path, *options: str) -> Path:
    run_ffmpeg(
        ["ffmpeg", "-v", "error", "-y", "-i", str(source), "-map", "0", "-c", "copy", *options, str(path)],
        timeout_s=60,
    )
    return path


def ffprobe_packets(path: Path, stream: str, entries: str = "pts,flags") -> list[dict[str, str]]:
    from shared.media import parse_packets

    done = run_ffmpeg(
        [
            "ffprobe",
            "-v",
            "error",
            "-select_streams",
            stream,
            "-show_entries",
            f"packet={entries}",
            "-of",
            "compact=p=0:nk=0",
            str(path),
        ],
        timeout_s=60,
    )
    return parse_packets(done.stdout.decode())


def ffprobe_stream(path: Path, stream: str, entries: str) -> dict[str, str]:
    done = run_ffmpeg(
        [
            "ffprobe",
            "-v",
            "error",
            "-select_streams",
            stream,
            "-show_entries",
            f"stream={entries}",
            "-of",
            "default=nw=1",
            str(path),
        ],
        timeout_s=60,
    )
    return dict(line.split("=", 1) for line in done.stdout.decode().splitlines() if "=" in line)


def cli_decode(path: Path, width: int, height: int) -> np.ndarray:
    """All frames decoded and autorotated by the ffmpeg CLI (the reference for 'upright')."""
    done = subprocess.run(
        ["ffmpeg", "-v", "error", "-nostdin", "-i", str(path), "-map", "0:v:0", "-fps_mode", "passthrough",
         "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    return np.frombuffer(done.stdout, np.uint8).reshape(-1, height, width, 3)


@dataclass(frozen=True)
class Media:
    """The session's test videos."""

    long_gop: Path  # 90 frames, keyframes at 0/40/80, AAC audio, 30000/1001
    single_key: Path  # 90 frames, keyint 250 -> one keyframe, no audio
    vfr: Path  # VFR with audio, keyframes every 40
    rotated: Path  # long_gop with a 90-degree display matrix
    offset: Path  # long_gop remuxed to start at 0.5 s
    odd: Path  # 7 frames of 95x61 (odd size, 4:4:4), one keyframe
    tagged: Path  # bt709 full-range tags


@pytest.fixture(scope="session")
def media(tmp_path_factory: pytest.TempPathFactory) -> Media:
    if shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None:
        pytest.fail("ffmpeg/ffprobe are required for the media integration tests")
    root = tmp_path_factory.mktemp("media")
    long_gop = make_video(root / "long_gop.mp4", 90, keyint=40, audio=True)
    tags = ["-color_range", "pc", "-colorspace", "bt709", "-color_primaries", "bt709", "-color_trc", "bt709"]
    return Media(
        long_gop=long_gop,
        single_key=make_video(root / "single_key.mp4", 90, keyint=250),
        vfr=make_video(
            root / "vfr.mp4", 90, keyint=40, audio=True, extra_output=["-vf", VFR_SETPTS, *VFR_OUTPUT]
        ),
        rotated=remux(long_gop, root / "rotated.mp4", "-metadata:s:v:0", "rotate=90"),
        offset=remux(long_gop, root / "offset.mp4", "-output_ts_offset", "0.5"),
        odd=make_video(root / "odd.mp4", 7, width=95, height=61, extra_output=["-pix_fmt", "yuv444p"]),
        tagged=make_video(root / "tagged.mp4", 30, keyint=10, extra_output=tags),
    )


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def seconds(pts: int, time_base: str) -> Fraction:
    return pts * Fraction(time_base)
