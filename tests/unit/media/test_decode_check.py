"""The plan-time decode check with real ffmpeg: clean files pass, damaged coded frames are refused."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from shared.errors import InvalidVideoError
from shared.media import check_decodes, decode_error_detail, probe


@pytest.fixture(scope="module")
def clean_and_damaged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("decode")
    clean = d / "clean.mp4"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=160x96:rate=15",
         "-frames:v", "30", "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
         "-g", "10", str(clean)],
        check=True, timeout=60,
    )  # fmt: skip
    data = bytearray(clean.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 1500] = bytes(1500)  # zeroes inside the coded frames; headers intact
    damaged = d / "damaged.mp4"
    damaged.write_bytes(bytes(data))
    return clean, damaged


def test_a_clean_video_passes(clean_and_damaged: tuple[Path, Path]) -> None:
    clean, _ = clean_and_damaged
    check_decodes(str(clean), probe(str(clean)), timeout_s=60)


def test_damage_the_probe_cannot_see_is_refused_naming_the_file_and_the_decoder_error(
    clean_and_damaged: tuple[Path, Path],
) -> None:
    _, damaged = clean_and_damaged
    info = probe(str(damaged))  # headers and packets are fine: the probe accepts it
    with pytest.raises(
        InvalidVideoError, match=r"damaged\.mp4: corrupt video data: decoding stopped at '"
    ) as exc:
        check_decodes(str(damaged), info, timeout_s=60)
    assert "@ 0x" not in str(exc.value)  # ffmpeg's [h264 @ 0x...] tag is stripped
    assert exc.value.permanent


def test_the_decoder_error_is_its_first_line_without_the_context_tag() -> None:
    tail = "[h264 @ 0x55d] Invalid NAL unit size (0 > 1087).\n[h264 @ 0x55d] error while decoding MB 1 1\n"
    assert decode_error_detail(tail) == "at 'Invalid NAL unit size (0 > 1087).'"
    assert decode_error_detail("") == "with an error"
