"""Encode one chunk with the job's fixed settings so every chunk joins the others by stream copy.

Every chunk gets the same codec, profile, level, pix_fmt, time base and colour tags; frame 0 is an
IDR, GOPs are closed and there are no B-frames, so decode order equals presentation order and
the DTS of consecutive chunks never collide at a join, also for variable frame rate. Frames keep
their source timestamps. The encoder's thread count is pinned, so the same frames and settings
give a bit-identical file.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

import av
import av.error
import numpy as np
from av.container import OutputContainer
from av.video.reformatter import ColorRange
from av.video.stream import VideoStream

from shared.cpus import usable_cpu_count
from shared.errors import ExternalToolError, InvalidVideoError
from shared.schemas import EncoderSettings
from worker.frames.colour import (
    AVCOL_PRIMARIES,
    AVCOL_RANGE,
    AVCOL_SPACE,
    AVCOL_TRC,
    INTERPOLATION,
    matrix_for_name,
    range_for_name,
)

GOP_SECONDS = 4  # a keyframe at least this often inside a chunk (seeking in the output)
# MP4/MOV keep the source time base exactly (movie and track timescale pinned to it); Matroska
# would round every timestamp to 1 ms, so it is not offered.
CONTAINERS = {".mp4": "mp4", ".mov": "mov"}


_PARALLEL_CONVERT_MIN_PIXELS = 1280 * 720
_CONVERT_THREADS = max(1, min(8, usable_cpu_count() // 2))
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _convert_pool() -> ThreadPoolExecutor:
    """Threads for RGB -> YUV conversion of large frames (made on first use, shared per process)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_CONVERT_THREADS, thread_name_prefix="rgb2yuv")
        return _pool


class ChunkEncoder:
    """Writes upright RGB frames with source timestamps into one chunk file; use as a context manager."""

    def __init__(
        self, path: Path, container: OutputContainer, stream: VideoStream, settings: EncoderSettings
    ):
        self.path = path
        self._container = container
        self._stream = stream
        self._settings = settings
        self._matrix = matrix_for_name(settings.color_space)
        self._range = range_for_name(settings.color_range)
        self._written_pts: list[int] = []
        self._nominal_duration = max(1, round(1 / (settings.fps * settings.time_base)))
        self._packets = 0
        self._closed = False
        self.flush_s = 0.0  # seconds close() spent flushing the encoder (its frames still in flight)

    def __enter__(self) -> ChunkEncoder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
            return
        self._abort()

    def write(self, frames: np.ndarray, pts: Sequence[int]) -> None:
        """Encode ``frames`` ((N,H,W,3) uint8 RGB) stamped with their source ``pts`` (increasing)."""
        if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"expected (N,H,W,3) uint8 RGB frames, got {frames.shape} {frames.dtype}")
        if len(frames) != len(pts):
            raise ValueError(f"{len(frames)} frames but {len(pts)} timestamps")
        fitted = [self._fit(rgb) for rgb in frames]
        if len(fitted) > 1 and fitted[0].size >= _PARALLEL_CONVERT_MIN_PIXELS * 3:
            # swscale releases the GIL: convert a batch's frames side by side, encode in order.
            converted = list(_convert_pool().map(self._to_yuv, fitted))
        else:
            converted = [self._to_yuv(rgb) for rgb in fitted]
        for yuv, stamp in zip(converted, pts, strict=True):
            self._write_one(yuv, int(stamp))

    def close(self) -> int:
        """Flush the encoder, finish the file; returns the number of frames written."""
        if self._closed:
            return self._packets
        started = time.perf_counter()
        try:
            self._mux(self._stream.encode(None))
            self._container.close()
            self.flush_s = time.perf_counter() - started
        except av.error.FFmpegError as exc:
            self._abort()
            raise ExternalToolError(f"encoding {self.path} failed while flushing: {exc}") from exc
        self._closed = True
        if self._packets != len(self._written_pts):
            raise ExternalToolError(
                f"{self.path}: the encoder wrote {self._packets} frames for {len(self._written_pts)} inputs"
            )
        return self._packets

    def _fit(self, rgb: np.ndarray) -> np.ndarray:
        """Crop the odd last row/column the planner rounded away; any other size is a caller bug."""
        height, width = self._settings.height, self._settings.width
        if rgb.shape[0] == height and rgb.shape[1] == width:
            return rgb
        if rgb.shape[0] - height in (0, 1) and rgb.shape[1] - width in (0, 1):
            return np.ascontiguousarray(rgb[:height, :width])
        raise ValueError(f"frame is {rgb.shape[1]}x{rgb.shape[0]}, the encoder expects {width}x{height}")

    def _to_yuv(self, rgb: np.ndarray) -> av.VideoFrame:
        frame = rgb_frame(rgb)
        return frame.reformat(
            format=self._settings.pix_fmt,
            src_colorspace=self._matrix,
            dst_colorspace=self._matrix,
            src_color_range=ColorRange.JPEG,
            dst_color_range=self._range,
            interpolation=INTERPOLATION,
        )

    def _write_one(self, yuv: av.VideoFrame, pts: int) -> None:
        if self._written_pts and pts <= self._written_pts[-1]:
            raise ValueError(f"timestamps must increase: {pts} after {self._written_pts[-1]}")
        yuv.pts = pts
        yuv.time_base = self._settings.time_base
        self._written_pts.append(pts)
        try:
            self._mux(self._stream.encode(yuv))
        except av.error.FFmpegError as exc:
            self._abort()
            raise ExternalToolError(f"encoding {self.path} failed at pts {pts}: {exc}") from exc

    def _mux(self, packets: Sequence[av.Packet]) -> None:
        for packet in packets:
            if packet.pts is not None:
                packet.duration = self._duration_of(packet.pts)
            self._container.mux(packet)
            self._packets += 1

    def _duration_of(self, pts: int) -> int:
        """Until the next written frame (exact for VFR); the last frame gets the nominal duration."""
        position = bisect.bisect_right(self._written_pts, pts)
        if position < len(self._written_pts):
            return self._written_pts[position] - pts
        return self._nominal_duration

    def _abort(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._container.close()
            except av.error.FFmpegError:
                pass
            self.path.unlink(missing_ok=True)


def rgb_frame(rgb: np.ndarray) -> av.VideoFrame:
    """An rgb24 ``av.VideoFrame`` holding a copy of (H,W,3) uint8 ``rgb``.

    ``VideoFrame.from_ndarray`` copies while holding the GIL (a 4K frame stalled every other thread of
    the render process for ~3-6 ms, and the conversion pool runs several at once); numpy's copy into
    the frame's own plane releases it.
    """
    height, width = rgb.shape[:2]
    frame = av.VideoFrame(width, height, "rgb24")
    plane = frame.planes[0]
    rows = np.frombuffer(memoryview(plane), np.uint8).reshape(height, plane.line_size)
    np.copyto(rows[:, : width * 3].reshape(height, width, 3), rgb)
    return frame


def open_encoder(path: Path, settings: EncoderSettings) -> ChunkEncoder:
    """A chunk encoder writing ``path`` (.mp4 or .mov)."""
    container_format = CONTAINERS.get(path.suffix.lower())
    if container_format is None:
        raise ValueError(f"{path}: chunk files must end in one of {sorted(CONTAINERS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    timescale = str(settings.time_base_den // math.gcd(settings.time_base_num, settings.time_base_den))
    # The movie timescale (default 1000) would round the edit list that places the first frame at
    # its source pts to whole milliseconds; pinning both timescales keeps every pts exact.
    container = av.open(
        str(path),
        mode="w",
        format=container_format,
        options={"movie_timescale": timescale, "video_track_timescale": timescale},
    )
    try:
        stream = container.add_stream(settings.codec, rate=settings.fps)
        _configure(stream, settings)
    except (av.error.FFmpegError, ValueError) as exc:
        container.close()
        path.unlink(missing_ok=True)
        raise ExternalToolError(f"cannot set up {settings.codec} for {path}: {exc}") from exc
    return ChunkEncoder(path, container, stream, settings)


def _configure(stream: VideoStream, settings: EncoderSettings) -> None:
    ctx = stream.codec_context
    ctx.width = settings.width
    ctx.height = settings.height
    ctx.pix_fmt = settings.pix_fmt
    ctx.time_base = settings.time_base
    stream.time_base = settings.time_base
    ctx.framerate = settings.fps
    ctx.thread_count = settings.threads
    ctx.thread_type = "FRAME"
    ctx.max_b_frames = 0
    ctx.gop_size = max(1, math.ceil(settings.fps * GOP_SECONDS))
    ctx.color_range = AVCOL_RANGE.get(settings.color_range or "tv", 1)
    if settings.color_space in AVCOL_SPACE:
        ctx.colorspace = AVCOL_SPACE[settings.color_space]
    if settings.color_primaries in AVCOL_PRIMARIES:
        ctx.color_primaries = AVCOL_PRIMARIES[settings.color_primaries]
    if settings.color_trc in AVCOL_TRC:
        ctx.color_trc = AVCOL_TRC[settings.color_trc]
    ctx.options = encoder_options(settings, ctx.gop_size)
    if settings.codec == "libx265":
        ctx.codec_tag = "hvc1"


def encoder_options(settings: EncoderSettings, gop_size: int) -> dict[str, str]:
    """Private encoder options: rate control, closed GOPs, no B-frames, pinned threads (pure)."""
    options = {"crf": str(settings.crf), "preset": settings.preset}
    if settings.profile:
        options["profile"] = settings.profile
    if settings.codec == "libx264":
        if settings.level:
            options["level"] = settings.level
        options["x264-params"] = "open-gop=0:bframes=0" + (
            ":sliced-threads=1" if settings.sliced_threads else ""
        )
        return options
    params = [
        "open-gop=0",
        "bframes=0",
        f"keyint={gop_size}",
        f"pools={settings.threads}",
        f"frame-threads={max(1, min(settings.threads, 4))}",
        "log-level=error",
    ]
    if settings.level:
        params.append(f"level-idc={settings.level}")
    options["x265-params"] = ":".join(params)
    return options


def count_frames(path: Path) -> int:
    """Video frames in an encoded chunk, counted from packets (no decoding; one frame per packet)."""
    try:
        with av.open(str(path), mode="r") as container:
            stream = container.streams.video[0]
            return sum(1 for packet in container.demux(stream) if packet.size and packet.pts is not None)
    except (av.error.FFmpegError, IndexError) as exc:
        raise InvalidVideoError(f"{path}: not a readable chunk file ({exc})") from exc
