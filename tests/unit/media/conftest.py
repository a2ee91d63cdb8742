"""Builders for synthetic probe results (media helper's unit tests; no ffmpeg runs here)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest

from shared.media import VideoInfo, parse_probe

NTSC_TICKS = 1001  # one frame at 30000/1001 fps in a 1/30000 time base


def probe_json(
    *,
    width: int = 160,
    height: int = 96,
    side_data: Sequence[dict[str, Any]] = (),
    extra_streams: Sequence[dict[str, Any]] = (),
    format_name: str = "mov,mp4,m4a,3gp,3g2,mj2",
    **stream_fields: Any,
) -> dict[str, Any]:
    """ffprobe ``-show_streams -show_format`` JSON with one H.264 video stream."""
    video: dict[str, Any] = {
        "index": 0,
        "codec_name": "h264",
        "codec_type": "video",
        "width": width,
        "height": height,
        "pix_fmt": "yuv420p",
        "r_frame_rate": "30000/1001",
        "avg_frame_rate": "30000/1001",
        "time_base": "1/30000",
        "disposition": {"attached_pic": 0},
    }
    video.update(stream_fields)
    if side_data:
        video["side_data_list"] = list(side_data)
    return {
        "streams": [video, *extra_streams],
        "format": {"format_name": format_name, "duration": "3.003000", "start_time": "0.000000"},
    }


def packets_for(pts_in_decode_order: Sequence[int], keyframes: Sequence[int] = (0,)) -> list[dict[str, str]]:
    """Packet rows as ``parse_packets`` returns them; ``keyframes`` are pts values."""
    keys = set(keyframes)
    return [
        {"pts": str(p), "dts": str(p), "duration": str(NTSC_TICKS), "flags": "K_" if p in keys else "__"}
        for p in pts_in_decode_order
    ]


def cfr_info(frames: int, keyframe_every: int | None = None, **stream_fields: Any) -> VideoInfo:
    """A constant 30000/1001 fps video of ``frames`` frames with keyframes every N frames (None: only 0)."""
    pts = [i * NTSC_TICKS for i in range(frames)]
    step = keyframe_every or frames
    keys = [i * NTSC_TICKS for i in range(0, frames, step)]
    return parse_probe(probe_json(**stream_fields), packets_for(pts, keys), source="clip.mp4")


@pytest.fixture
def make_cfr_info() -> Callable[..., VideoInfo]:
    return cfr_info
