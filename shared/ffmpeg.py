"""ffmpeg/ffprobe command lines as pure argument builders, and the one runner that executes them.

Builders return ``list[str]`` so they can be unit-tested without running anything; ``run_ffmpeg``
is the only place a subprocess is started (never through a shell) and the only place ffmpeg's
failures are translated into FaceFarm errors.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from shared.errors import ConfigError, ExternalToolError, InvalidVideoError

FFMPEG = "ffmpeg"
FFPROBE = "ffprobe"
STDERR_TAIL_CHARS = 2000

# Containers that hold MP4-family boxes: they get +faststart and need MP4-compatible codecs.
MP4_FAMILY = frozenset({"mp4", "mov", "m4v"})
# Audio codecs the MP4 muxer accepts by stream copy; anything else is re-encoded to AAC.
MP4_AUDIO_COPY = frozenset({"aac", "mp3", "ac3", "eac3", "alac", "opus", "flac", "mp2"})
# Text subtitle codecs that can be converted to mov_text for MP4 (bitmap subtitles cannot).
TEXT_SUBTITLES = frozenset({"mov_text", "subrip", "ass", "ssa", "webvtt", "text"})


def probe_args(source: str) -> list[str]:
    """Streams and format of ``source`` as JSON (container headers only, nothing decoded)."""
    return [FFPROBE, "-v", "error", "-print_format", "json", "-show_streams", "-show_format", source]


def packet_scan_args(source: str, stream_index: int) -> list[str]:
    """Every packet's timestamps and flags for one stream, demuxed but not decoded.

    ``compact`` output with keys (``pts=..|dts=..``) so the parser does not depend on field order.
    """
    return [
        FFPROBE,
        "-v",
        "error",
        "-select_streams",
        str(stream_index),
        "-show_entries",
        "packet=pts,dts,flags,duration",
        "-of",
        "compact=p=0:nk=0",
        source,
    ]


def decode_check_args(source: str, stream_index: int) -> list[str]:
    """Decode every frame of one stream, discard it, and stop at the first decoding error (``-xerror``)."""
    return [
        FFMPEG,
        "-nostdin",
        "-v",
        "error",
        "-xerror",
        "-i",
        source,
        "-map",
        f"0:{stream_index}",
        "-f",
        "null",
        "-",
    ]


def stream_time_base_args(source: str, stream_index: int) -> list[str]:
    """The time base of one stream, printed bare (``1/30000``)."""
    return [
        FFPROBE,
        "-v",
        "error",
        "-select_streams",
        str(stream_index),
        "-show_entries",
        "stream=time_base",
        "-of",
        "default=nw=1:nk=1",
        source,
    ]


def packet_hash_args(source: str, stream_spec: str) -> list[str]:
    """Per-packet timestamps and payload hashes of the selected streams (compare copies byte-wise)."""
    return [
        FFPROBE,
        "-v",
        "error",
        "-select_streams",
        stream_spec,
        "-show_entries",
        "packet=stream_index,pts,dts,duration,flags,data_hash",
        "-show_data_hash",
        "sha256",
        "-of",
        "compact=p=0:nk=0",
        source,
    ]


def framemd5_args(source: str, stream_spec: str = "v:0") -> list[str]:
    """Decoded-frame hashes of one stream (determinism checks), written to stdout."""
    return [
        FFMPEG,
        "-v",
        "error",
        "-nostdin",
        "-i",
        source,
        "-map",
        f"0:{stream_spec}",
        "-f",
        "framemd5",
        "-",
    ]


@dataclass(frozen=True)
class ConcatEntry:
    """One file of a concat-demuxer list; ``duration_us`` pins where the next file starts."""

    path: Path
    duration_us: int


def concat_list_text(entries: Sequence[ConcatEntry]) -> str:
    """The concat demuxer's list file: absolute paths, quoted, each with an exact duration.

    Durations are integer microseconds (``us`` suffix), the resolution the demuxer computes in,
    so the offsets it adds are exactly the ones the merger planned.
    """
    lines = ["ffconcat version 1.0"]
    for entry in entries:
        if entry.duration_us <= 0:
            raise ValueError(f"concat entry {entry.path} needs a positive duration, got {entry.duration_us}")
        quoted = str(entry.path.resolve()).replace("'", "'\\''")
        lines.append(f"file '{quoted}'")
        lines.append(f"duration {entry.duration_us}us")
    return "\n".join(lines) + "\n"


def seconds_arg(value: Fraction) -> str:
    """A time offset for ffmpeg options (microsecond resolution, as ffmpeg parses it)."""
    micros = rescale_to_us(value.numerator, Fraction(1, value.denominator))
    return f"{micros}us"


def rescale_to_us(ticks: int, time_base: Fraction) -> int:
    """``ticks × time_base`` in microseconds, rounded like ``av_rescale_q`` (nearest, ties away from 0)."""
    exact = Fraction(ticks) * time_base * 1_000_000
    floor = exact.numerator // exact.denominator
    rest = exact - floor
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and exact > 0):
        return floor + 1
    return floor


@dataclass(frozen=True)
class MergeStreams:
    """How each source audio / subtitle stream is carried into the merged output."""

    audio_codecs: tuple[str, ...] = ()
    subtitle_codecs: tuple[str, ...] = ()


def merge_args(
    *,
    concat_list: Path,
    source: str,
    output: Path,
    container: str,
    video_start_s: Fraction,
    source_window_s: tuple[Fraction, Fraction] | None,
    streams: MergeStreams,
    color_args: Sequence[str],
    label: str,
) -> list[str]:
    """Concat the chunk files by stream copy and mux the source's audio/subtitles/metadata once.

    Whole video (``source_window_s`` None): ``-copyts`` keeps every source timestamp as read, and
    ``-itsoffset video_start_s`` moves the concat output (which starts at 0) onto the source's
    first video timestamp, so output PTS == source PTS and the A/V offset is the source's.
    Part of the video: the source is read from ``source_window_s[0]`` (seconds after the file's
    start time, as ``-ss`` counts), both inputs start at 0 and the output is cut at the window's
    length (input ``-to`` miscounts stream-copied audio pre-roll). No rotation is written.
    """
    args = [FFMPEG, "-v", "error", "-nostdin", "-y"]
    if source_window_s is None:
        args += ["-copyts"]
        if video_start_s:
            args += ["-itsoffset", seconds_arg(video_start_s)]
    args += ["-f", "concat", "-safe", "0", "-i", str(concat_list)]
    if source_window_s is not None:
        args += ["-ss", seconds_arg(source_window_s[0])]
    args += ["-i", source]
    args += ["-map", "0:v:0"]
    for index, codec in enumerate(streams.audio_codecs):
        args += ["-map", f"1:a:{index}"]
        copy = container not in MP4_FAMILY or codec in MP4_AUDIO_COPY
        args += [f"-c:a:{index}", "copy"] if copy else [f"-c:a:{index}", "aac", f"-b:a:{index}", "192k"]
    out_sub = 0
    for index, codec in enumerate(streams.subtitle_codecs):
        if container in MP4_FAMILY and codec not in TEXT_SUBTITLES:
            continue  # bitmap subtitles cannot go into MP4; the report notes the drop
        args += ["-map", f"1:s:{index}"]
        mov_text = container in MP4_FAMILY and codec != "mov_text"
        args += [f"-c:s:{out_sub}", "mov_text" if mov_text else "copy"]
        out_sub += 1
    args += ["-c:v", "copy", *color_args]
    if source_window_s is not None:
        args += ["-t", seconds_arg(source_window_s[1] - source_window_s[0])]
    args += ["-map_metadata", "1", "-map_chapters", "1"]
    args += ["-metadata", f"comment={label}", "-metadata", f"description={label}"]
    if container in MP4_FAMILY:
        args += ["-movflags", "+faststart"]
    args += ["-f", container, str(output)]
    return args


def color_args(
    *, color_range: str | None, color_space: str | None, primaries: str | None, transfer: str | None
) -> list[str]:
    """Re-assert the video colour tags at the final mux (a copy remux can drop the MP4 ``colr`` box)."""
    args: list[str] = []
    for flag, value in (
        ("-color_range:v:0", color_range),
        ("-colorspace:v:0", color_space),
        ("-color_primaries:v:0", primaries),
        ("-color_trc:v:0", transfer),
    ):
        if value and value not in ("unknown", "unspecified", "reserved"):
            args += [flag, value]
    return args


def raw_encode_args(
    *,
    output: Path,
    width: int,
    height: int,
    fps: str,
    frames: int,
    codec: str = "libx264",
    keyint: int = 250,
    pix_fmt: str = "yuv420p",
    extra_output: Sequence[str] = (),
    audio: bool = False,
) -> list[str]:
    """An encode of raw RGB frames read from stdin (test media and benchmarks).

    Frames arrive as ``rgb24`` on stdin; ``extra_output`` adds options such as ``rotate`` metadata,
    ``setpts`` filters for VFR or colour tags.
    """
    args = [FFMPEG, "-v", "error", "-nostdin", "-y"]
    args += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-framerate", fps, "-i", "-"]
    if audio:
        seconds = float(frames / Fraction(fps))
        args += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds:.6f}"]
    args += ["-map", "0:v"]
    if audio:
        args += ["-map", "1:a", "-c:a", "aac", "-b:a", "64k"]
    args += ["-c:v", codec, "-pix_fmt", pix_fmt]  # stdin holds exactly `frames` frames
    if codec == "libx264":
        args += ["-x264-params", f"keyint={keyint}:min-keyint={keyint}:scenecut=0"]
    args += [*extra_output, str(output)]
    return args


def run_ffmpeg(
    args: Sequence[str],
    *,
    timeout_s: float,
    input_bytes: bytes | None = None,
    user_input: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run one ffmpeg/ffprobe command; failures become FaceFarm errors with the stderr tail.

    ``user_input`` names the user's file when a failure means *their* input is bad (probe): the
    error is then a permanent ``InvalidVideoError`` instead of a retryable ``ExternalToolError``.
    """
    tool = Path(args[0]).name
    try:
        done = subprocess.run(
            list(args), input=input_bytes, capture_output=True, timeout=timeout_s, check=False
        )
    except FileNotFoundError as exc:
        raise ConfigError(f"{tool} is not installed or not on PATH; install ffmpeg 5.1 or newer") from exc
    except subprocess.TimeoutExpired as exc:
        tail = _tail(exc.stderr)
        raise ExternalToolError(
            f"{tool} did not finish within {timeout_s:.0f} s", stderr_tail=tail, command=list(args)
        ) from exc
    if done.returncode != 0:
        tail = _tail(done.stderr)
        last = tail.strip().splitlines()[-1] if tail.strip() else f"exit code {done.returncode}"
        if user_input is not None:
            raise InvalidVideoError(f"{user_input}: not a readable media file ({last})", stderr_tail=tail)
        raise ExternalToolError(
            f"{tool} failed with exit code {done.returncode}: {last}", stderr_tail=tail, command=list(args)
        )
    return done


def _tail(stderr: bytes | str | None) -> str:
    if not stderr:
        return ""
    text = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else stderr
    return text[-STDERR_TAIL_CHARS:]
