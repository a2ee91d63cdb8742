"""Tiny real test videos (real faces from skimage and insightface, plus face-free frames) and
ffprobe/ffmpeg readers to check what the farm wrote.

Videos are made with the ffmpeg CLI from raw RGB frames; readers use ffprobe/ffmpeg too, so source
and output are measured the same way. A missing ffmpeg fails the test with the fix.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from shared.ffmpeg import raw_encode_args, run_ffmpeg
from tests.support.services import require_tool

TIMEOUT_S = 120
NTSC = "30000/1001"
# VFR: frame N at N*1001 + 7*floor(N^2/30) ticks of 1/30000 s, i.e. gaps grow from 33 ms to ~45 ms.
VFR_SETPTS = "settb=1/30000,setpts='N*1001+floor(N*N/30)*7'"
# Phone-like VFR: gaps alternate 33 and 50 ms, and every 10th frame comes 100 ms late (a stall).
PHONE_VFR_SETPTS = "settb=1/30000,setpts='N*1001+floor(N/2)*500+floor(N/10)*3000'"
VFR_OUTPUT = ["-fps_mode", "passthrough", "-enc_time_base", "1/30000", "-video_track_timescale", "30000"]


def insightface_image(name: str) -> Path:
    """A photo bundled with insightface (``t1.jpg``: six faces, ``Tom_Hanks_54745.png``: one)."""
    import insightface

    return Path(insightface.__file__).parent / "data" / "images" / name


def read_bgr(path: Path) -> np.ndarray:
    image = cv2.imread(str(path))
    if image is None:
        raise FileNotFoundError(f"cannot read test image {path}")
    return np.asarray(image)


# --- frames --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    """A slow pan over a photo: a window (x, y, w, h) that moves by (dx, dy) over the scene."""

    name: str
    window: tuple[int, int, int, int]
    shift: tuple[int, int]
    has_faces: bool


SCENES = {
    "astronaut": Scene("astronaut", (100, 20, 240, 180), (30, 16), True),  # one face, ~58 px at 160 wide
    "group": Scene("group", (30, 90, 570, 428), (40, 0), True),  # three faces of t1.jpg
    "camera": Scene("camera", (130, 70, 200, 150), (16, 12), True),  # the cameraman
    "coffee": Scene("coffee", (60, 40, 400, 300), (60, 40), False),  # a cup: no face
}


def scene_photo(name: str) -> np.ndarray:
    """The RGB photo behind scene ``name``."""
    from skimage import data

    if name == "astronaut":
        return np.asarray(data.astronaut())
    if name == "camera":
        return np.repeat(np.asarray(data.camera())[..., None], 3, axis=2)
    if name == "coffee":
        return np.asarray(data.coffee())
    if name == "group":
        return cv2.cvtColor(read_bgr(insightface_image("t1.jpg")), cv2.COLOR_BGR2RGB)
    raise ValueError(f"unknown scene {name!r}; choose from {sorted(SCENES)}")


def scene_frames(name: str, count: int, width: int, height: int) -> np.ndarray:
    """``count`` distinct RGB frames (count, height, width, 3) panning over scene ``name``."""
    scene = SCENES[name]
    photo = scene_photo(name)
    x, y, w, h = scene.window
    frames = np.empty((count, height, width, 3), np.uint8)
    for i in range(count):
        t = i / max(1, count - 1)
        x0, y0 = round(x + scene.shift[0] * t), round(y + scene.shift[1] * t)
        view = photo[y0 : y0 + h, x0 : x0 + w]
        frames[i] = cv2.resize(view, (width, height), interpolation=cv2.INTER_AREA)
    return frames


def storyboard(scenes: Sequence[tuple[str, int]], width: int, height: int) -> np.ndarray:
    """Scenes one after another, e.g. ``[("astronaut", 12), ("coffee", 12)]``."""
    return np.concatenate([scene_frames(name, count, width, height) for name, count in scenes])


# --- writing videos --------------------------------------------------------------------------------


def write_video(
    frames: np.ndarray,
    path: Path,
    *,
    fps: str = NTSC,
    keyint: int = 250,
    audio: bool = False,
    extra_output: Sequence[str] = (),
) -> Path:
    """H.264 from RGB ``frames`` (one keyframe per ``keyint``), optionally with an AAC sine track."""
    require_tool("ffmpeg")
    height, width = frames.shape[1:3]
    args = raw_encode_args(
        output=path,
        width=width,
        height=height,
        fps=fps,
        frames=len(frames),
        keyint=keyint,
        audio=audio,
        extra_output=extra_output,
    )
    run_ffmpeg(args, timeout_s=TIMEOUT_S, input_bytes=np.ascontiguousarray(frames).tobytes())
    return path


def make_multiface_video(
    path: Path, frames: int, *, gop: int = 1000, width: int = 160, height: int = 96, fps: int = 15
) -> Path:
    """Several real faces (insightface's t1.jpg) panning slowly, long GOP (one keyframe), with audio."""
    require_tool("ffmpeg")
    crop = read_bgr(insightface_image("t1.jpg"))[120:620, 0:830]  # four faces in a row
    args = ["ffmpeg", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "bgr24"]
    args += ["-s", f"{width}x{height}", "-r", str(fps), "-i", "-"]
    args += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={frames / fps:.3f}"]
    args += ["-c:v", "libx264", "-preset", "veryfast", "-g", str(gop), "-keyint_min", str(gop)]
    args += ["-sc_threshold", "0", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(path)]
    pixels = bytearray()
    for i in range(frames):
        x0 = (i * 2) % 40
        view = crop[:, x0 : x0 + 790]
        pixels += np.ascontiguousarray(
            cv2.resize(view, (width, height), interpolation=cv2.INTER_AREA)
        ).tobytes()
    run_ffmpeg(args, timeout_s=TIMEOUT_S, input_bytes=bytes(pixels))
    return path


def remux(source: Path, path: Path, *options: str) -> Path:
    """Stream-copy ``source`` to ``path`` with extra output ``options`` (e.g. rotation metadata)."""
    require_tool("ffmpeg")
    args = ["ffmpeg", "-v", "error", "-nostdin", "-y", "-i", str(source), "-map", "0", "-c", "copy"]
    run_ffmpeg([*args, *options, str(path)], timeout_s=TIMEOUT_S)
    return path


def make_audio_only(path: Path, seconds: float = 1.0) -> Path:
    """An MP4 with an AAC track and no video stream."""
    require_tool("ffmpeg")
    args = ["ffmpeg", "-v", "error", "-nostdin", "-y", "-f", "lavfi"]
    args += ["-i", f"sine=frequency=330:sample_rate=48000:duration={seconds}", "-c:a", "aac", str(path)]
    run_ffmpeg(args, timeout_s=TIMEOUT_S)
    return path


# --- reading videos ------------------------------------------------------------------------------


def ffprobe_json(path_or_url: str | Path, *options: str) -> dict[str, Any]:
    require_tool("ffprobe")
    done = run_ffmpeg(
        ["ffprobe", "-v", "error", *options, "-of", "json", str(path_or_url)], timeout_s=TIMEOUT_S
    )
    return dict(json.loads(done.stdout))


def count_frames(path_or_url: str | Path) -> int:
    """Decoded video frames (``nb_read_frames``)."""
    probe = ffprobe_json(
        path_or_url, "-select_streams", "v:0", "-count_frames", "-show_entries", "stream=nb_read_frames"
    )
    return int(probe["streams"][0]["nb_read_frames"])


def keyframe_count(path: str | Path) -> int:
    probe = ffprobe_json(
        path, "-select_streams", "v:0", "-skip_frame", "nokey", "-count_frames",
        "-show_entries", "stream=nb_read_frames",
    )  # fmt: skip
    return int(probe["streams"][0]["nb_read_frames"])


def stream_fields(path: str | Path, stream: str) -> dict[str, Any]:
    """Every ffprobe field of the first stream matching ``stream`` (``v:0``, ``a:0``), side data included."""
    probe = ffprobe_json(path, "-select_streams", stream, "-show_streams")
    streams = probe.get("streams") or []
    if not streams:
        raise AssertionError(f"{path} has no {stream} stream")
    return dict(streams[0])


def packet_times_s(path: str | Path, stream: str) -> list[Fraction]:
    """Presentation times (seconds, exact) of every packet of ``stream``, in presentation order."""
    time_base = Fraction(stream_fields(path, stream)["time_base"])
    probe = ffprobe_json(path, "-select_streams", stream, "-show_entries", "packet=pts")
    return sorted(int(p["pts"]) * time_base for p in probe["packets"])


def audio_packet_hashes(path: str | Path) -> list[str]:
    """sha256 of every packet of the first audio stream, in order (byte-identical audio = equal lists)."""
    probe = ffprobe_json(
        path, "-select_streams", "a:0", "-show_packets", "-show_data_hash", "sha256",
        "-show_entries", "packet=data_hash",
    )  # fmt: skip
    return [str(p["data_hash"]) for p in probe["packets"]]


def start_time_s(path: str | Path, stream: str) -> Fraction:
    """The stream's start time as ffprobe reports it (edit lists applied)."""
    return Fraction(stream_fields(path, stream)["start_time"])


def rotation_degrees(path: str | Path) -> int:
    """The display rotation a player would apply to the first video stream (0 when none)."""
    fields = stream_fields(path, "v:0")
    for side in fields.get("side_data_list") or []:
        if "rotation" in side:
            return int(side["rotation"]) % 360
    return int((fields.get("tags") or {}).get("rotate", 0)) % 360


def cli_decode(path: str | Path) -> np.ndarray:
    """All frames as RGB (N, H, W, 3), decoded and autorotated by the ffmpeg CLI (the reference for 'upright')."""
    require_tool("ffmpeg")
    fields = stream_fields(path, "v:0")
    width, height = int(fields["width"]), int(fields["height"])
    if rotation_degrees(path) in (90, 270):
        width, height = height, width
    done = subprocess.run(
        ["ffmpeg", "-v", "error", "-nostdin", "-i", str(path), "-map", "0:v:0", "-fps_mode", "passthrough",
         "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        capture_output=True, check=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    return np.frombuffer(done.stdout, np.uint8).reshape(-1, height, width, 3)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images or stacks; identical inputs give infinity."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))
