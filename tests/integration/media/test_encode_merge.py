"""Split -> decode -> encode -> merge round trips: frame count, PTS, audio bytes, sync, label, colour."""

from __future__ import annotations

import hashlib
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from dispatcher.merger import MergeReport, merge_chunks
from dispatcher.planner import ChunkRange, encoder_settings_for, plan_chunks
from shared.errors import ExternalToolError
from shared.ffmpeg import framemd5_args, packet_hash_args, run_ffmpeg
from shared.media import VideoInfo, parse_packets, probe
from shared.schemas import EncoderSettings, JobOptions
from shared.settings import Settings
from tests.integration.media.conftest import Media, ffprobe_packets, ffprobe_stream, psnr
from worker.frames import count_frames, decode_range, open_encoder

pytestmark = pytest.mark.integration
LABEL = "synthetic media: face-swapped with FaceFarm (test)"


def render(
    source: Path,
    info: VideoInfo,
    workdir: Path,
    *,
    chunk_frames: int,
    settings: EncoderSettings,
    start: int = 0,
    end: int | None = None,
    suffix: str = ".mp4",
) -> tuple[list[Path], list[ChunkRange]]:
    """What the render workers do, chunk by chunk (warm-up frames decoded and dropped)."""
    ranges = plan_chunks(info, chunk_frames=chunk_frames, warmup_frames=4, start_frame=start, end_frame=end)
    paths = []
    for chunk in ranges:
        path = workdir / f"chunk{chunk.index:05d}{suffix}"
        with open_encoder(path, settings) as encoder:
            for batch in decode_range(
                str(source), start_frame=chunk.start_frame, end_frame=chunk.end_frame,
                warmup_frames=chunk.warmup_frames, seek_pts=chunk.seek_pts, seek_frame=chunk.seek_frame, batch_frames=8,
            ):  # fmt: skip
                keep = [i for i, out in enumerate(batch.output_mask) if out]
                if keep:
                    encoder.write(batch.frames[keep], [batch.pts[i] for i in keep])
        assert count_frames(path) == chunk.frame_count
        paths.append(path)
    return paths, ranges


def video_pts_seconds(path: Path) -> list[Fraction]:
    tb = Fraction(ffprobe_stream(path, "v:0", "time_base")["time_base"])
    rows = [r for r in ffprobe_packets(path, "v:0") if "D" not in r["flags"]]
    return sorted(int(r["pts"]) * tb for r in rows)


def audio_packets(path: Path) -> list[tuple[str, str]]:
    done = run_ffmpeg(packet_hash_args(str(path), "a:0"), timeout_s=60)
    return [(r["pts"], r["data_hash"]) for r in parse_packets(done.stdout.decode())]


def start_time(path: Path, stream: str) -> float:
    return float(ffprobe_stream(path, stream, "start_time")["start_time"])


def decode_video(path: Path) -> np.ndarray:
    info = probe(str(path))
    return np.concatenate(
        [
            b.frames
            for b in decode_range(
                str(path), start_frame=0, end_frame=info.frame_count, warmup_frames=0,
                seek_pts=info.frame_pts[0], seek_frame=0, batch_frames=64,
            )
        ]
    )  # fmt: skip


def job_settings(info: VideoInfo, **options: object) -> EncoderSettings:
    chosen: dict[str, object] = {"crf": 8, "preset": "ultrafast", **options}
    return encoder_settings_for(info, JobOptions(**chosen), Settings(encoder_threads=2))  # type: ignore[arg-type]


def merge(
    paths: list[Path], ranges: list[ChunkRange], source: Path, info: VideoInfo, output: Path
) -> MergeReport:
    """``merge_chunks`` as every test here calls it: one label, a two-minute limit."""
    return merge_chunks(
        paths, source=str(source), info=info, chunk_ranges=ranges, output=output, label=LABEL, timeout_s=120
    )


@pytest.mark.parametrize("name", ["long_gop", "vfr", "offset"])
def test_round_trip_keeps_frames_pts_audio_sync_and_labels(media: Media, tmp_path: Path, name: str) -> None:
    source = getattr(media, name)
    info = probe(str(source))
    paths, ranges = render(source, info, tmp_path, chunk_frames=25, settings=job_settings(info))
    assert len(ranges) >= 3
    output = tmp_path / "out" / "result.mp4"
    report = merge(paths, ranges, source, info, output)
    assert report.frames == report.expected_frames == info.frame_count
    assert sorted(p.name for p in output.parent.iterdir()) == ["result.mp4"]  # temp files gone

    tick = info.time_base
    ours, theirs = video_pts_seconds(output), video_pts_seconds(source)
    assert len(ours) == len(theirs) == info.frame_count
    assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) <= tick

    assert audio_packets(output) == audio_packets(source)  # byte-identical, same timestamps
    frame_s = float(1 / info.avg_fps)
    source_offset = start_time(source, "a:0") - start_time(source, "v:0")
    output_offset = start_time(output, "a:0") - start_time(output, "v:0")
    assert abs(source_offset - output_offset) <= frame_s

    stream = ffprobe_stream(output, "v:0", "avg_frame_rate,r_frame_rate,width,height")
    if not info.vfr:
        assert stream["r_frame_rate"] == "30000/1001" and stream["avg_frame_rate"] == "30000/1001"
    tags = run_ffmpeg(
        ["ffprobe", "-v", "error", "-show_entries", "format_tags", "-of", "json", str(output)], timeout_s=60
    )
    assert LABEL in tags.stdout.decode()
    assert psnr(decode_video(output), decode_video(source)) > 30


def test_rotated_source_merges_upright_without_rotation_tag(media: Media, tmp_path: Path) -> None:
    info = probe(str(media.rotated))
    paths, ranges = render(media.rotated, info, tmp_path, chunk_frames=30, settings=job_settings(info))
    output = tmp_path / "upright.mp4"
    merge(paths, ranges, media.rotated, info, output)
    merged = probe(str(output))
    assert (merged.rotation, merged.width, merged.height) == (0, 96, 160)
    assert psnr(decode_video(output), decode_video(media.rotated)) > 30


def test_chunk_encoding_is_bit_identical_when_repeated(media: Media, tmp_path: Path) -> None:
    info = probe(str(media.vfr))
    settings = job_settings(info, preset="veryfast")
    digests = []
    frames_md5 = []
    for attempt in ("a", "b"):
        workdir = tmp_path / attempt
        paths, _ = render(media.vfr, info, workdir, chunk_frames=30, settings=settings, start=30, end=60)
        digests.append(hashlib.sha256(paths[0].read_bytes()).hexdigest())
        frames_md5.append(run_ffmpeg(framemd5_args(str(paths[0])), timeout_s=60).stdout)
    assert digests[0] == digests[1]
    assert frames_md5[0] == frames_md5[1]


def test_chunk_starts_with_a_keyframe_and_keeps_source_pts_and_colour_tags(
    media: Media, tmp_path: Path
) -> None:
    info = probe(str(media.tagged))
    paths, ranges = render(
        media.tagged, info, tmp_path, chunk_frames=12, settings=job_settings(info), start=5
    )
    rows = ffprobe_packets(paths[0], "v:0")
    assert "K" in rows[0]["flags"]
    assert [int(r["pts"]) for r in rows] == info.frame_pts[5 : ranges[0].end_frame]
    tags = ffprobe_stream(paths[0], "v:0", "color_range,color_space,color_primaries,color_transfer")
    assert tags == {
        "color_range": "pc",
        "color_space": "bt709",
        "color_primaries": "bt709",
        "color_transfer": "bt709",
    }
    output = tmp_path / "tagged.mp4"
    merge(paths, ranges, media.tagged, info, output)
    assert ffprobe_stream(output, "v:0", "color_range,color_space,color_primaries,color_transfer") == tags
    assert psnr(decode_video(output), decode_video(media.tagged)[5:]) > 30


def test_partial_range_job_starts_at_zero_with_its_audio(media: Media, tmp_path: Path) -> None:
    info = probe(str(media.long_gop))
    paths, ranges = render(
        media.long_gop, info, tmp_path, chunk_frames=15, settings=job_settings(info), start=20, end=70
    )
    output = tmp_path / "part.mp4"
    report = merge(paths, ranges, media.long_gop, info, output)
    assert report.frames == 50
    assert abs(report.duration_s - 50 * 1001 / 30000) < 1e-6
    assert start_time(output, "v:0") == 0.0
    audio = ffprobe_stream(output, "a:0", "start_time,duration")
    assert abs(float(audio["start_time"])) <= 1001 / 30000
    assert abs(float(audio["duration"]) - report.duration_s) < 0.1


def test_odd_sized_source_is_cropped_to_even_and_merges(media: Media, tmp_path: Path) -> None:
    info = probe(str(media.odd))
    settings = job_settings(info)
    assert (info.width, info.height, settings.width, settings.height) == (95, 61, 94, 60)
    paths, ranges = render(media.odd, info, tmp_path, chunk_frames=3, settings=settings)
    output = tmp_path / "odd_out.mp4"
    report = merge(paths, ranges, media.odd, info, output)
    assert report.frames == 7 and len(ranges) == 2


def test_h265_chunks_merge_by_stream_copy(media: Media, tmp_path: Path) -> None:
    info = probe(str(media.long_gop))
    settings = job_settings(info, codec="h265")
    paths, ranges = render(
        media.long_gop, info, tmp_path, chunk_frames=12, settings=settings, start=30, end=60
    )
    output = tmp_path / "hevc.mp4"
    report = merge(paths, ranges, media.long_gop, info, output)
    assert report.frames == 30
    assert ffprobe_stream(output, "v:0", "codec_name")["codec_name"] == "hevc"


def test_sliced_thread_chunks_merge_frame_exact(media: Media, tmp_path: Path) -> None:
    """x264's sliced threads (``EncoderSettings.sliced_threads``): the option reaches x264 (its SEI says so,
    on frames tall enough for two slices), and chunks still start on a keyframe and stream-copy into the whole."""
    info = probe(str(media.long_gop))
    settings = job_settings(info).model_copy(update={"sliced_threads": True, "threads": 2})
    wide = settings.model_copy(update={"width": 320, "height": 240})
    frames = np.random.default_rng(0).integers(0, 256, (4, 240, 320, 3), dtype=np.uint8)
    with open_encoder(tmp_path / "wide.mp4", wide) as encoder:
        encoder.write(frames, [0, 1001, 2002, 3003])
    assert b"sliced_threads=1" in (tmp_path / "wide.mp4").read_bytes() and encoder.flush_s > 0
    paths, ranges = render(
        media.long_gop, info, tmp_path, chunk_frames=12, settings=settings, start=30, end=60
    )
    output = tmp_path / "sliced.mp4"
    report = merge(paths, ranges, media.long_gop, info, output)
    assert report.frames == report.expected_frames == 30


def test_a_short_chunk_fails_the_merge_and_leaves_no_output(media: Media, tmp_path: Path) -> None:
    info = probe(str(media.long_gop))
    settings = job_settings(info)
    paths, ranges = render(media.long_gop, info, tmp_path, chunk_frames=30, settings=settings)
    chunk = ranges[1]
    with open_encoder(paths[1], settings) as encoder:  # re-render chunk 1 without its last 2 frames
        for batch in decode_range(
            str(media.long_gop), start_frame=chunk.start_frame, end_frame=chunk.end_frame - 2, warmup_frames=0,
            seek_pts=chunk.seek_pts, seek_frame=chunk.seek_frame, batch_frames=64,
        ):  # fmt: skip
            keep = [i for i, out in enumerate(batch.output_mask) if out]
            encoder.write(batch.frames[keep], [batch.pts[i] for i in keep])
    output = tmp_path / "out" / "bad.mp4"
    with pytest.raises(ExternalToolError, match="merged video has 88 frames, the plan has 90"):
        merge(paths, ranges, media.long_gop, info, output)
    assert list(output.parent.iterdir()) == []
