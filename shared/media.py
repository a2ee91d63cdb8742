"""Probe a video once: streams, timing of every frame, keyframes, rotation, colour — the job's source profile.

``probe`` runs ffprobe twice (headers, then a packet scan of the video stream that demuxes without
decoding) and ``parse_probe`` turns both into a ``VideoInfo`` that is stored in the job record. The
planner, the render worker and the merger all read frame positions and timestamps from it, so a
frame index means the same frame everywhere (presentation order, 0-based).
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict

from shared.errors import InvalidVideoError
from shared.ffmpeg import decode_check_args, packet_scan_args, probe_args, run_ffmpeg

HDR_TRANSFERS = frozenset({"smpte2084", "arib-std-b67"})
# Demuxers that read single pictures; a file they accept is a still image, not a video.
IMAGE_FORMATS = ("image2", "_pipe", "gif", "webp", "apng")
PROBE_TIMEOUT_S = 120.0
SCAN_TIMEOUT_S = 1800.0


class StreamInfo(BaseModel):
    """A non-video stream carried over at merge time."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int
    codec: str
    language: str | None = None
    channels: int | None = None
    sample_rate: int | None = None
    start_pts: int | None = None
    time_base_num: int = 1
    time_base_den: int = 1


class VideoInfo(BaseModel):
    """What the farm knows about a source video; JSON-serialisable, kept in the job record.

    ``frame_pts`` are the source timestamps (stream time base) of every frame in presentation
    order; ``keyframe_indices`` are presentation indices into it. ``rotation`` is the display
    matrix angle in degrees counter-clockwise (0/90/180/270): decoded frames are rotated by it to
    be upright, and ``width``/``height`` are the upright size.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = 1
    source: str
    container: str
    duration_s: float
    start_time_s: float
    stream_index: int
    codec: str
    time_base_num: int
    time_base_den: int
    avg_fps_num: int
    avg_fps_den: int
    vfr: bool
    frame_count: int
    frame_pts: list[int]
    last_frame_duration: int
    keyframe_pts: list[int]
    keyframe_indices: list[int]
    rotation: int
    coded_width: int
    coded_height: int
    width: int
    height: int
    pix_fmt: str
    bit_depth: int
    color_range: str | None = None
    color_space: str | None = None
    color_primaries: str | None = None
    color_transfer: str | None = None
    hdr: bool = False
    field_order: str | None = None
    audio_streams: list[StreamInfo] = []
    subtitle_streams: list[StreamInfo] = []

    @property
    def time_base(self) -> Fraction:
        return Fraction(self.time_base_num, self.time_base_den)

    @property
    def avg_fps(self) -> Fraction:
        return Fraction(self.avg_fps_num, self.avg_fps_den)

    @property
    def end_pts(self) -> int:
        """The timestamp just after the last frame (its pts plus its duration)."""
        return self.frame_pts[-1] + self.last_frame_duration

    def pts_after(self, frame: int) -> int:
        """Timestamp where frame ``frame`` starts, or the stream end for ``frame == frame_count``."""
        return self.end_pts if frame >= self.frame_count else self.frame_pts[frame]

    def seconds(self, pts: int) -> Fraction:
        """``pts`` relative to the first frame, in exact seconds."""
        return (pts - self.frame_pts[0]) * self.time_base


def display_name(source: str) -> str:
    """A name for messages that never leaks a presigned URL's query string (it holds credentials)."""
    if source.startswith(("http://", "https://", "s3://")):
        parts = urlsplit(source)
        return f"{parts.scheme}://{parts.netloc}{parts.path}"
    return source


def probe(source: str) -> VideoInfo:
    """Probe a local path or http(s) URL; anything unusable raises ``InvalidVideoError``."""
    name = display_name(source)
    _check_local_file(source, name)
    try:
        headers = run_ffmpeg(probe_args(source), timeout_s=PROBE_TIMEOUT_S, user_input=name)
    except InvalidVideoError as exc:
        if "moov atom not found" in str(exc.context.get("stderr_tail", "")) and _looks_like_mp4(source):
            raise InvalidVideoError(
                f"{name}: truncated: the MP4 index (moov atom) is missing; the upload was cut short "
                "or the recording was never finalised"
            ) from exc
        raise
    probe_json = _load_json(headers.stdout, name)
    stream = select_video_stream(probe_json, name)
    scan = run_ffmpeg(
        packet_scan_args(source, int(stream["index"])), timeout_s=SCAN_TIMEOUT_S, user_input=name
    )
    packets = parse_packets(scan.stdout.decode("utf-8", "replace"))
    return parse_probe(probe_json, packets, source=name, scan_errors=scan.stderr.decode("utf-8", "replace"))


def check_decodes(source: str, info: VideoInfo, *, timeout_s: float) -> None:
    """Decode the whole video stream once and refuse it at its first corrupt frame.

    The probe reads only headers and packets; damage inside the coded frames shows only when they
    are decoded. Finding it here, on the CPU before planning, fails the job with the position of the
    damage instead of at a render attempt after GPU work was spent on the chunks before it.
    """
    name = display_name(source)
    try:
        run_ffmpeg(decode_check_args(source, info.stream_index), timeout_s=timeout_s, user_input=name)
    except InvalidVideoError as exc:
        tail = str(exc.context.get("stderr_tail", ""))
        detail = decode_error_detail(tail)
        raise InvalidVideoError(
            f"{name}: corrupt video data: decoding stopped {detail}; the file is damaged, "
            "re-export or repair it (e.g. re-encode it with ffmpeg) and submit again",
            stderr_tail=tail,
        ) from exc


def decode_error_detail(stderr_tail: str) -> str:
    """ffmpeg's first error line, without its ``[h264 @ 0x..]`` tag."""
    for line in stderr_tail.splitlines():
        text = re.sub(r"^\[[^\]]*\]\s*", "", line).strip()
        if text:
            return f"at {text!r}"
    return "with an error"


def _check_local_file(source: str, name: str) -> None:
    if "://" in source:
        return
    path = Path(source)
    if not path.is_file():
        raise InvalidVideoError(f"{name}: no such file")
    if path.stat().st_size == 0:
        raise InvalidVideoError(f"{name}: empty file (0 bytes), not a video")


def _looks_like_mp4(source: str) -> bool:
    """Whether a file that lacks its index starts like an MP4 (a cut upload) or is something else."""
    if "://" in source:
        return True
    with open(source, "rb") as handle:
        head = handle.read(12)
    return head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")


def parse_packets(text: str) -> list[dict[str, str]]:
    """Rows of ffprobe's ``compact`` packet output as ``{"pts": "..", "flags": ".."}`` dicts.

    A packet carrying side data (AAC skip samples, new extradata) is split over two lines by
    ffprobe; the continuation line starts with ``|`` and belongs to the packet before it.
    """
    rows: list[dict[str, str]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        row: dict[str, str] = {}
        for field in line.split("|"):
            key, sep, value = field.partition("=")
            if sep:
                row[key.strip()] = value.strip()
        if line.startswith("|") and rows:
            rows[-1].update(row)  # a packet with side data continues on the next line
        elif row:
            rows.append(row)
    return rows


def select_video_stream(probe_json: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """The first real video stream (cover art is not one); refuse images and audio-only files."""
    fmt = probe_json.get("format") or {}
    format_name = str(fmt.get("format_name", ""))
    streams = probe_json.get("streams") or []
    if not streams and not format_name:
        raise InvalidVideoError(f"{name}: not a media file (ffprobe found no streams)")
    if any(marker in format_name for marker in IMAGE_FORMATS):
        raise InvalidVideoError(f"{name}: a still image ({format_name}), not a video")
    for stream in streams:
        if stream.get("codec_type") != "video":
            continue
        if (stream.get("disposition") or {}).get("attached_pic"):
            continue
        return stream
    kinds = sorted({str(s.get("codec_type")) for s in streams}) or ["none"]
    raise InvalidVideoError(f"{name}: no video stream (streams found: {', '.join(kinds)})")


def parse_probe(
    probe_json: Mapping[str, Any],
    packets: Sequence[Mapping[str, str]],
    *,
    source: str,
    scan_errors: str = "",
) -> VideoInfo:
    """Build ``VideoInfo`` from ffprobe's JSON and the video stream's packet rows (pure).

    ffprobe describes a hostile file faithfully, so any field may be missing, mistyped, NaN or
    huge: whatever the parser cannot use is an ``InvalidVideoError`` naming the file, never a crash
    (found by fuzzing, tests/unit/reliability/test_fuzz.py).
    """
    try:
        return _parse_probe(probe_json, packets, source=source, scan_errors=scan_errors)
    except (ValueError, TypeError, AttributeError, KeyError, OverflowError, ZeroDivisionError) as exc:
        raise InvalidVideoError(
            f"{source}: ffprobe describes a stream the farm cannot use ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:200]}); re-encode it to H.264 MP4 first"
        ) from exc


def _parse_probe(
    probe_json: Mapping[str, Any],
    packets: Sequence[Mapping[str, str]],
    *,
    source: str,
    scan_errors: str = "",
) -> VideoInfo:
    stream = select_video_stream(probe_json, source)
    fmt = probe_json.get("format") or {}
    time_base = _fraction(stream.get("time_base"), source, "time_base")
    pts_list, keyframe_pts, durations = _frame_timing(packets, source)
    declared = _int_or_none(stream.get("nb_frames"))
    if declared and len(packets) < declared:
        reason = scan_errors.strip().splitlines()[-1] if scan_errors.strip() else "stream ended early"
        raise InvalidVideoError(
            f"{source}: truncated: only {len(packets)} of {declared} video frames are readable ({reason})"
        )
    if not pts_list:
        raise InvalidVideoError(f"{source}: truncated: the video stream has no readable frames")
    order = sorted(range(len(pts_list)), key=lambda i: pts_list[i])
    frame_pts = [pts_list[i] for i in order]
    if any(b <= a for a, b in zip(frame_pts, frame_pts[1:], strict=False)):
        raise InvalidVideoError(f"{source}: two frames share one timestamp; remux the file with ffmpeg first")
    deltas = [b - a for a, b in zip(frame_pts, frame_pts[1:], strict=False)]
    last_duration = durations[order[-1]] or (deltas[-1] if deltas else 0)
    keyframe_pts = sorted(set(keyframe_pts))
    keyframe_indices = [bisect.bisect_left(frame_pts, pts) for pts in keyframe_pts]
    avg_fps = _avg_fps(stream, frame_pts, time_base)
    if not last_duration:
        last_duration = max(1, round(1 / (avg_fps * time_base)))
    rotation = _rotation(stream)
    coded_w, coded_h = int(stream.get("width") or 0), int(stream.get("height") or 0)
    if coded_w <= 0 or coded_h <= 0:
        raise InvalidVideoError(f"{source}: the video stream has no frame size")
    upright_w, upright_h = (coded_h, coded_w) if rotation in (90, 270) else (coded_w, coded_h)
    pix_fmt = str(stream.get("pix_fmt") or "unknown")
    transfer = _tag(stream.get("color_transfer"))
    color_range = _tag(stream.get("color_range"))
    if color_range is None and pix_fmt.startswith("yuvj"):
        color_range = "pc"
    audio, subtitles = _side_streams(probe_json)
    return VideoInfo(
        source=source,
        container=str(fmt.get("format_name", "")),
        duration_s=float(
            fmt.get("duration") or float((frame_pts[-1] + last_duration - frame_pts[0]) * time_base)
        ),
        start_time_s=float(fmt.get("start_time") or 0.0),
        stream_index=int(stream["index"]),
        codec=str(stream.get("codec_name", "unknown")),
        time_base_num=time_base.numerator,
        time_base_den=time_base.denominator,
        avg_fps_num=avg_fps.numerator,
        avg_fps_den=avg_fps.denominator,
        vfr=bool(deltas) and max(deltas) - min(deltas) > 1,
        frame_count=len(frame_pts),
        frame_pts=frame_pts,
        last_frame_duration=last_duration,
        keyframe_pts=keyframe_pts,
        keyframe_indices=keyframe_indices,
        rotation=rotation,
        coded_width=coded_w,
        coded_height=coded_h,
        width=upright_w,
        height=upright_h,
        pix_fmt=pix_fmt,
        bit_depth=_bit_depth(pix_fmt, stream.get("bits_per_raw_sample")),
        color_range=color_range,
        color_space=_tag(stream.get("color_space")),
        color_primaries=_tag(stream.get("color_primaries")),
        color_transfer=transfer,
        hdr=transfer in HDR_TRANSFERS,
        field_order=_tag(stream.get("field_order")),
        audio_streams=audio,
        subtitle_streams=subtitles,
    )


def _frame_timing(
    packets: Sequence[Mapping[str, str]], source: str
) -> tuple[list[int], list[int], list[int]]:
    """Presentable frames' pts (decode order), keyframe pts and packet durations.

    Packets flagged ``D`` (discarded by an edit list) are never shown, so they are not frames.
    """
    pts_list: list[int] = []
    keyframes: list[int] = []
    durations: list[int] = []
    for row in packets:
        flags = row.get("flags", "")
        if "D" in flags:
            continue
        pts = _int_or_none(row.get("pts"))
        if pts is None:
            pts = _int_or_none(row.get("dts"))
        if pts is None:
            raise InvalidVideoError(
                f"{source}: the video stream has frames without timestamps (a raw stream?); "
                "remux it into MP4 or MKV first"
            )
        pts_list.append(pts)
        durations.append(_int_or_none(row.get("duration")) or 0)
        if "K" in flags:
            keyframes.append(pts)
    return pts_list, keyframes, durations


def _avg_fps(stream: Mapping[str, Any], frame_pts: Sequence[int], time_base: Fraction) -> Fraction:
    for key in ("avg_frame_rate", "r_frame_rate"):
        value = _fraction_or_none(stream.get(key))
        if value:
            return value
    if len(frame_pts) > 1:
        span = (frame_pts[-1] - frame_pts[0]) * time_base
        return (Fraction(len(frame_pts) - 1) / span).limit_denominator(1001)
    return Fraction(25)


def _rotation(stream: Mapping[str, Any]) -> int:
    """Counter-clockwise degrees from the display matrix (or a legacy ``rotate`` tag)."""
    for side in stream.get("side_data_list") or []:
        if "rotation" in side:
            return _quarter_turns(float(side["rotation"]))
    tag = (stream.get("tags") or {}).get("rotate")
    if tag is not None:
        return _quarter_turns(-float(tag))  # the legacy tag counts clockwise
    return 0


def _quarter_turns(degrees: float) -> int:
    return int(round(degrees / 90.0)) * 90 % 360


def _bit_depth(pix_fmt: str, raw_bits: Any) -> int:
    match = re.search(r"p(\d+)(le|be)?$", pix_fmt)
    if match:
        return int(match.group(1))
    bits = _int_or_none(raw_bits)
    return bits if bits else 8


def _side_streams(probe_json: Mapping[str, Any]) -> tuple[list[StreamInfo], list[StreamInfo]]:
    audio: list[StreamInfo] = []
    subtitles: list[StreamInfo] = []
    for stream in probe_json.get("streams") or []:
        kind = stream.get("codec_type")
        if kind not in ("audio", "subtitle"):
            continue
        time_base = _fraction_or_none(stream.get("time_base")) or Fraction(1)
        info = StreamInfo(
            index=int(stream["index"]),
            codec=str(stream.get("codec_name", "unknown")),
            language=(stream.get("tags") or {}).get("language"),
            channels=_int_or_none(stream.get("channels")),
            sample_rate=_int_or_none(stream.get("sample_rate")),
            start_pts=_int_or_none(stream.get("start_pts")),
            time_base_num=time_base.numerator,
            time_base_den=time_base.denominator,
        )
        (audio if kind == "audio" else subtitles).append(info)
    return audio, subtitles


def _load_json(raw: bytes, name: str) -> Mapping[str, Any]:
    try:
        data = json.loads(raw.decode("utf-8", "replace") or "{}")
    except ValueError as exc:
        raise InvalidVideoError(f"{name}: not a media file (ffprobe output unreadable)") from exc
    if not isinstance(data, dict):
        raise InvalidVideoError(f"{name}: not a media file")
    return data


def _tag(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value)
    return None if text in ("unknown", "unspecified", "reserved", "") else text


def _int_or_none(value: Any) -> int | None:
    if value is None or value == "N/A" or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _fraction_or_none(value: Any) -> Fraction | None:
    if not value or value in ("0/0", "N/A"):
        return None
    try:
        result = Fraction(str(value))
    except (ValueError, ZeroDivisionError):
        return None
    return result if result > 0 else None


def _fraction(value: Any, source: str, what: str) -> Fraction:
    result = _fraction_or_none(value)
    if result is None:
        raise InvalidVideoError(f"{source}: the video stream has no valid {what} ({value!r})")
    return result
