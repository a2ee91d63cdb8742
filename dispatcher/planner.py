"""Pure planning: which frames each chunk renders, where it seeks, and the job's fixed encoder settings.

Everything here is a function of the probed ``VideoInfo``, the job options and the settings — no
ffmpeg, no I/O — so a plan can be recomputed and unit-tested exactly. Chunks are frame ranges in
presentation order; any frame may start one (every chunk is re-encoded), and each seeks to the
keyframe at or before its first warm-up frame.
"""

from __future__ import annotations

import bisect
import math
from fractions import Fraction

from pydantic import BaseModel, ConfigDict

from shared.errors import BadInputError, HdrRefusedError, InvalidVideoError, LimitExceededError
from shared.media import VideoInfo
from shared.schemas import ChunkSpec, EncoderSettings, JobOptions
from shared.settings import Settings

# Rough render throughput used only to size chunks when none is given: frames per second of
# face-swap work at 1080p on one GPU client, scaled by pixel count and by the SR factor squared.
REFERENCE_RENDER_FPS = 12.0
REFERENCE_PIXELS = 1920 * 1080
MIN_CHUNK_FRAMES = 24

# H.264 Annex A, table A-1: level -> (MaxMBPS macroblocks/s, MaxFS macroblocks/frame).
H264_LEVELS: tuple[tuple[str, int, int], ...] = (
    ("3", 40_500, 1_620),
    ("3.1", 108_000, 3_600),
    ("3.2", 216_000, 5_120),
    ("4", 245_760, 8_192),
    ("4.2", 522_240, 8_704),
    ("5", 589_824, 22_080),
    ("5.1", 983_040, 36_864),
    ("5.2", 2_073_600, 36_864),
    ("6", 4_177_920, 139_264),
    ("6.1", 8_355_840, 139_264),
    ("6.2", 16_711_680, 139_264),
)
# H.265 Annex A, table A.8: level -> (MaxLumaSr samples/s, MaxLumaPs samples/picture).
H265_LEVELS: tuple[tuple[str, int, int], ...] = (
    ("3", 16_588_800, 552_960),
    ("3.1", 33_177_600, 983_040),
    ("4", 66_846_720, 2_228_224),
    ("4.1", 133_693_440, 2_228_224),
    ("5", 267_386_880, 8_912_896),
    ("5.1", 534_773_760, 8_912_896),
    ("5.2", 1_069_547_520, 8_912_896),
    ("6", 1_069_547_520, 35_651_584),
    ("6.1", 2_139_095_040, 35_651_584),
    ("6.2", 4_278_190_080, 35_651_584),
)
CODECS = {"h264": "libx264", "h265": "libx265"}


class ChunkRange(BaseModel):
    """Frames ``[start_frame, end_frame)`` of the source, plus where to seek and how much to warm up."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int
    start_frame: int
    end_frame: int
    warmup_frames: int
    seek_pts: int
    seek_frame: int

    @property
    def frame_count(self) -> int:
        return self.end_frame - self.start_frame


def plan_chunks(
    info: VideoInfo,
    *,
    chunk_frames: int,
    warmup_frames: int,
    start_frame: int = 0,
    end_frame: int | None = None,
) -> list[ChunkRange]:
    """Split ``[start_frame, end_frame)`` into chunks of ``chunk_frames`` (in index order).

    A remainder shorter than half a chunk joins the last chunk instead of becoming a tiny one.
    Warm-up frames precede a chunk's start but never frame 0 of the source.
    """
    end = info.frame_count if end_frame is None else end_frame
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be at least 1, got {chunk_frames}")
    if warmup_frames < 0:
        raise ValueError(f"warmup_frames must not be negative, got {warmup_frames}")
    if not 0 <= start_frame < end <= info.frame_count:
        raise BadInputError(
            f"{info.source}: frame range [{start_frame}, {end}) is outside the video's "
            f"{info.frame_count} frames"
        )
    total = end - start_frame
    count = max(1, total // chunk_frames)
    if total - count * chunk_frames >= chunk_frames / 2:
        count += 1
    ranges: list[ChunkRange] = []
    for index in range(count):
        first = start_frame + index * chunk_frames
        last = end if index == count - 1 else first + chunk_frames
        ranges.append(_chunk(info, index, first, last, warmup_frames))
    return ranges


def _chunk(info: VideoInfo, index: int, first: int, last: int, warmup_frames: int) -> ChunkRange:
    warmup = min(warmup_frames, first)
    needed = first - warmup
    position = bisect.bisect_right(info.keyframe_indices, needed) - 1
    seek_frame = info.keyframe_indices[position] if position >= 0 else 0
    return ChunkRange(
        index=index,
        start_frame=first,
        end_frame=last,
        warmup_frames=warmup,
        seek_pts=info.frame_pts[seek_frame],
        seek_frame=seek_frame,
    )


def chunk_spec(
    job_id: str,
    chunk: ChunkRange,
    *,
    source_uri: str,
    face_uri: str,
    output_uri: str,
    options: JobOptions,
    encoder: EncoderSettings,
) -> ChunkSpec:
    """The wire description of one planned chunk: its frame range and seek point, plus the job's
    inputs, options and fixed encoder settings."""
    return ChunkSpec(
        job_id=job_id,
        index=chunk.index,
        start_frame=chunk.start_frame,
        end_frame=chunk.end_frame,
        warmup_frames=chunk.warmup_frames,
        seek_pts=chunk.seek_pts,
        seek_frame=chunk.seek_frame,
        source_uri=source_uri,
        face_uri=face_uri,
        output_uri=output_uri,
        options=options,
        encoder=encoder,
    )


def chunk_frames_for(info: VideoInfo, options: JobOptions, settings: Settings) -> int:
    """Frames per chunk: ``--chunk-frames``, else the configured size, else ~``target_chunk_s`` of work."""
    if options.chunk_frames:
        return options.chunk_frames
    if settings.chunk_frames > 0:
        return settings.chunk_frames
    pixels = max(1, info.width * info.height)
    render_fps = REFERENCE_RENDER_FPS * REFERENCE_PIXELS / pixels / (options.upscale**2)
    return max(MIN_CHUNK_FRAMES, round(settings.target_chunk_s * render_fps))


def output_size(info: VideoInfo, options: JobOptions) -> tuple[int, int]:
    """Upright size × upscale, rounded down to even (4:2:0 needs even sizes; the encoder crops 1 px)."""
    width = info.width * options.upscale
    height = info.height * options.upscale
    return width - width % 2, height - height % 2


def codec_level(codec: str, width: int, height: int, fps: Fraction) -> str:
    """The lowest level of ``codec`` ('h264'/'h265') that allows this frame size and rate."""
    if codec == "h264":
        mbs = math.ceil(width / 16) * math.ceil(height / 16)
        for level, max_mbps, max_fs in H264_LEVELS:
            max_side = math.isqrt(8 * max_fs) * 16
            if mbs <= max_fs and mbs * fps <= max_mbps and max(width, height) <= max_side:
                return level
        raise LimitExceededError(
            f"output {width}x{height} at {float(fps):.3g} fps is {mbs} macroblocks per frame; H.264 "
            f"allows at most {H264_LEVELS[-1][2]} (level 6.2, e.g. 8192x4320 at up to 120 fps, "
            f"4096x2304 at level 5.1); use a smaller --upscale"
        )
    samples = width * height
    for level, max_sr, max_ps in H265_LEVELS:
        max_side = math.isqrt(8 * max_ps)
        if samples <= max_ps and samples * fps <= max_sr and max(width, height) <= max_side:
            return level
    raise LimitExceededError(
        f"output {width}x{height} at {float(fps):.3g} fps is {samples} luma samples per picture; H.265 "
        f"allows at most {H265_LEVELS[-1][2]} (level 6.2, e.g. 8192x4320); use a smaller --upscale"
    )


def check_limits(info: VideoInfo, options: JobOptions, settings: Settings) -> None:
    """Refuse, before any GPU work, what the farm will not render."""
    name = info.source
    if info.hdr and options.hdr == "refuse":
        raise HdrRefusedError(
            f"{name}: HDR video (transfer {info.color_transfer}); the models are SDR. Rerun with "
            "--hdr tonemap to tone-map it to SDR BT.709"
        )
    if info.rotation % 90:
        raise InvalidVideoError(f"{name}: rotation {info.rotation} degrees is not a multiple of 90")
    if info.duration_s > settings.max_duration_s:
        raise LimitExceededError(
            f"{name}: {info.duration_s:.0f} s long; the limit is {settings.max_duration_s:.0f} s "
            "(FACEFARM_MAX_DURATION_S); use --start/--end to render a part"
        )
    if info.frame_count > settings.max_frames:
        raise LimitExceededError(
            f"{name}: {info.frame_count} frames; the limit is {settings.max_frames} (FACEFARM_MAX_FRAMES)"
        )
    if info.width > settings.max_width or info.height > settings.max_height:
        raise LimitExceededError(
            f"{name}: {info.width}x{info.height} exceeds the input limit "
            f"{settings.max_width}x{settings.max_height} (FACEFARM_MAX_WIDTH/HEIGHT)"
        )
    width, height = output_size(info, options)
    if width < 2 or height < 2:
        raise InvalidVideoError(f"{name}: {info.width}x{info.height} is too small to encode")
    if width * height > settings.max_output_pixels:
        raise LimitExceededError(
            f"{name}: output {width}x{height} (x{options.upscale}) exceeds {settings.max_output_pixels} "
            "pixels (FACEFARM_MAX_OUTPUT_PIXELS); use a smaller --upscale"
        )
    codec_level(options.codec, width, height, info.avg_fps)


def encoder_settings_for(info: VideoInfo, options: JobOptions, settings: Settings) -> EncoderSettings:
    """The one set of encoder parameters every chunk of this job uses, so chunks stream-copy together."""
    width, height = output_size(info, options)
    tonemap = info.hdr and options.hdr == "tonemap"
    return EncoderSettings(
        codec=CODECS[options.codec],  # type: ignore[arg-type]
        crf=options.crf,
        preset=options.preset,
        pix_fmt="yuv420p",
        width=width,
        height=height,
        time_base_num=info.time_base_num,
        time_base_den=info.time_base_den,
        fps_num=info.avg_fps_num,
        fps_den=info.avg_fps_den,
        threads=settings.encoder_threads,
        sliced_threads=settings.encoder_sliced_threads and CODECS[options.codec] == "libx264",
        profile=_profile(options),
        level=codec_level(options.codec, width, height, info.avg_fps),
        color_range=info.color_range or "tv",
        color_space="bt709" if tonemap else info.color_space,
        color_primaries="bt709" if tonemap else info.color_primaries,
        color_trc="bt709" if tonemap else info.color_transfer,
    )


def _profile(options: JobOptions) -> str:
    """x264 encodes lossless (CRF 0) only in its High 4:4:4 Predictive profile."""
    if options.codec == "h264":
        return "high444" if options.crf == 0 else "high"
    return "main"


def planning_notes(info: VideoInfo, options: JobOptions) -> list[str]:
    """One-line facts about conversions the job makes, for the job record."""
    notes: list[str] = []
    if info.bit_depth > 8:
        notes.append(f"{info.bit_depth}-bit {info.pix_fmt} source is encoded as 8-bit yuv420p")
    if info.hdr and options.hdr == "tonemap":
        notes.append(f"HDR ({info.color_transfer}) is tone-mapped to SDR BT.709")
    if info.rotation:
        notes.append(
            f"rotation {info.rotation} degrees is applied to the pixels; the output has no rotation tag"
        )
    if info.vfr:
        notes.append("variable frame rate: every frame keeps its source timestamp")
    if info.width % 2 or info.height % 2:
        notes.append(f"odd size {info.width}x{info.height}: the last row/column is cropped for 4:2:0")
    return notes


def frame_range_for(info: VideoInfo, start_s: float | None, end_s: float | None) -> tuple[int, int]:
    """``--start/--end`` (seconds from the first frame) as a frame range ``[start, end)``."""
    duration = float(info.seconds(info.end_pts))
    start_t = Fraction(start_s or 0.0)
    start = bisect.bisect_left(info.frame_pts, info.frame_pts[0] + math.ceil(start_t / info.time_base))
    if end_s is None:
        end = info.frame_count
    else:
        end = bisect.bisect_left(
            info.frame_pts, info.frame_pts[0] + math.ceil(Fraction(end_s) / info.time_base)
        )
    if start_s is not None and start_s < 0 or end_s is not None and end_s <= 0:
        raise BadInputError(f"--start/--end must be positive seconds, got {start_s}/{end_s}")
    if start >= info.frame_count:
        raise BadInputError(f"--start {start_s} is beyond the end of {info.source} ({duration:.3f} s)")
    if end <= start:
        raise BadInputError(f"--end {end_s} must be after --start {start_s} (at least one frame)")
    return start, end
