"""Join the rendered chunks by stream copy and mux the source's audio, subtitles and metadata once.

The concat demuxer adds ``start_time(file) - first_pts(file)`` to each chunk's timestamps, where
``start_time`` is the sum of the listed durations. The list therefore gives each chunk the exact
distance (in the demuxer's microseconds) from its first frame to the next chunk's first frame, so
every chunk lands on its source timeline; ``-copyts`` plus one offset per input then keeps output
PTS equal to source PTS (within one tick), also for variable frame rate and non-zero start times.
Rotation is not written: the chunks hold upright pixels. The result is validated (frame count and
duration against the plan) before it is renamed into place.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from dispatcher.planner import ChunkRange
from shared.errors import ExternalToolError
from shared.ffmpeg import (
    MP4_AUDIO_COPY,
    MP4_FAMILY,
    TEXT_SUBTITLES,
    ConcatEntry,
    MergeStreams,
    color_args,
    concat_list_text,
    merge_args,
    packet_scan_args,
    rescale_to_us,
    run_ffmpeg,
    stream_time_base_args,
)
from shared.media import VideoInfo, parse_packets

CONTAINER_BY_SUFFIX = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}


class MergeReport(BaseModel):
    """What the merge produced, for the job record."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output: str
    frames: int
    expected_frames: int
    duration_s: float
    expected_duration_s: float
    audio_streams: int
    subtitle_streams: int
    notes: list[str] = []


def merge_chunks(
    chunk_paths: Sequence[Path],
    *,
    source: str,
    info: VideoInfo,
    chunk_ranges: Sequence[ChunkRange],
    output: Path,
    label: str,
    timeout_s: float,
) -> MergeReport:
    """Concatenate ``chunk_paths`` (one per range, same order) into ``output``, atomically."""
    ranges = _check_plan(chunk_paths, chunk_ranges)
    container = CONTAINER_BY_SUFFIX.get(output.suffix.lower())
    if container is None:
        raise ValueError(f"{output}: the output must end in one of {sorted(CONTAINER_BY_SUFFIX)}")
    first, end = ranges[0].start_frame, ranges[-1].end_frame
    full_range = first == 0 and end == info.frame_count
    notes = _stream_notes(info, container)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.stem}.{uuid.uuid4().hex[:8]}.partial{output.suffix}")
    with tempfile.TemporaryDirectory(prefix="facefarm-merge-", dir=output.parent) as workdir:
        concat_list = Path(workdir) / "chunks.ffconcat"
        concat_list.write_text(concat_list_text(concat_entries(info, ranges, chunk_paths)), encoding="utf-8")
        args = merge_args(
            concat_list=concat_list,
            source=source,
            output=partial,
            container=container,
            video_start_s=info.frame_pts[0] * info.time_base,
            source_window_s=None if full_range else _window(info, first, end),
            streams=MergeStreams(
                audio_codecs=tuple(s.codec for s in info.audio_streams),
                subtitle_codecs=tuple(s.codec for s in info.subtitle_streams),
            ),
            color_args=color_args(
                color_range=info.color_range,
                color_space=info.color_space,
                primaries=info.color_primaries,
                transfer=info.color_transfer,
            ),
            label=label,
        )
        try:
            run_ffmpeg(args, timeout_s=timeout_s)
            report = _validate(partial, info, first, end, timeout_s, notes, output)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    os.replace(partial, output)
    return report


def concat_entries(
    info: VideoInfo, ranges: Sequence[ChunkRange], chunk_paths: Sequence[Path]
) -> list[ConcatEntry]:
    """Per chunk: microseconds from its first frame to the next chunk's (or the range end).

    Differences of rounded absolute times, so the running sum never drifts from the source clock.
    """
    entries = []
    for chunk, path in zip(ranges, chunk_paths, strict=True):
        begin_us = rescale_to_us(info.frame_pts[chunk.start_frame], info.time_base)
        end_us = rescale_to_us(info.pts_after(chunk.end_frame), info.time_base)
        entries.append(ConcatEntry(path=path, duration_us=end_us - begin_us))
    return entries


def _check_plan(chunk_paths: Sequence[Path], chunk_ranges: Sequence[ChunkRange]) -> list[ChunkRange]:
    if not chunk_ranges or len(chunk_paths) != len(chunk_ranges):
        raise ValueError(f"{len(chunk_paths)} chunk files for {len(chunk_ranges)} planned chunks")
    for before, after in zip(chunk_ranges, chunk_ranges[1:], strict=False):
        if after.start_frame != before.end_frame:
            raise ValueError(f"chunk {after.index} starts at {after.start_frame}, not {before.end_frame}")
    missing = [str(p) for p in chunk_paths if not p.is_file()]
    if missing:
        raise ExternalToolError(f"chunk files missing at merge time: {', '.join(missing)}")
    return list(chunk_ranges)


def _window(info: VideoInfo, first: int, end: int) -> tuple[Fraction, Fraction]:
    """The rendered frames' span for ``-ss``/``-to``, which count from the file's start time."""
    file_start = Fraction(info.start_time_s).limit_denominator(1_000_000)
    return (
        info.frame_pts[first] * info.time_base - file_start,
        info.pts_after(end) * info.time_base - file_start,
    )


def _stream_notes(info: VideoInfo, container: str) -> list[str]:
    notes = []
    if container in MP4_FAMILY:
        for stream in info.audio_streams:
            if stream.codec not in MP4_AUDIO_COPY:
                notes.append(f"audio stream {stream.index} ({stream.codec}) re-encoded to AAC for MP4")
        for stream in info.subtitle_streams:
            if stream.codec not in TEXT_SUBTITLES:
                notes.append(f"subtitle stream {stream.index} ({stream.codec}) dropped: MP4 cannot hold it")
    if info.rotation:
        notes.append(f"frames rotated {info.rotation} degrees to upright; no rotation tag written")
    return notes


def _validate(
    path: Path, info: VideoInfo, first: int, end: int, timeout_s: float, notes: list[str], output: Path
) -> MergeReport:
    """Frame count must equal the plan; duration must match the source range within one frame."""
    scan = run_ffmpeg(packet_scan_args(str(path), 0), timeout_s=timeout_s)
    rows = [r for r in parse_packets(scan.stdout.decode("utf-8", "replace")) if "D" not in r.get("flags", "")]
    pts = sorted(int(r["pts"]) for r in rows if r.get("pts") not in (None, "N/A"))
    expected_frames = end - first
    expected_s = float((info.pts_after(end) - info.frame_pts[first]) * info.time_base)
    if len(pts) != expected_frames:
        raise ExternalToolError(
            f"merged video has {len(pts)} frames, the plan has {expected_frames}; a chunk is incomplete"
        )
    probe_tb = _stream_time_base(path, timeout_s)
    last_duration = (
        int(rows[-1].get("duration") or 0) if rows and rows[-1].get("duration", "").isdigit() else 0
    )
    duration_s = float((pts[-1] + last_duration - pts[0]) * probe_tb)
    frame_s = float(1 / info.avg_fps)
    if abs(duration_s - expected_s) > frame_s * 1.01:
        raise ExternalToolError(
            f"merged video lasts {duration_s:.4f} s, the source range {expected_s:.4f} s (more than one frame off)"
        )
    return MergeReport(
        output=str(output),
        frames=len(pts),
        expected_frames=expected_frames,
        duration_s=duration_s,
        expected_duration_s=expected_s,
        audio_streams=len(info.audio_streams),
        subtitle_streams=sum(
            1 for s in info.subtitle_streams if s.codec in TEXT_SUBTITLES or output.suffix.lower() == ".mkv"
        ),
        notes=notes,
    )


def _stream_time_base(path: Path, timeout_s: float) -> Fraction:
    done = run_ffmpeg(stream_time_base_args(str(path), 0), timeout_s=timeout_s)
    return Fraction(done.stdout.decode().strip())
