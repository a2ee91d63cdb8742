"""ffmpeg/ffprobe argument builders and encoder options (pure; nothing is run)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest

from shared.ffmpeg import (
    ConcatEntry,
    MergeStreams,
    color_args,
    concat_list_text,
    merge_args,
    packet_scan_args,
    probe_args,
    raw_encode_args,
    rescale_to_us,
    seconds_arg,
)
from shared.schemas import EncoderSettings
from worker.frames.encode import encoder_options


def _merge(**overrides: object) -> list[str]:
    kwargs: dict[str, object] = {
        "concat_list": Path("/tmp/j/chunks.ffconcat"),
        "source": "/data/in.mp4",
        "output": Path("/tmp/j/.out.partial.mp4"),
        "container": "mp4",
        "video_start_s": Fraction(0),
        "source_window_s": None,
        "streams": MergeStreams(audio_codecs=("aac",), subtitle_codecs=()),
        "color_args": ["-colorspace:v:0", "bt709"],
        "label": "synthetic media: face-swapped",
    }
    kwargs.update(overrides)
    return merge_args(**kwargs)  # type: ignore[arg-type]


def _pairs(args: list[str]) -> list[tuple[str, str]]:
    return list(zip(args, args[1:], strict=False))


def test_probe_args_show_streams_and_format_as_json() -> None:
    assert probe_args("in.mp4") == [
        "ffprobe", "-v", "error", "-print_format", "json", "-show_streams", "-show_format", "in.mp4"
    ]  # fmt: skip


def test_packet_scan_selects_one_stream_and_never_decodes() -> None:
    args = packet_scan_args("https://h/v?sig=1", 2)
    assert ("-select_streams", "2") in _pairs(args)
    assert ("-show_entries", "packet=pts,dts,flags,duration") in _pairs(args)
    assert "-show_frames" not in args and "-count_frames" not in args
    assert args[-1] == "https://h/v?sig=1"


def test_rescale_to_us_rounds_to_nearest_like_av_rescale_q() -> None:
    tb = Fraction(1, 30000)
    assert rescale_to_us(1001, tb) == 33367  # 33366.67
    assert rescale_to_us(3, Fraction(1, 2_000_000)) == 2  # 1.5 -> away from zero
    assert rescale_to_us(-3, Fraction(1, 2_000_000)) == -2
    assert seconds_arg(Fraction(1, 2)) == "500000us"


def test_concat_list_quotes_paths_and_pins_durations_in_microseconds(tmp_path: Path) -> None:
    odd = tmp_path / "it's chunk.mp4"
    text = concat_list_text([ConcatEntry(odd, 1_001_000), ConcatEntry(tmp_path / "b.mp4", 33367)])
    lines = text.splitlines()
    assert lines[0] == "ffconcat version 1.0"
    assert lines[1] == f"file '{tmp_path}/it'\\''s chunk.mp4'"
    assert lines[2] == "duration 1001000us"
    assert lines[4] == "duration 33367us"
    with pytest.raises(ValueError, match="positive duration"):
        concat_list_text([ConcatEntry(odd, 0)])


def test_whole_video_merge_keeps_timestamps_and_maps_source_streams_once() -> None:
    args = _merge(video_start_s=Fraction(1, 2))
    assert args[0] == "ffmpeg" and "-copyts" in args
    assert args.index("-itsoffset") < args.index("-f")  # the offset belongs to the concat input
    assert ("-itsoffset", "500000us") in _pairs(args)
    assert ("-f", "concat") in _pairs(args) and ("-safe", "0") in _pairs(args)
    assert ("-map", "0:v:0") in _pairs(args) and ("-map", "1:a:0") in _pairs(args)
    assert ("-c:v", "copy") in _pairs(args) and ("-c:a:0", "copy") in _pairs(args)
    assert ("-map_metadata", "1") in _pairs(args)
    assert ("-metadata", "comment=synthetic media: face-swapped") in _pairs(args)
    assert ("-movflags", "+faststart") in _pairs(args)
    assert ("-colorspace:v:0", "bt709") in _pairs(args)
    assert not any("rotate" in a or "display_rotation" in a for a in args)
    assert args[-3:] == ["-f", "mp4", "/tmp/j/.out.partial.mp4"]


def test_partial_merge_reads_the_source_window_without_copyts() -> None:
    args = _merge(source_window_s=(Fraction(1), Fraction(5, 2)))
    assert "-copyts" not in args and "-itsoffset" not in args
    ss = args.index("-ss")
    assert args[ss : ss + 4] == ["-ss", "1000000us", "-i", "/data/in.mp4"]
    assert ("-t", "1500000us") in _pairs(args) and args.index("-t") > args.index("/data/in.mp4")


def test_mp4_merge_converts_text_subtitles_drops_bitmaps_and_reencodes_unfit_audio() -> None:
    args = _merge(
        streams=MergeStreams(
            audio_codecs=("pcm_s16le", "aac"), subtitle_codecs=("subrip", "hdmv_pgs_subtitle")
        )
    )
    assert ("-c:a:0", "aac") in _pairs(args) and ("-c:a:1", "copy") in _pairs(args)
    assert ("-map", "1:s:0") in _pairs(args) and ("-c:s:0", "mov_text") in _pairs(args)
    assert ("-map", "1:s:1") not in _pairs(args)


def test_mkv_merge_copies_everything_and_skips_faststart() -> None:
    args = _merge(
        container="matroska", streams=MergeStreams(audio_codecs=("vorbis",), subtitle_codecs=("subrip",))
    )
    assert ("-c:a:0", "copy") in _pairs(args) and ("-c:s:0", "copy") in _pairs(args)
    assert "-movflags" not in args


def test_color_args_skip_unknown_tags() -> None:
    assert color_args(color_range="tv", color_space="bt709", primaries=None, transfer="unknown") == [
        "-color_range:v:0", "tv", "-colorspace:v:0", "bt709"
    ]  # fmt: skip


def test_raw_encode_args_read_rgb_frames_from_stdin() -> None:
    args = raw_encode_args(
        output=Path("o.mp4"), width=96, height=64, fps="30000/1001", frames=9, keyint=250, audio=True
    )
    assert ("-pix_fmt", "rgb24") in _pairs(args) and ("-i", "-") in _pairs(args)
    assert ("-x264-params", "keyint=250:min-keyint=250:scenecut=0") in _pairs(args)
    assert "sine=frequency=440:sample_rate=48000:duration=0.300300" in args and args[-1] == "o.mp4"


def _settings(**fields: object) -> EncoderSettings:
    base: dict[str, object] = {
        "width": 96,
        "height": 64,
        "time_base_num": 1,
        "time_base_den": 30000,
        "fps_num": 30000,
        "fps_den": 1001,
    }
    base.update(fields)
    return EncoderSettings(**base)  # type: ignore[arg-type]


def test_x264_options_pin_closed_gops_without_b_frames() -> None:
    options = encoder_options(_settings(crf=0, preset="ultrafast", level="3", profile="high"), 120)
    assert options == {
        "crf": "0",
        "preset": "ultrafast",
        "profile": "high",
        "level": "3",
        "x264-params": "open-gop=0:bframes=0",
    }


def test_x264_sliced_threads_is_one_more_param() -> None:
    options = encoder_options(_settings(sliced_threads=True), 120)
    assert options["x264-params"] == "open-gop=0:bframes=0:sliced-threads=1"
    assert "sliced" not in encoder_options(_settings(codec="libx265", sliced_threads=True), 120)["x265-params"]


def test_x265_options_pin_threads_and_level() -> None:
    options = encoder_options(_settings(codec="libx265", threads=3, level="5.1"), 120)
    params = options["x265-params"].split(":")
    assert {"open-gop=0", "bframes=0", "keyint=120", "pools=3", "frame-threads=3", "level-idc=5.1"} <= set(
        params
    )


def test_the_decode_check_decodes_one_stream_to_nothing_and_stops_at_the_first_error() -> None:
    from shared.ffmpeg import decode_check_args

    args = decode_check_args("in.mp4", 2)
    assert args[0] == "ffmpeg" and "-xerror" in args
    assert args[args.index("-map") + 1] == "0:2"
    assert args[-3:] == ["-f", "null", "-"]
