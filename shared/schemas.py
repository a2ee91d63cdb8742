"""Versioned wire models: job options, encoder settings, chunk specs and results.

Messages refer to data by URI and id, never carry frames. Every model has ``schema_version`` so a
newer dispatcher can refuse or upgrade an older worker's payload.
"""

from __future__ import annotations

from enum import StrEnum
from fractions import Fraction
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1

SwapperName = Literal["mesh", "classic", "inswapper"]
SrModelName = Literal["realesrgan-x4plus", "realesrgan-x4plus-anime", "realesr-animevideov3"]
DEFAULT_SWAPPER: SwapperName = "mesh"


class Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: int = SCHEMA_VERSION


class JobStatus(StrEnum):
    QUEUED = "QUEUED"
    PLANNING = "PLANNING"
    RENDERING = "RENDERING"
    MERGING = "MERGING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


class ChunkStatus(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMMITTED = "COMMITTED"
    FAILED = "FAILED"


class JobOptions(Wire):
    """What the user asked for; validated at submit."""

    swapper: SwapperName = DEFAULT_SWAPPER
    face_selector: Literal["all", "largest", "reference"] = "all"
    reference_uri: str | None = None
    reference_distance: float = 1.0
    upscale: Literal[1, 2, 4] = 1
    sr_model: SrModelName = "realesrgan-x4plus"
    face_enhancer: Literal["none", "gfpgan"] = "none"
    start_s: float | None = None
    end_s: float | None = None
    codec: Literal["h264", "h265"] = "h264"
    crf: int = Field(default=18, ge=0, le=51)
    preset: str = "veryfast"
    chunk_frames: int | None = Field(default=None, ge=1)
    hdr: Literal["refuse", "tonemap"] = "refuse"
    watermark: bool = False
    gpus: Literal["auto", "none"] = "auto"


class EncoderSettings(Wire):
    """Fixed per job by a pure function of (source, options), so every chunk can be stream-copied."""

    codec: Literal["libx264", "libx265"] = "libx264"
    crf: int = 18
    preset: str = "veryfast"
    pix_fmt: str = "yuv420p"
    width: int
    height: int
    time_base_num: int
    time_base_den: int
    fps_num: int
    fps_den: int
    threads: int = 2
    # libx264 threads on slices of each frame, not on whole frames (x264's low-latency mode): less held
    # at the chunk's end, but on 16 cores at 4K it encoded 29% slower with 12% larger files at the same
    # PSNR (bench/RESULTS.md, seventh session), so jobs leave it off unless settings ask
    sliced_threads: bool = False
    profile: str | None = None
    level: str | None = None
    color_range: str | None = None  # "tv" | "pc"
    color_space: str | None = None  # e.g. "bt709"
    color_primaries: str | None = None
    color_trc: str | None = None

    @property
    def time_base(self) -> Fraction:
        return Fraction(self.time_base_num, self.time_base_den)

    @property
    def fps(self) -> Fraction:
        return Fraction(self.fps_num, self.fps_den)


class ChunkSpec(Wire):
    """One render task: a frame range of the source, where to seek, where to write."""

    job_id: str
    index: int
    start_frame: int  # first output frame (presentation order, 0-based)
    end_frame: int  # exclusive
    warmup_frames: int = 0  # decoded before start_frame for tracking, never output
    seek_pts: int  # pts (stream time base) of the keyframe at or before start_frame - warmup
    seek_frame: int  # presentation index of that keyframe
    source_uri: str
    face_uri: str
    output_uri: str
    options: JobOptions
    encoder: EncoderSettings

    @property
    def frame_count(self) -> int:
        return self.end_frame - self.start_frame


class RenderTask(Wire):
    """The Celery payload of ``render_chunk``: which chunk, which attempt, which delivery."""

    job_id: str
    index: int


class ChunkStats(Wire):
    """What a render reports back: counts and per-stage seconds."""

    frames: int = 0
    faces: int = 0
    faces_by_path: dict[str, int] = Field(default_factory=dict)  # e.g. {"mesh": 10, "classic": 2}
    stage_seconds: dict[str, float] = Field(default_factory=dict)
    device: str = "cpu"


class JobView(Wire):
    """What clients see of a job: status, progress and the failure reason if any."""

    job_id: str
    owner: str
    status: JobStatus
    error: str | None = None
    error_kind: str | None = None
    frames_done: int = 0
    frames_total: int = 0
    chunks_total: int = 0
    chunks_done: int = 0
    fps: float = 0.0
    eta_s: float | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    output_uri: str | None = None
    options: JobOptions = Field(default_factory=JobOptions)
    stats: dict[str, float | int | str] = Field(default_factory=dict)
