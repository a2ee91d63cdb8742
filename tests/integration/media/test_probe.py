"""``probe`` on real files made by ffmpeg, and clear refusals of files that are not videos."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.errors import InvalidVideoError
from shared.ffmpeg import run_ffmpeg
from shared.media import probe
from tests.integration.media.conftest import Media

pytestmark = pytest.mark.integration


def test_long_gop_clip_with_audio(media: Media) -> None:
    info = probe(str(media.long_gop))
    assert info.frame_count == 90
    assert info.keyframe_indices == [0, 40, 80]
    assert (info.avg_fps_num, info.avg_fps_den) == (30000, 1001)
    assert info.frame_pts == [i * 1001 for i in range(90)]
    assert not info.vfr and info.rotation == 0 and (info.width, info.height) == (160, 96)
    assert [s.codec for s in info.audio_streams] == ["aac"]
    assert info.container.startswith("mov,mp4")


def test_single_keyframe_and_vfr_and_offset_start(media: Media) -> None:
    assert probe(str(media.single_key)).keyframe_indices == [0]
    vfr = probe(str(media.vfr))
    assert vfr.vfr and vfr.frame_pts[6] - vfr.frame_pts[5] == 1001 + 7
    offset = probe(str(media.offset))
    assert offset.frame_pts[0] == 15000 and offset.start_time_s < 0.5  # audio priming starts earlier


def test_rotated_clip_reports_upright_size(media: Media) -> None:
    info = probe(str(media.rotated))
    assert info.rotation == 90
    assert (info.coded_width, info.coded_height, info.width, info.height) == (160, 96, 96, 160)


def test_colour_tags_are_read(media: Media) -> None:
    info = probe(str(media.tagged))
    assert (info.color_range, info.color_space, info.color_primaries, info.color_transfer) == (
        "pc",
        "bt709",
        "bt709",
        "bt709",
    )


def _bad(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def test_zero_byte_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidVideoError, match=r"empty\.mp4: empty file \(0 bytes\)"):
        probe(str(_bad(tmp_path, "empty.mp4", b"")))


def test_text_file_named_mp4(tmp_path: Path) -> None:
    with pytest.raises(InvalidVideoError, match=r"notes\.mp4: not a readable media file \(.*Invalid data"):
        probe(str(_bad(tmp_path, "notes.mp4", b"these are my holiday notes\n" * 20)))


def test_truncated_mp4_without_its_index(media: Media, tmp_path: Path) -> None:
    cut = _bad(tmp_path, "cut.mp4", media.long_gop.read_bytes()[:20000])  # moov is at the end
    with pytest.raises(
        InvalidVideoError, match=r"cut\.mp4: truncated: the MP4 index \(moov atom\) is missing"
    ):
        probe(str(cut))


def test_truncated_faststart_mp4_reports_missing_frames(media: Media, tmp_path: Path) -> None:
    faststart = tmp_path / "fs.mp4"
    run_ffmpeg(
        [
            "ffmpeg",
            "-v",
            "error",
            "-i",
            str(media.long_gop),
            "-c",
            "copy",
            "-movflags",
            "+faststart",
            str(faststart),
        ],
        timeout_s=60,
    )
    cut = _bad(tmp_path, "cut_fs.mp4", faststart.read_bytes()[: faststart.stat().st_size * 2 // 3])
    with pytest.raises(InvalidVideoError, match=r"cut_fs\.mp4: truncated: only \d+ of 90 video frames"):
        probe(str(cut))


def test_audio_only_file(media: Media, tmp_path: Path) -> None:
    audio = tmp_path / "voice.m4a"
    run_ffmpeg(
        ["ffmpeg", "-v", "error", "-i", str(media.long_gop), "-vn", "-c", "copy", str(audio)], timeout_s=60
    )
    with pytest.raises(InvalidVideoError, match=r"voice\.m4a: no video stream \(streams found: audio\)"):
        probe(str(audio))


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_still_image(media: Media, tmp_path: Path, suffix: str) -> None:
    image = tmp_path / f"face{suffix}"
    run_ffmpeg(
        ["ffmpeg", "-v", "error", "-i", str(media.long_gop), "-frames:v", "1", str(image)], timeout_s=60
    )
    with pytest.raises(InvalidVideoError, match="a still image"):
        probe(str(image))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidVideoError, match="no such file"):
        probe(str(tmp_path / "nope.mp4"))
