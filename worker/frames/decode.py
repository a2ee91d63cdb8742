"""Decode exactly one chunk's frames (plus warm-up) upright, from a keyframe seek, in bounded memory."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import dataclass

import av
import av.error
import numpy as np
from av.container import InputContainer
from av.video.frame import VideoFrame
from av.video.reformatter import ColorRange
from av.video.stream import VideoStream

from shared.errors import InvalidVideoError, StorageUnavailableError
from shared.media import display_name
from worker.frames.colour import INTERPOLATION, matrix_for_avcol, range_for_frame

# Corrupt packets tolerated in a row before the chunk is declared undecodable.
MAX_BAD_PACKETS_IN_A_ROW = 16
_NETWORK_ERRNOS = frozenset({errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.EIO, errno.EPIPE})


@dataclass
class FrameBatch:
    """Upright RGB frames of one chunk with their source timestamps and presentation indices."""

    frames: np.ndarray  # (N, H, W, 3) uint8 RGB, upright (rotation applied)
    pts: list[int]  # source pts (stream time base) of each frame
    indices: list[int]  # presentation index in the source
    output_mask: list[bool]  # False for warm-up frames (decoded for tracking, never encoded)

    def __len__(self) -> int:
        return len(self.pts)


class _SeekMissed(Exception):
    """The seek landed after the planned keyframe; decode from the start instead."""


def decode_range(
    source: str,
    *,
    start_frame: int,
    end_frame: int,
    warmup_frames: int,
    seek_pts: int,
    seek_frame: int,
    batch_frames: int,
) -> Iterator[FrameBatch]:
    """Yield frames ``[start_frame - warmup_frames, end_frame)`` in batches of ``batch_frames``.

    Seeks to the keyframe at ``seek_pts`` (presentation index ``seek_frame``), drops frames that
    precede it (open-GOP leading pictures), counts indices from there, and flags warm-up frames
    with ``output_mask=False``. A shortfall (truncated file, corrupt packets) raises
    ``InvalidVideoError`` after the frames that did decode.
    """
    if not 0 <= warmup_frames <= start_frame < end_frame:
        raise ValueError(f"bad chunk range [{start_frame}, {end_frame}) with {warmup_frames} warm-up frames")
    if seek_frame > start_frame - warmup_frames or batch_frames < 1:
        raise ValueError(
            f"seek frame {seek_frame} is after the first needed frame {start_frame - warmup_frames}"
        )
    name = display_name(source)
    first_needed = start_frame - warmup_frames
    planned = end_frame - first_needed
    state = _Progress()
    try:
        yield from _decode(
            source, name, first_needed, start_frame, end_frame, seek_pts, seek_frame, batch_frames, state
        )
    except _SeekMissed:
        yield from _decode(source, name, first_needed, start_frame, end_frame, None, 0, batch_frames, state)
    if state.emitted < planned:
        where = f"after frame {state.last_index}" if state.last_index >= 0 else "before its first frame"
        raise InvalidVideoError(
            f"{name}: decoded only {state.emitted} of {planned} frames of chunk [{start_frame}, {end_frame}) "
            f"(stream ended {where}; {state.bad_packets} corrupt packets); the file is truncated or damaged",
            frames_decoded=state.emitted,
            frames_planned=planned,
        )


@dataclass
class _Progress:
    emitted: int = 0
    last_index: int = -1
    bad_packets: int = 0


def _decode(
    source: str,
    name: str,
    first_needed: int,
    start_frame: int,
    end_frame: int,
    seek_pts: int | None,
    seek_frame: int,
    batch_frames: int,
    state: _Progress,
) -> Iterator[FrameBatch]:
    container = _open(source, name)
    try:
        stream = _video_stream(container, name)
        stream.thread_type = "AUTO"
        if seek_pts is not None and seek_frame > 0:
            container.seek(seek_pts, backward=True, any_frame=False, stream=stream)
        floor_pts = seek_pts if seek_pts is not None else None
        index = seek_frame - 1
        batch = _BatchBuilder()
        for frame in _frames(container, stream, name, state):
            if frame.pts is None:
                raise InvalidVideoError(f"{name}: frame {index + 1} has no timestamp; remux the file first")
            if floor_pts is not None:
                if frame.pts < floor_pts:
                    continue  # leading pictures of an open GOP before the keyframe
                if index < seek_frame and frame.pts != floor_pts:
                    raise _SeekMissed()
            index += 1
            if index < max(first_needed, state.last_index + 1):
                continue
            if index >= end_frame:
                break
            batch.add(_upright_rgb(frame), frame.pts, index, index >= start_frame)
            state.emitted += 1
            state.last_index = index
            if len(batch) >= batch_frames:
                yield batch.take()
        if len(batch):
            yield batch.take()
    finally:
        container.close()


def _frames(
    container: InputContainer, stream: VideoStream, name: str, state: _Progress
) -> Iterator[VideoFrame]:
    """Decoded frames in presentation order, skipping (and counting) corrupt packets."""
    bad_in_a_row = 0
    demux = container.demux(stream)
    while True:
        try:
            packet = next(demux)
        except StopIteration:
            return
        except av.error.FFmpegError as exc:
            raise _translate(exc, name, f"reading packets near frame {state.last_index + 1}") from exc
        try:
            frames = packet.decode()
        except av.error.InvalidDataError as exc:
            state.bad_packets += 1
            bad_in_a_row += 1
            if bad_in_a_row > MAX_BAD_PACKETS_IN_A_ROW:
                raise InvalidVideoError(
                    f"{name}: undecodable video near frame {state.last_index + 1} "
                    f"({bad_in_a_row} corrupt packets in a row: {exc})"
                ) from exc
            continue
        except av.error.FFmpegError as exc:
            raise _translate(exc, name, f"decoding near frame {state.last_index + 1}") from exc
        bad_in_a_row = 0
        for frame in frames:
            if isinstance(frame, VideoFrame):
                yield frame


class _BatchBuilder:
    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []
        self.pts: list[int] = []
        self.indices: list[int] = []
        self.mask: list[bool] = []

    def __len__(self) -> int:
        return len(self.pts)

    def add(self, rgb: np.ndarray, pts: int, index: int, output: bool) -> None:
        self.frames.append(rgb)
        self.pts.append(pts)
        self.indices.append(index)
        self.mask.append(output)

    def take(self) -> FrameBatch:
        batch = FrameBatch(np.stack(self.frames), self.pts, self.indices, self.mask)
        self.frames, self.pts, self.indices, self.mask = [], [], [], []
        return batch


def _upright_rgb(frame: VideoFrame) -> np.ndarray:
    """RGB with the source's own matrix and range, rotated by the display matrix to upright."""
    rgb = frame.reformat(
        format="rgb24",
        src_colorspace=matrix_for_avcol(int(frame.colorspace)),
        src_color_range=range_for_frame(int(frame.color_range), frame.format.name),
        dst_color_range=ColorRange.JPEG,
        interpolation=INTERPOLATION,
    ).to_ndarray()
    turns = (round(frame.rotation / 90) % 4) if frame.rotation else 0
    return np.ascontiguousarray(np.rot90(rgb, k=turns)) if turns else rgb


def _open(source: str, name: str) -> InputContainer:
    options = {"reconnect": "1", "rw_timeout": "30000000"} if "://" in source else {}
    try:
        return av.open(source, mode="r", options=options)
    except av.error.FFmpegError as exc:
        raise _translate(exc, name, "opening") from exc
    except OSError as exc:
        raise InvalidVideoError(f"{name}: cannot open ({exc})") from exc


def _video_stream(container: InputContainer, name: str) -> VideoStream:
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    raise InvalidVideoError(f"{name}: no video stream")


def _translate(exc: av.error.FFmpegError, name: str, doing: str) -> Exception:
    """Network trouble on a URL is retryable; anything else means the file itself is bad."""
    if isinstance(exc, av.error.HTTPServerError) or (exc.errno in _NETWORK_ERRNOS and "://" in name):
        return StorageUnavailableError(f"{name}: network error while {doing}: {exc}")
    return InvalidVideoError(f"{name}: {doing} failed: {exc}")
