"""The baselines we beat (handbook BENCHMARKS.md), each with exactly what sits inside its timed region.

Every baseline is built from the product's own modules (the same nets, detector, swapper, decoder
and encoder), run the slow way, so a ratio measures the way of running, not different code.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from shared.schemas import EncoderSettings
from shared.settings import Settings
from worker.models.super_res import SrModel, load_sr_model, upscale_frames
from worker.models.tiling import run_tiled

REFERENCE_TILE_PX = 256  # RealESRGANer's usual --tile
REFERENCE_TILE_PAD_PX = 10  # RealESRGANer's tile_pad
WHOLE_FRAME_TILE_PX = 1 << 16  # a tile larger than any frame: the session runs whole frames, batch 1


@dataclass(frozen=True)
class Baseline:
    name: str
    timed_region: str


BASELINES: dict[str, Baseline] = {
    "reference_eager": Baseline(
        "reference eager (Real-ESRGAN's way)",
        "one eager forward of the fp16 NCHW network on a device-resident (1,3,H,W) frame in [0,1], batch 1, "
        "whole frame, then a device synchronise; no upload, no uint8 conversion, no download "
        "(compute only, as the 1.25 / 34.8 fps figures in GPU.md)",
    ),
    "reference_tiled": Baseline(
        "reference eager, 256 px tiles one at a time (RealESRGANer --tile 256)",
        "the same eager fp16 NCHW network over 256 px tiles with 10 px of context, one tile per call, "
        "blended into the output frame on the device, then a synchronise",
    ),
    "per_frame_pipeline": Baseline(
        "per-frame synchronous pipeline (FaceFusion / Deep-Live-Cam style)",
        "from opening the source to the encoder's flush: for each frame in turn, in one thread: decode one "
        "frame (PyAV, RGB), detect + smooth + swap it (FaceEngine, detect batch 1), super-resolve it with "
        "the eager fp16 NCHW net (whole frame, batch 1, upload and download included), encode it "
        "(same libx264 settings as ours); model loading happens before the clock starts",
    ),
    "unbudgeted": Baseline(
        "unbudgeted pipeline",
        "our pipelined render_chunk with the session's tile plan pinned to whole frames at batch 1 "
        "(no planning from the memory budget); timed from the call to its return, models already loaded",
    ),
}


def reference_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA, as Real-ESRGAN runs (``half=True``); fp32 on the CPU."""
    return torch.float16 if device.type == "cuda" else torch.float32


def load_reference_sr(name: str, store: Path, device: torch.device) -> SrModel:
    """The shipped SR net, eager, NCHW weights, in the reference dtype, run whole as Real-ESRGAN
    does (our RRDBNet's row-banded upsampling tail is one of the levers, so it is off here)."""
    return as_reference(load_sr_model(name, store, device=device, dtype=reference_dtype(device)))


def as_reference(model: SrModel) -> SrModel:
    """``model`` run as Real-ESRGAN runs it: RRDBNet's upsampling tail whole, not in row bands."""
    if hasattr(model.net, "upsample_band_rows"):
        model.net.upsample_band_rows = None
    return model


def run_reference_eager(model: SrModel, x: Tensor) -> Tensor:
    """The reference forward: ``net(x)`` on a device-resident NCHW frame (no clamp, no copies)."""
    with torch.inference_mode():
        return model.net(x)


def run_reference_tiled(model: SrModel, x: Tensor, *, tile_px: int = REFERENCE_TILE_PX) -> Tensor:
    """RealESRGANer's tiled mode: one tile per forward, ``REFERENCE_TILE_PAD_PX`` of context."""
    with torch.inference_mode():
        return run_tiled(
            model.net,
            x,
            scale=model.scale,
            core_h=tile_px,
            core_w=tile_px,
            pad_px=REFERENCE_TILE_PAD_PX,
            batch=1,
        )


@dataclass
class PerFrameResult:
    """What the per-frame baseline measured: frames, wall and CPU seconds, seconds per stage."""

    frames: int
    wall_s: float
    cpu_s: float
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def fps(self) -> float:
        return self.frames / self.wall_s if self.wall_s > 0 else 0.0


@contextmanager
def _stage(seconds: dict[str, float], name: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started


def run_per_frame_pipeline(
    *,
    source: Path,
    frames: int,
    first_pts: int,
    face_image: np.ndarray,
    store: Path,
    device: torch.device,
    sr_model: SrModel | None,
    upscale: int,
    encoder: EncoderSettings,
    output: Path,
    swapper: str = "classic",
    start_frame: int = 0,
) -> PerFrameResult:
    """Decode → detect/swap → SR → encode, one frame at a time, synchronously, in this thread.

    ``sr_model`` is the reference eager model (``load_reference_sr``); None when ``upscale`` is 1.
    Frames ``start_frame`` .. ``start_frame + frames - 1``; ``first_pts`` is the pts of a keyframe at
    ``start_frame``.
    """
    from worker.frames import decode_range, open_encoder
    from worker.models.engine import FaceEngine

    engine = FaceEngine(
        swapper_name=swapper, source_image=face_image, store=store, device=device, detect_batch=1
    )
    seconds: dict[str, float] = {}
    done = 0
    started, cpu_started = time.perf_counter(), time.process_time()
    batches = decode_range(
        str(source),
        start_frame=start_frame,
        end_frame=start_frame + frames,
        warmup_frames=0,
        seek_pts=first_pts,
        seek_frame=start_frame,
        batch_frames=1,
    )
    with open_encoder(output, encoder) as writer:
        while True:
            with _stage(seconds, "decode"):
                batch = next(batches, None)
            if batch is None:
                break
            with _stage(seconds, "faces"):
                out = engine.process(batch.frames, batch.output_mask)
            if sr_model is not None and upscale > 1:
                with _stage(seconds, "super_res"):
                    out = upscale_frames(sr_model, out, upscale=upscale)
            with _stage(seconds, "encode"):
                writer.write(out, batch.pts)
            done += len(batch)
        with _stage(seconds, "encode"):
            writer.close()
    wall_s, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    return PerFrameResult(frames=done, wall_s=wall_s, cpu_s=cpu_s, stage_seconds=seconds)


def unbudgeted_session(settings: Settings) -> object:
    """A render session whose SR step ignores the budget: whole frames, batch 1."""
    from worker.session import RenderSession

    session = RenderSession(settings)
    session.tile_override_px = WHOLE_FRAME_TILE_PX
    return session
