"""``parse_probe``: ffprobe JSON + packet rows -> VideoInfo (pure, no ffprobe run)."""

from __future__ import annotations

import pytest

from shared.errors import InvalidVideoError
from shared.media import VideoInfo, display_name, parse_packets, parse_probe
from tests.unit.media.conftest import NTSC_TICKS, cfr_info, packets_for, probe_json

AAC = {
    "index": 1,
    "codec_type": "audio",
    "codec_name": "aac",
    "channels": 2,
    "sample_rate": "48000",
    "time_base": "1/48000",
    "start_pts": -1024,
    "tags": {"language": "eng"},
}
SUBS = {"index": 2, "codec_type": "subtitle", "codec_name": "mov_text", "time_base": "1/1000"}


def test_parse_packets_reads_compact_rows_in_any_field_order() -> None:
    text = "pts=0|dts=-2002|duration=1001|flags=K_\nflags=__|pts=4004|dts=-1001|duration=N/A|\n\n"
    assert parse_packets(text) == [
        {"pts": "0", "dts": "-2002", "duration": "1001", "flags": "K_"},
        {"flags": "__", "pts": "4004", "dts": "-1001", "duration": "N/A"},
    ]


def test_parse_packets_joins_the_continuation_line_of_a_packet_with_side_data() -> None:
    text = "pts=-1024|flags=KD|\n\n|data_hash=SHA256:ab\npts=0|flags=K_|data_hash=SHA256:cd\n"
    assert parse_packets(text) == [
        {"pts": "-1024", "flags": "KD", "data_hash": "SHA256:ab"},
        {"pts": "0", "flags": "K_", "data_hash": "SHA256:cd"},
    ]


def test_cfr_clip_facts() -> None:
    info = cfr_info(90, keyframe_every=40)
    assert info.frame_count == 90 and not info.vfr
    assert info.keyframe_pts == [0, 40 * NTSC_TICKS, 80 * NTSC_TICKS]
    assert info.keyframe_indices == [0, 40, 80]
    assert (info.avg_fps_num, info.avg_fps_den, info.time_base_num, info.time_base_den) == (
        30000,
        1001,
        1,
        30000,
    )
    assert info.end_pts == 90 * NTSC_TICKS
    assert (info.width, info.height, info.rotation, info.bit_depth, info.hdr) == (160, 96, 0, 8, False)


def test_discarded_packets_are_not_frames_and_timestamps_sort_into_presentation_order() -> None:
    rows = packets_for([2002, 0, 1001, 3003], keyframes=[2002])
    rows.insert(0, {"pts": "-1001", "dts": "-1001", "duration": "1001", "flags": "KD"})
    info = parse_probe(probe_json(), rows, source="x.mp4")
    assert info.frame_pts == [0, 1001, 2002, 3003]
    assert info.keyframe_indices == [2]


def test_vfr_is_detected_from_uneven_frame_gaps_but_ms_rounding_is_not() -> None:
    vfr = parse_probe(probe_json(), packets_for([0, 1001, 2002, 4004, 4505]), source="v.mp4")
    assert vfr.vfr
    ms = [round(i * 1000 * 1001 / 30000) for i in range(30)]  # 33/34 ms gaps of 29.97 fps in mkv
    mkv = parse_probe(probe_json(time_base="1/1000"), packets_for(ms), source="v.mkv")
    assert not mkv.vfr


@pytest.mark.parametrize(("rotation", "expected"), [(90, 90), (-90, 270), (180, 180), (-180, 180), (0, 0)])
def test_display_matrix_rotation_gives_upright_size(rotation: int, expected: int) -> None:
    info = parse_probe(
        probe_json(side_data=[{"side_data_type": "Display Matrix", "rotation": rotation}]),
        packets_for([0, 1001]),
        source="r.mp4",
    )
    assert info.rotation == expected
    assert (info.width, info.height) == ((96, 160) if expected in (90, 270) else (160, 96))
    assert (info.coded_width, info.coded_height) == (160, 96)


def test_legacy_rotate_tag_counts_clockwise() -> None:
    info = parse_probe(probe_json(tags={"rotate": "90"}), packets_for([0, 1001]), source="r.mp4")
    assert info.rotation == 270 and (info.width, info.height) == (96, 160)


def test_colour_tags_hdr_bit_depth_and_full_range() -> None:
    info = parse_probe(
        probe_json(
            pix_fmt="yuv420p10le",
            color_space="bt2020nc",
            color_primaries="bt2020",
            color_transfer="smpte2084",
            color_range="tv",
        ),
        packets_for([0]),
        source="hdr.mov",
    )
    assert (info.bit_depth, info.hdr, info.color_space, info.color_transfer) == (
        10,
        True,
        "bt2020nc",
        "smpte2084",
    )
    phone = parse_probe(
        probe_json(pix_fmt="yuvj420p", color_space="unknown"), packets_for([0]), source="p.mp4"
    )
    assert (phone.color_range, phone.color_space, phone.bit_depth) == ("pc", None, 8)


def test_audio_and_subtitle_streams_are_listed_and_cover_art_is_not_video() -> None:
    cover = {"index": 3, "codec_type": "video", "codec_name": "mjpeg", "disposition": {"attached_pic": 1}}
    data = probe_json(extra_streams=[AAC, SUBS, cover])
    info = parse_probe(data, packets_for([0, 1001]), source="a.mp4")
    assert [(s.index, s.codec, s.language, s.channels, s.start_pts) for s in info.audio_streams] == [
        (1, "aac", "eng", 2, -1024)
    ]
    assert [s.codec for s in info.subtitle_streams] == ["mov_text"]
    assert info.stream_index == 0


def test_video_info_survives_a_json_round_trip() -> None:
    info = parse_probe(probe_json(extra_streams=[AAC]), packets_for([0, 1001, 2002]), source="a.mp4")
    assert VideoInfo.model_validate_json(info.model_dump_json()) == info


def test_audio_only_file_has_no_video_stream() -> None:
    data = {"streams": [AAC], "format": {"format_name": "mov,mp4,m4a,3gp,3g2,mj2"}}
    with pytest.raises(InvalidVideoError, match=r"song\.m4a: no video stream \(streams found: audio\)"):
        parse_probe(data, [], source="song.m4a")


def test_still_image_is_not_a_video() -> None:
    data = probe_json(format_name="png_pipe", codec_name="png")
    with pytest.raises(InvalidVideoError, match="still image"):
        parse_probe(data, packets_for([0]), source="face.png")


def test_fewer_packets_than_the_header_declares_is_truncation() -> None:
    data = probe_json(nb_frames="90")
    with pytest.raises(InvalidVideoError, match=r"truncated: only 3 of 90 video frames.*partial file"):
        parse_probe(data, packets_for([0, 1001, 2002]), source="t.mp4", scan_errors="x: partial file\n")


def test_no_readable_frames_and_missing_timestamps_are_refused() -> None:
    with pytest.raises(InvalidVideoError, match="no readable frames"):
        parse_probe(probe_json(), [], source="e.mp4")
    with pytest.raises(InvalidVideoError, match="without timestamps"):
        parse_probe(probe_json(), [{"pts": "N/A", "dts": "N/A", "flags": "K_"}], source="raw.h264")


def test_duplicate_timestamps_are_refused() -> None:
    with pytest.raises(InvalidVideoError, match="share one timestamp"):
        parse_probe(probe_json(), packets_for([0, 1001, 1001]), source="d.mp4")


def test_presigned_url_query_never_appears_in_names() -> None:
    url = "https://bucket.s3.amazonaws.com/jobs/1/input/video?X-Amz-Signature=secret"
    assert display_name(url) == "https://bucket.s3.amazonaws.com/jobs/1/input/video"
    assert display_name("/data/in.mp4") == "/data/in.mp4"
