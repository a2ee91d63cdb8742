"""``decode_range`` against a full decode: exact frames and timestamps, warm-up, rotation, VFR."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dispatcher.planner import plan_chunks
from shared.errors import InvalidVideoError
from shared.media import VideoInfo, probe
from tests.integration.media.conftest import HEIGHT, WIDTH, Media, cli_decode, psnr
from worker.frames import FrameBatch, decode_range

pytestmark = pytest.mark.integration


def decode_all(path: Path, info: VideoInfo) -> FrameBatch:
    batches = list(
        decode_range(
            str(path), start_frame=0, end_frame=info.frame_count, warmup_frames=0, seek_pts=info.frame_pts[0],
            seek_frame=0, batch_frames=1000,
        )
    )  # fmt: skip
    assert len(batches) == 1
    return batches[0]


def decode_chunk(
    path: Path, info: VideoInfo, start: int, end: int, warmup: int, batch: int = 7
) -> list[FrameBatch]:
    (chunk,) = [
        c
        for c in plan_chunks(
            info, chunk_frames=end - start, warmup_frames=warmup, start_frame=start, end_frame=end
        )
    ]
    return list(
        decode_range(
            str(path), start_frame=chunk.start_frame, end_frame=chunk.end_frame, warmup_frames=chunk.warmup_frames,
            seek_pts=chunk.seek_pts, seek_frame=chunk.seek_frame, batch_frames=batch,
        )
    )  # fmt: skip


@pytest.mark.parametrize("name", ["long_gop", "single_key", "vfr", "offset"])
def test_chunks_between_keyframes_match_the_full_decode_exactly(media: Media, name: str) -> None:
    path = getattr(media, name)
    info = probe(str(path))
    full = decode_all(path, info)
    assert full.pts == info.frame_pts and full.indices == list(range(info.frame_count))
    for start, end, warmup in [(0, 13, 5), (13, 45, 5), (45, 57, 6), (57, 83, 3), (83, info.frame_count, 8)]:
        batches = decode_chunk(path, info, start, end, warmup)
        assert all(len(b) <= 7 for b in batches)  # bounded batches
        indices = [i for b in batches for i in b.indices]
        mask = [m for b in batches for m in b.output_mask]
        pts = [p for b in batches for p in b.pts]
        first = max(0, start - warmup)
        assert indices == list(range(first, end))
        assert mask == [i >= start for i in indices]
        assert pts == info.frame_pts[first:end]
        frames = np.concatenate([b.frames for b in batches])
        assert np.array_equal(frames, full.frames[first:end])


def test_decoded_frames_match_the_ffmpeg_cli(media: Media) -> None:
    info = probe(str(media.long_gop))
    ours = decode_all(media.long_gop, info).frames
    theirs = cli_decode(media.long_gop, WIDTH, HEIGHT)
    assert ours.shape == theirs.shape == (90, HEIGHT, WIDTH, 3)
    assert psnr(ours, theirs) > 35  # same decoder; only the YUV->RGB filter differs


def test_rotated_input_comes_out_upright(media: Media) -> None:
    info = probe(str(media.rotated))
    rotated = decode_all(media.rotated, info).frames
    plain = decode_all(media.long_gop, probe(str(media.long_gop))).frames
    assert rotated.shape == (90, WIDTH, HEIGHT, 3)
    assert np.array_equal(rotated, np.rot90(plain, k=1, axes=(1, 2)))
    upright = cli_decode(media.rotated, HEIGHT, WIDTH)  # the CLI autorotates
    assert psnr(rotated, upright) > 35
    chunk = decode_chunk(media.rotated, info, 50, 60, 4)
    assert chunk[0].frames.shape[1:] == (WIDTH, HEIGHT, 3)


def test_vfr_input_keeps_its_timestamps(media: Media) -> None:
    info = probe(str(media.vfr))
    batches = decode_chunk(media.vfr, info, 41, 70, 2)
    pts = [p for b in batches for p in b.pts]
    assert pts == info.frame_pts[39:70]
    gaps = {b - a for a, b in zip(pts, pts[1:], strict=False)}
    assert len(gaps) > 3


def test_full_range_bt709_source_round_trips_colour(media: Media) -> None:
    info = probe(str(media.tagged))
    ours = decode_all(media.tagged, info).frames
    assert psnr(ours, cli_decode(media.tagged, WIDTH, HEIGHT)) > 35


def test_truncated_file_reports_the_shortfall(media: Media, tmp_path: Path) -> None:
    info = probe(str(media.long_gop))
    from shared.ffmpeg import run_ffmpeg

    faststart = tmp_path / "fs.mp4"
    run_ffmpeg(
        [
            "ffmpeg",
            "-v",
            "error",
            "-i",
            str(media.long_gop),
            "-map",
            "0:v",
            "-c",
            "copy",
            "-movflags",
            "+faststart",
            str(faststart),
        ],
        timeout_s=60,
    )
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(faststart.read_bytes()[: faststart.stat().st_size // 2])
    seen: list[int] = []
    with pytest.raises(
        InvalidVideoError, match=r"cut\.mp4: decoded only \d+ of 50 frames of chunk \[40, 90\)"
    ):
        for batch in decode_range(
            str(cut), start_frame=40, end_frame=90, warmup_frames=0, seek_pts=info.frame_pts[40], seek_frame=40,
            batch_frames=8,
        ):  # fmt: skip
            seen += batch.indices
    assert seen == list(range(40, 40 + len(seen)))


def test_garbage_file_is_invalid_video(tmp_path: Path) -> None:
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(InvalidVideoError, match=r"junk\.mp4: opening failed"):
        list(
            decode_range(
                str(junk),
                start_frame=0,
                end_frame=5,
                warmup_frames=0,
                seek_pts=0,
                seek_frame=0,
                batch_frames=2,
            )
        )
