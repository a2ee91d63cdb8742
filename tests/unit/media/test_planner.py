"""The chunk planner: frame ranges, keyframe seeks, warm-up, limits and encoder settings (pure)."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatcher.planner import (
    ChunkRange,
    check_limits,
    chunk_frames_for,
    codec_level,
    encoder_settings_for,
    frame_range_for,
    plan_chunks,
    planning_notes,
)
from shared.errors import BadInputError, HdrRefusedError, LimitExceededError
from shared.media import VideoInfo
from shared.schemas import JobOptions
from shared.settings import Settings
from tests.unit.media.conftest import NTSC_TICKS, cfr_info, packets_for, probe_json


def assert_valid_plan(info: VideoInfo, chunks: list[ChunkRange], start: int, end: int, warmup: int) -> None:
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert chunks[0].start_frame == start and chunks[-1].end_frame == end
    for before, after in zip(chunks, chunks[1:], strict=False):
        assert after.start_frame == before.end_frame
    for chunk in chunks:
        assert chunk.frame_count >= 1
        assert chunk.warmup_frames == min(warmup, chunk.start_frame)
        assert chunk.seek_frame in info.keyframe_indices or chunk.seek_frame == 0
        assert chunk.seek_frame <= chunk.start_frame - chunk.warmup_frames
        assert chunk.seek_pts == info.frame_pts[chunk.seek_frame]
        later_keys = [
            k
            for k in info.keyframe_indices
            if chunk.seek_frame < k <= chunk.start_frame - chunk.warmup_frames
        ]
        assert not later_keys, "the seek must use the nearest keyframe at or before the first needed frame"


def test_long_gop_clip_still_splits_and_seeks_to_the_keyframe_before_each_chunk() -> None:
    info = cfr_info(90, keyframe_every=40)  # keyframes at 0, 40, 80
    chunks = plan_chunks(info, chunk_frames=30, warmup_frames=4)
    assert [(c.start_frame, c.end_frame) for c in chunks] == [(0, 30), (30, 60), (60, 90)]
    assert [c.seek_frame for c in chunks] == [0, 0, 40]
    assert [c.seek_pts for c in chunks] == [0, 0, 40 * NTSC_TICKS]
    assert [c.warmup_frames for c in chunks] == [0, 4, 4]


def test_keyint_250_on_90_frames_gives_chunks_between_keyframes_seeking_frame_0() -> None:
    info = cfr_info(90)  # a single keyframe
    chunks = plan_chunks(info, chunk_frames=26, warmup_frames=3)
    assert len(chunks) == 3  # 90 = 26+26+38: the 12-frame remainder joins the last chunk
    assert all(c.seek_frame == 0 and c.seek_pts == 0 for c in chunks)
    assert chunks[-1].frame_count == 38
    assert_valid_plan(info, chunks, 0, 90, 3)


def test_warmup_is_bounded_by_frame_zero_and_seek_moves_back_past_a_keyframe() -> None:
    info = cfr_info(100, keyframe_every=10)
    chunks = plan_chunks(info, chunk_frames=12, warmup_frames=5)
    assert chunks[0].warmup_frames == 0
    chunk = next(c for c in chunks if c.start_frame == 12)
    assert chunk.warmup_frames == 5 and chunk.seek_frame == 0  # needs frame 7, keyframe 0
    chunk = next(c for c in chunks if c.start_frame == 24)
    assert chunk.seek_frame == 10  # needs frame 19 -> keyframe 10, not 20


def test_chunk_starting_on_a_keyframe_without_warmup_seeks_exactly_there() -> None:
    info = cfr_info(80, keyframe_every=40)
    chunks = plan_chunks(info, chunk_frames=40, warmup_frames=0)
    assert [(c.seek_frame, c.start_frame) for c in chunks] == [(0, 0), (40, 40)]


@pytest.mark.parametrize("frames", [1, 2, 3])
def test_very_short_videos_make_one_chunk(frames: int) -> None:
    info = cfr_info(frames)
    chunks = plan_chunks(info, chunk_frames=30, warmup_frames=8)
    assert [(c.start_frame, c.end_frame, c.warmup_frames) for c in chunks] == [(0, frames, 0)]


@pytest.mark.parametrize(
    ("frames", "sizes"),
    [
        (95, [30, 30, 35]),
        (105, [30, 30, 30, 15]),
        (91, [30, 30, 31]),
        (59, [30, 29]),
        (44, [44]),
        (45, [30, 15]),
    ],
)
def test_odd_frame_counts_tiny_remainders_join_the_last_chunk(frames: int, sizes: list[int]) -> None:
    chunks = plan_chunks(cfr_info(frames), chunk_frames=30, warmup_frames=2)
    assert [c.frame_count for c in chunks] == sizes


def test_start_and_end_range_plans_only_that_range_with_warmup_before_it() -> None:
    info = cfr_info(120, keyframe_every=25)
    chunks = plan_chunks(info, chunk_frames=20, warmup_frames=6, start_frame=33, end_frame=77)
    assert chunks[0].start_frame == 33 and chunks[-1].end_frame == 77
    assert chunks[0].warmup_frames == 6 and chunks[0].seek_frame == 25
    assert_valid_plan(info, chunks, 33, 77, 6)


@pytest.mark.parametrize(("start", "end"), [(-1, 10), (5, 5), (0, 91), (90, 91)])
def test_ranges_outside_the_video_are_refused(start: int, end: int) -> None:
    with pytest.raises(BadInputError, match="outside the video"):
        plan_chunks(cfr_info(90), chunk_frames=30, warmup_frames=0, start_frame=start, end_frame=end)


@given(
    frames=st.integers(1, 400),
    keyframe_every=st.integers(1, 300),
    chunk_frames=st.integers(1, 120),
    warmup=st.integers(0, 20),
    data=st.data(),
)
def test_any_plan_covers_the_range_exactly_with_valid_seeks(
    frames: int, keyframe_every: int, chunk_frames: int, warmup: int, data: st.DataObject
) -> None:
    info = cfr_info(frames, keyframe_every=keyframe_every)
    start = data.draw(st.integers(0, frames - 1))
    end = data.draw(st.integers(start + 1, frames))
    chunks = plan_chunks(
        info, chunk_frames=chunk_frames, warmup_frames=warmup, start_frame=start, end_frame=end
    )
    assert_valid_plan(info, chunks, start, end, warmup)
    assert all(c.frame_count < chunk_frames * 1.5 or len(chunks) == 1 for c in chunks)


def test_b_frame_reordered_packets_give_presentation_order_keyframe_indices() -> None:
    decode_order = [0, 4004, 2002, 1001, 3003, 8008, 6006, 5005, 7007, 9009]
    info_json = probe_json()
    from shared.media import parse_probe

    info = parse_probe(info_json, packets_for(decode_order, keyframes=[0, 5005]), source="b.mp4")
    assert info.frame_pts == sorted(decode_order)
    assert info.keyframe_indices == [0, 5]
    chunks = plan_chunks(info, chunk_frames=4, warmup_frames=1)
    assert [c.seek_frame for c in chunks] == [0, 0, 5]


def test_chunk_frames_prefers_the_option_then_the_setting_then_the_estimate() -> None:
    info = cfr_info(90)
    assert chunk_frames_for(info, JobOptions(chunk_frames=17), Settings(chunk_frames=50)) == 17
    assert chunk_frames_for(info, JobOptions(), Settings(chunk_frames=50)) == 50
    plain = chunk_frames_for(info, JobOptions(), Settings(target_chunk_s=10))
    upscaled = chunk_frames_for(info, JobOptions(upscale=4), Settings(target_chunk_s=10))
    assert plain > upscaled >= 24


def test_hdr_is_refused_by_default_naming_the_opt_in() -> None:
    info = cfr_info(10, color_transfer="smpte2084", pix_fmt="yuv420p10le", color_primaries="bt2020")
    assert info.hdr and info.bit_depth == 10
    with pytest.raises(HdrRefusedError, match="--hdr tonemap"):
        check_limits(info, JobOptions(), Settings())
    check_limits(info, JobOptions(hdr="tonemap"), Settings())
    settings = encoder_settings_for(info, JobOptions(hdr="tonemap"), Settings())
    assert (settings.color_trc, settings.color_primaries, settings.pix_fmt) == ("bt709", "bt709", "yuv420p")
    assert any("10-bit" in note for note in planning_notes(info, JobOptions(hdr="tonemap")))


def test_hlg_counts_as_hdr() -> None:
    with pytest.raises(HdrRefusedError):
        check_limits(cfr_info(10, color_transfer="arib-std-b67"), JobOptions(), Settings())


def test_upscaling_4k_by_4_is_refused_with_the_limit_named() -> None:
    info = cfr_info(10, width=3840, height=2160)
    with pytest.raises(LimitExceededError, match="FACEFARM_MAX_OUTPUT_PIXELS"):
        check_limits(info, JobOptions(upscale=4), Settings())
    roomy = Settings(max_output_pixels=20000 * 20000)
    with pytest.raises(LimitExceededError, match=r"H\.264 allows at most 139264 \(level 6\.2"):
        check_limits(info, JobOptions(upscale=4), roomy)
    check_limits(info, JobOptions(upscale=2), Settings())  # 7680x4320 fits level 6.x


@pytest.mark.parametrize(
    ("codec", "size", "fps", "level"),
    [
        ("h264", (1920, 1080), Fraction(30000, 1001), "4"),
        ("h264", (4096, 2304), Fraction(25), "5.1"),
        ("h264", (4096, 2304), Fraction(30), "5.2"),
        ("h264", (8192, 4320), Fraction(30), "6"),
        ("h264", (8192, 4320), Fraction(120), "6.2"),
        ("h265", (3840, 2160), Fraction(30), "5"),
        ("h265", (8192, 4320), Fraction(60), "6.1"),
    ],
)
def test_codec_level_is_the_lowest_that_fits(
    codec: str, size: tuple[int, int], fps: Fraction, level: str
) -> None:
    assert codec_level(codec, *size, fps) == level


def test_beyond_level_62_is_refused() -> None:
    with pytest.raises(LimitExceededError, match="level 6.2"):
        codec_level("h264", 8192, 4320, Fraction(144))
    with pytest.raises(LimitExceededError, match="H.265"):
        codec_level("h265", 16384, 8640, Fraction(30))


def test_duration_and_size_limits_name_their_settings() -> None:
    info = cfr_info(10, width=640, height=480)
    with pytest.raises(LimitExceededError, match="FACEFARM_MAX_DURATION_S"):
        check_limits(info, JobOptions(), Settings(max_duration_s=1))
    with pytest.raises(LimitExceededError, match="FACEFARM_MAX_WIDTH"):
        check_limits(info, JobOptions(), Settings(max_width=320))
    with pytest.raises(LimitExceededError, match="FACEFARM_MAX_FRAMES"):
        check_limits(info, JobOptions(), Settings(max_frames=5))


def test_encoder_settings_keep_time_base_colour_and_round_odd_upright_sizes_to_even() -> None:
    info = cfr_info(
        10,
        width=161,
        height=97,
        color_space="bt709",
        color_primaries="bt709",
        color_transfer="bt709",
        color_range="pc",
        side_data=[{"side_data_type": "Display Matrix", "rotation": 90}],
    )
    assert (info.width, info.height) == (97, 161)
    settings = encoder_settings_for(
        info, JobOptions(codec="h264", crf=20, preset="slow"), Settings(encoder_threads=3)
    )
    assert (settings.width, settings.height) == (96, 160)
    assert (settings.time_base_num, settings.time_base_den, settings.fps_num, settings.fps_den) == (
        1,
        30000,
        30000,
        1001,
    )
    assert (settings.color_space, settings.color_primaries, settings.color_trc, settings.color_range) == (
        "bt709",
        "bt709",
        "bt709",
        "pc",
    )
    assert (settings.codec, settings.crf, settings.preset, settings.threads) == ("libx264", 20, "slow", 3)
    upscaled = encoder_settings_for(info, JobOptions(upscale=2, codec="h265"), Settings())
    assert (upscaled.width, upscaled.height, upscaled.codec) == (194, 322, "libx265")
    sliced = Settings(encoder_sliced_threads=True)
    assert encoder_settings_for(info, JobOptions(), sliced).sliced_threads  # x264 only
    assert not encoder_settings_for(info, JobOptions(codec="h265"), sliced).sliced_threads


def test_frame_range_for_seconds_maps_to_frames_and_rejects_empty_ranges() -> None:
    info = cfr_info(90)
    assert frame_range_for(info, None, None) == (0, 90)
    assert frame_range_for(info, 1.0, 2.0) == (30, 60)  # frame 30 starts at 1.001 s
    assert frame_range_for(info, 0.5, None) == (15, 90)
    with pytest.raises(BadInputError, match="beyond the end"):
        frame_range_for(info, 10.0, None)
    with pytest.raises(BadInputError, match="after --start"):
        frame_range_for(info, 2.0, 1.0)
