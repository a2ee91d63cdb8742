"""One device call, many measurements: SR nets, the render pipeline, a swapper of inswapper's size.

    python bench/device_bench.py --out $OUT --store models-store [--parts sr,anime,pipeline,...]
    python bench/device_bench.py --smoke --out /tmp/bench-smoke --store models-store   # CPU, tiny

Each part runs in its own try/except (a failure is recorded, the others still run), each variant
inside a part too; ``bench.json`` is rewritten after every part so a killed run keeps what it had.
Timing follows BENCHMARKS.md: warm-up, synchronise before reading the clock, median of several
runs, real frames, and every fast variant checked against the eager fp32 output (PSNR).
A short table is printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import gc
import hashlib
import io
import json
import math
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import baselines  # noqa: E402
from bench.make_clip import SOURCE_FACE, build_canvas, frame_at, load_source_images  # noqa: E402
from bench.sampling import sampled, summarise  # noqa: E402
from bench.swapper_like import count_parameters, create_swapper_like  # noqa: E402
from worker.models.accelerate import (  # noqa: E402
    SpeedOptions,
    accelerate_module,
    accelerate_sr,
    configure_compile_cache,
    enable_fast_kernels,
)
from worker.models.super_res import SrModel, load_sr_model, upscale_frames  # noqa: E402
from worker.models.tiling import run_tiled  # noqa: E402

PARTS = ("sr", "anime", "swapper", "landmarks", "pipeline", "cpu", "conv_sweep", "area_resize",
         "x264_threads")  # fmt: skip
# Measured ceilings of one H100 (handbook GPU.md): bf16 dense matmul and device copy bandwidth.
PEAK_FLOP_S = 790e12
PEAK_BYTES_S = 3.0e12
COMPILE_RESERVE_S = 120.0
MAX_AUTOTUNE = "max-autotune-no-cudagraphs"  # graphs are their own lever (SpeedOptions.cuda_graphs)  # skip a compiled variant when less than this is left
SR_MODEL = "realesrgan-x4plus"
ANIME_MODEL = "realesr-animevideov3"


# ---- context, timing, numbers ------------------------------------------------------------------
@dataclass
class BenchContext:
    device: torch.device
    store: Path
    work: Path
    images: dict[str, np.ndarray]
    smoke: bool
    compile: bool
    frames: int
    deadline: float
    encoder_threads: int
    pipeline_cases: tuple[str, ...] = ()  # label substrings to keep (empty: every case)
    variants: tuple[str, ...] = ()  # sr/anime variant label substrings to keep (name the baseline too)
    rounds: int = 1  # the pipeline cases run this many times, interleaved

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    @property
    def half(self) -> torch.dtype:
        """fp16 on CUDA; fp32 on the CPU, where fp16 convolutions are slow or missing."""
        return torch.float16 if self.device.type == "cuda" else torch.float32

    @property
    def bf16(self) -> torch.dtype:
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def time_calls(fn: Callable[[], Any], device: torch.device, *, warmup: int, iters: int) -> dict[str, Any]:
    """Median wall seconds of ``fn`` after ``warmup`` calls, synchronising around each timed call."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        synchronize(device)
        times = []
        for _ in range(iters):
            started = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - started)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "runs": len(times),
    }


def psnr_db(out: Tensor, ref: Tensor) -> float:
    """PSNR of ``out`` against ``ref`` (both [0,1] images, compared in fp64 after clamping)."""
    a = out.detach().double().clamp(0, 1)
    b = ref.detach().to(a.device).double().clamp(0, 1)
    mse = float(torch.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


def conv_flop_per_input_px(net: nn.Module, device: torch.device, dtype: torch.dtype, px: int = 32) -> float:
    """FLOPs per input pixel of a fully convolutional net, counted from its convs on a small input."""
    total = 0.0

    def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
        nonlocal total
        assert isinstance(module, nn.Conv2d)
        k = module.kernel_size[0] * module.kernel_size[1]
        per_out = 2.0 * module.in_channels // module.groups * k
        total += per_out * output.numel()

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.inference_mode():
            net(torch.rand(1, 3, px, px, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
    return total / (px * px)


def to_input(frames: np.ndarray, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(N,H,W,3) uint8 -> NCHW-contiguous [0,1] tensor on ``device`` (the reference's layout)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 3, 1, 2)
    return x.to(dtype).div_(255.0).contiguous()


def test_frames(ctx: BenchContext, count: int, width: int, height: int) -> np.ndarray:
    canvas = build_canvas(ctx.images, width, height)
    return np.stack([frame_at(canvas, 7 * i, width, height) for i in range(count)])


def run_variant(
    ctx: BenchContext,
    rows: list[dict[str, Any]],
    label: str,
    build: Callable[[], Callable[[], Tensor]],
    *,
    items: int,
    ref: Tensor | None,
    flop_per_item: float | None,
    warmup: int,
    iters: int,
    compiled: bool = False,
    reference: bool = False,
    note: str = "",
    compare: Callable[[Tensor], Tensor] = lambda out: out[:1],
) -> dict[str, Any] | None:
    """Build, run once (compile/autotune happens here, timed separately), check, then time.

    ``reference`` rows run with cuDNN autotuning off (Real-ESRGAN's default); ours with it on.
    """
    if compiled and not ctx.compile:
        return None
    if ctx.variants and not any(part in label for part in ctx.variants):
        return None
    if compiled and ctx.left_s() < COMPILE_RESERVE_S:
        rows.append({"variant": label, "skipped": f"only {ctx.left_s():.0f} s left"})
        return None
    if ctx.left_s() < 10:
        rows.append({"variant": label, "skipped": "out of time"})
        return None
    row: dict[str, Any] = {"variant": label, "cudnn_benchmark": not reference}
    if note:
        row["note"] = note
    try:
        with cudnn_benchmark(not reference):
            _measure(ctx, row, build, items=items, ref=ref, flop_per_item=flop_per_item, warmup=warmup,
                     iters=iters, compare=compare)  # fmt: skip
    except Exception as exc:  # recorded; the next variant still runs
        row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        row["traceback"] = traceback.format_exc()[-4000:]
    finally:
        free_memory(ctx.device)
    rows.append(row)
    return row


def _measure(
    ctx: BenchContext,
    row: dict[str, Any],
    build: Callable[[], Callable[[], Tensor]],
    *,
    items: int,
    ref: Tensor | None,
    flop_per_item: float | None,
    warmup: int,
    iters: int,
    compare: Callable[[Tensor], Tensor],
) -> None:
    free_memory(ctx.device)
    call = build()
    started = time.perf_counter()
    with torch.inference_mode():
        out = call()
    synchronize(ctx.device)
    row["first_call_s"] = round(time.perf_counter() - started, 3)
    if ref is not None:
        row["psnr_db"] = round(psnr_db(compare(out).float(), ref), 2)
    del out
    if iters > 0:
        stats = time_calls(call, ctx.device, warmup=max(0, warmup - 1), iters=iters)
    else:  # smoke runs: the first call is the only one
        stats = {
            "median_s": row["first_call_s"],
            "min_s": row["first_call_s"],
            "max_s": row["first_call_s"],
            "runs": 1,
        }
    row.update({k: round(v, 6) if isinstance(v, float) else v for k, v in stats.items()})
    row["items_per_call"] = items
    row["fps"] = round(items / stats["median_s"], 3)
    row["peak_gib"] = peak_gib(ctx.device)
    if flop_per_item:
        row["tflop_s"] = round(flop_per_item * items / stats["median_s"] / 1e12, 1)
        row["of_peak"] = round(flop_per_item * items / stats["median_s"] / PEAK_FLOP_S, 4)


def with_ratio(rows: list[dict[str, Any]], baseline_label: str) -> None:
    """Add ``x_baseline`` (fps over the baseline's fps) to every timed row."""
    base = next((r for r in rows if r.get("variant") == baseline_label and r.get("fps")), None)
    if base is None:
        return
    for r in rows:
        if r.get("fps"):
            r["x_baseline"] = round(r["fps"] / base["fps"], 2)


def best_row(rows: list[dict[str, Any]], *, min_psnr_db: float = 40.0) -> dict[str, Any] | None:
    ok = [r for r in rows if r.get("fps") and r.get("psnr_db", min_psnr_db) >= min_psnr_db]
    return max(ok, key=lambda r: r["fps"]) if ok else None


@contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    """cuDNN autotuning on or off for one variant (the references run with Real-ESRGAN's default, off)."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


@contextmanager
def no_tf32() -> Iterator[None]:
    """True fp32 for references (TF32 would make the reference itself a ~1e-3 approximation)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def fp32_reference(ctx: BenchContext, name: str, x32: Tensor) -> Tensor:
    model = baselines.as_reference(load_sr_model(name, ctx.store, device=ctx.device, dtype=torch.float32))
    with no_tf32(), torch.inference_mode():
        out = model.net(x32).clamp_(0, 1)
    synchronize(ctx.device)
    del model
    return out


# ---- part 1: realesrgan-x4plus ------------------------------------------------------------------
def part_sr(ctx: BenchContext) -> dict[str, Any]:
    """x4plus 1920x1080 -> 7680x4320: reference eager fp16 vs our variants (fps, memory, PSNR)."""
    width, height = (24, 16) if ctx.smoke else (1920, 1080)
    warmup, iters = (0, 0) if ctx.smoke else (1, 3)
    frame = test_frames(ctx, 1, width, height)
    probe = load_sr_model(SR_MODEL, ctx.store, device=ctx.device, dtype=torch.float32)
    flop = conv_flop_per_input_px(probe.net, ctx.device, torch.float32, px=8) * width * height
    del probe
    x32 = to_input(frame, ctx.device, torch.float32)
    result: dict[str, Any] = {
        "model": SR_MODEL,
        "input": f"{width}x{height}",
        "output": f"{width * 4}x{height * 4}",
        "tflop_per_frame": round(flop / 1e12, 3),
        "floor_s_per_frame": round(flop / PEAK_FLOP_S, 4),
        "floor_fps": round(PEAK_FLOP_S / flop, 2),
    }
    try:
        ref: Tensor | None = fp32_reference(ctx, SR_MODEL, x32)
        result["reference"] = "eager fp32 (TF32 off), whole frame"
    except torch.cuda.OutOfMemoryError:
        free_memory(ctx.device)
        crop = (min(540, height), min(960, width))
        frame = frame[:, : crop[0], : crop[1]].copy()
        x32 = to_input(frame, ctx.device, torch.float32)
        ref = fp32_reference(ctx, SR_MODEL, x32)
        result["reference"] = (
            f"eager fp32 on a {crop[1]}x{crop[0]} crop (whole frame did not fit); all variants run on that crop"
        )
    rows: list[dict[str, Any]] = []
    result["variants"] = rows
    half, bf16 = ctx.half, ctx.bf16
    x_half, x_bf16 = x32.to(half), x32.to(bf16)
    del x32
    common: dict[str, Any] = {"ref": ref, "flop_per_item": flop, "warmup": warmup, "iters": iters, "items": 1}
    baseline = "reference eager fp16 NCHW, whole frame, batch 1"

    def reference(dtype: torch.dtype, x: Tensor, tiled: bool = False) -> Callable[[], Callable[[], Tensor]]:
        def build() -> Callable[[], Tensor]:
            model = baselines.as_reference(load_sr_model(SR_MODEL, ctx.store, device=ctx.device, dtype=dtype))
            if tiled:
                return lambda: baselines.run_reference_tiled(model, x)
            return lambda: baselines.run_reference_eager(model, x)

        return build

    def ours(
        dtype: torch.dtype, x: Tensor, options: SpeedOptions, tile: tuple[int, int] | None = None
    ) -> Callable[[], Callable[[], Tensor]]:
        def build() -> Callable[[], Tensor]:
            model = accelerate_sr(load_sr_model(SR_MODEL, ctx.store, device=ctx.device, dtype=dtype), options)
            if tile is None:
                return lambda: model.run(x)
            tile_px, batch = tile
            return lambda: run_tiled(
                model.run, x, scale=model.scale, core_h=tile_px, core_w=tile_px, pad_px=16, batch=batch
            )

        return build

    run_variant(ctx, rows, baseline, reference(half, x_half), reference=True, **common)
    run_variant(ctx, rows, "reference eager fp16, 256 px tiles one at a time (RealESRGANer)", reference(half, x_half, tiled=True),
                reference=True, note="tiles differ from a whole-frame run by design", **common)  # fmt: skip
    run_variant(ctx, rows, "reference eager fp16 NCHW + cudnn.benchmark", reference(half, x_half), **common)
    run_variant(
        ctx, rows, "eager fp16 channels_last whole frame", ours(half, x_half, SpeedOptions()), **common
    )
    run_variant(
        ctx, rows, "eager bf16 channels_last whole frame", ours(bf16, x_bf16, SpeedOptions()), **common
    )
    run_variant(ctx, rows, "eager fp16 channels_last, 512 px tiles batch 4", ours(half, x_half, SpeedOptions(), (512, 4)),
                note="bounded memory; tiles differ from a whole-frame run by design", **common)  # fmt: skip
    run_variant(ctx, rows, "compiled fp16 channels_last whole frame", ours(half, x_half, SpeedOptions(compile=True)),
                compiled=True, **common)  # fmt: skip
    run_variant(ctx, rows, "compiled bf16 channels_last whole frame", ours(bf16, x_bf16, SpeedOptions(compile=True)),
                compiled=True, **common)  # fmt: skip
    if ctx.device.type == "cuda":  # compiled Triton kernels need a GPU
        run_variant(ctx, rows, "Triton fused conv fp16 whole frame", ours(half, x_half, SpeedOptions(kernels="triton")),
                    note="worker/models/triton_conv.py: implicit-GEMM 3x3 conv, bias+activation+residual fused, "
                    "dense-block features in one buffer (no torch.cat)", **common)  # fmt: skip
        run_variant(ctx, rows, "Triton fused conv fp16 whole frame, TMA loads",
                    ours(half, x_half, SpeedOptions(kernels="triton-tma")),
                    note="the same kernel, input and weight tiles through tensor descriptors", **common)  # fmt: skip
        run_variant(ctx, rows, "Triton fused conv fp16 whole frame + CUDA graph",
                    ours(half, x_half, SpeedOptions(kernels="triton", cuda_graphs=True)),
                    note="one graph replays the ~350 launches", **common)  # fmt: skip
    run_variant(ctx, rows, "compiled max-autotune fp16 channels_last whole frame",
                ours(half, x_half, SpeedOptions(compile=True, compile_mode=MAX_AUTOTUNE)), compiled=True,
                note="Inductor's Triton conv templates with fused epilogues vs cuDNN, autotuned", **common)  # fmt: skip

    # What ships: uint8 frames in and out, upload/download included.
    def product(options: SpeedOptions) -> Callable[[], Callable[[], Tensor]]:
        def build() -> Callable[[], Tensor]:
            model = accelerate_sr(load_sr_model(SR_MODEL, ctx.store, device=ctx.device, dtype=half), options)
            return lambda: torch.from_numpy(upscale_frames(model, frame, upscale=4))

        return build

    fastest = best_row([r for r in rows if "tiles" not in r["variant"]])
    compiled_best = bool(fastest and fastest["variant"].startswith("compiled"))
    run_variant(ctx, rows, f"upscale_frames uint8 in/out, channels_last{' + compiled' if compiled_best else ''}",
                product(SpeedOptions(compile=compiled_best)), note="includes upload, download and uint8 rounding",
                compare=uint8_to_unit, **common)  # fmt: skip
    run_variant(ctx, rows, "session super_resolver (what ships today)", _session_sr(ctx, SR_MODEL, frame, 4),
                note="RenderSession: budget tile plan, model cache; includes transfers", compare=uint8_to_unit,
                **common)  # fmt: skip
    with_ratio(rows, baseline)
    best = best_row(rows)
    result["best"] = best and {
        "variant": best["variant"],
        "fps": best["fps"],
        "x_baseline": best.get("x_baseline"),
    }
    return result


def _session_sr(
    ctx: BenchContext, name: str, frames: np.ndarray, upscale: int
) -> Callable[[], Callable[[], Tensor]]:
    def build() -> Callable[[], Tensor]:
        from shared.schemas import JobOptions
        from shared.settings import Settings
        from worker.session import RenderSession

        settings = Settings(
            device=str(ctx.device), model_store=str(ctx.store), model_cache_dir=ctx.work / "model-cache"
        )
        step = RenderSession(settings).super_resolver(JobOptions(upscale=upscale, sr_model=name))  # type: ignore[arg-type]
        return lambda: torch.from_numpy(step(frames))

    return build


def uint8_to_unit(out: Tensor) -> Tensor:
    """Frame 0 of an (N,H,W,3) uint8 result as (1,3,H,W) in [0,1], for the PSNR (outside the clock)."""
    return out[:1].permute(0, 3, 1, 2).float() / 255


# ---- part 2: realesr-animevideov3 -----------------------------------------------------------------
def part_anime(ctx: BenchContext) -> dict[str, Any]:
    """animevideov3 1080p x4: reference eager fp16 batch 1 vs batching, channels_last, compile, graphs."""
    width, height = (32, 24) if ctx.smoke else (1920, 1080)
    warmup, iters = (0, 0) if ctx.smoke else (3, 10)
    batches = (1, 2) if ctx.smoke else (1, 4, 8)
    frames = test_frames(ctx, max(batches), width, height)
    probe = load_sr_model(ANIME_MODEL, ctx.store, device=ctx.device, dtype=torch.float32)
    flop = conv_flop_per_input_px(probe.net, ctx.device, torch.float32) * width * height
    del probe
    x32 = to_input(frames, ctx.device, torch.float32)
    ref = fp32_reference(ctx, ANIME_MODEL, x32[:1])
    half, bf16 = ctx.half, ctx.bf16
    inputs = {(dt, b): x32[:b].to(dt) for dt in {half, bf16} for b in batches}
    del x32
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {
        "model": ANIME_MODEL,
        "input": f"{width}x{height}",
        "tflop_per_frame": round(flop / 1e12, 4),
        "floor_fps_compute": round(PEAK_FLOP_S / flop, 1),
        "reference": "eager fp32 (TF32 off), frame 0",
        "variants": rows,
    }
    baseline = "reference eager fp16 NCHW batch 1"

    def build_for(
        dtype: torch.dtype, batch: int, options: SpeedOptions | None
    ) -> Callable[[], Callable[[], Tensor]]:
        def build() -> Callable[[], Tensor]:
            model = load_sr_model(ANIME_MODEL, ctx.store, device=ctx.device, dtype=dtype)
            x = inputs[(dtype, batch)]
            if options is None:
                return lambda: baselines.run_reference_eager(model, x)
            fast = accelerate_sr(model, options)
            return lambda: fast.run(x)

        return build

    def variant(
        label: str, dtype: torch.dtype, batch: int, options: SpeedOptions | None, compiled: bool = False,
        reference: bool = False,
    ) -> None:  # fmt: skip
        run_variant(ctx, rows, label, build_for(dtype, batch, options), items=batch, ref=ref, flop_per_item=flop,
                    warmup=warmup, iters=iters, compiled=compiled, reference=reference)  # fmt: skip

    variant(baseline, half, 1, None, reference=True)
    variant("reference eager fp16 NCHW batch 1 + cudnn.benchmark", half, 1, None)
    for b in batches:
        variant(f"eager fp16 channels_last batch {b}", half, b, SpeedOptions())
    big = batches[-1]
    mid = batches[1] if len(batches) > 2 else big
    variant(f"eager bf16 channels_last batch {mid}", bf16, mid, SpeedOptions())
    variant("eager fp16 channels_last batch 1 + CUDA graph", half, 1, SpeedOptions(cuda_graphs=True))
    variant(f"eager fp16 channels_last batch {mid} + CUDA graph", half, mid, SpeedOptions(cuda_graphs=True))
    variant(f"compiled fp16 channels_last batch {mid}", half, mid, SpeedOptions(compile=True), compiled=True)
    variant(f"compiled fp16 channels_last batch {mid} + CUDA graph", half, mid,
            SpeedOptions(compile=True, cuda_graphs=True), compiled=True)  # fmt: skip
    variant(f"compiled fp16 channels_last batch {big}", half, big, SpeedOptions(compile=True), compiled=True)
    if ctx.device.type == "cuda":  # compiled Triton kernels need a GPU (the CPU interpreter is for tests)
        for b in batches:
            variant(f"Triton fused conv fp16 batch {b}", half, b, SpeedOptions(kernels="triton"))
            variant(f"Triton fused conv fp16 batch {b}, TMA loads", half, b, SpeedOptions(kernels="triton-tma"))
        variant(f"Triton fused conv fp16 batch {mid} + CUDA graph", half, mid,
                SpeedOptions(kernels="triton", cuda_graphs=True))  # fmt: skip
    variant(f"compiled max-autotune fp16 channels_last batch {mid}", half, mid,
            SpeedOptions(compile=True, compile_mode=MAX_AUTOTUNE), compiled=True)  # fmt: skip

    # What the pipeline sees at 4K out (upscale 2): uint8 in/out, x4 then 2x2 average, transfers.
    def product(upscale: int, batch: int) -> Callable[[], Callable[[], Tensor]]:
        def build() -> Callable[[], Tensor]:
            model = accelerate_sr(
                load_sr_model(ANIME_MODEL, ctx.store, device=ctx.device, dtype=half), SpeedOptions()
            )
            return lambda: torch.from_numpy(upscale_frames(model, frames, upscale=upscale, batch=batch))

        return build

    run_variant(ctx, rows, f"upscale_frames x2 (4K out) uint8, channels_last batch {mid}", product(2, mid),
                items=len(frames), ref=None, flop_per_item=flop, warmup=warmup, iters=iters,
                note="includes upload, 2x2 downscale, download")  # fmt: skip
    run_variant(ctx, rows, "session super_resolver x2 (what ships today)", _session_sr(ctx, ANIME_MODEL, frames, 2),
                items=len(frames), ref=None, flop_per_item=flop, warmup=warmup, iters=iters)  # fmt: skip
    with_ratio(rows, baseline)
    best = best_row(rows)
    result["best"] = best and {
        "variant": best["variant"],
        "fps": best["fps"],
        "x_baseline": best.get("x_baseline"),
    }
    return result


# ---- part 4: a swapper of inswapper's size -------------------------------------------------------
def part_swapper(ctx: BenchContext) -> dict[str, Any]:
    """ms per face of a ~138 M-parameter style-modulated swapper at batch 1 vs batch >= 4."""
    base_ch = 4 if ctx.smoke else 128
    batches = (1, 2) if ctx.smoke else (1, 4, 8, 16)
    warmup, iters = (0, 0) if ctx.smoke else (5, 20)
    half = ctx.half
    probe = create_swapper_like(ctx.device, torch.float32, base_ch=base_ch)
    params = count_parameters(probe)
    crops = torch.rand(max(batches), 3, 128, 128, generator=torch.Generator().manual_seed(1)).to(ctx.device)
    with no_tf32(), torch.inference_mode():
        ref = probe(crops[:1]).float()
    del probe
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {
        "params": params,
        "dtype": str(half),
        "reference": "same net in fp32, face 0",
        "variants": rows,
    }

    def build_for(batch: int, options: SpeedOptions | None) -> Callable[[], Callable[[], Tensor]]:
        def build() -> Callable[[], Tensor]:
            net: nn.Module = create_swapper_like(ctx.device, half, base_ch=base_ch)
            if options is not None:
                net = accelerate_module(
                    net, options if ctx.device.type == "cuda" else SpeedOptions(compile=options.compile)
                )
            x = crops[:batch].to(half)
            return lambda: net(x)

        return build

    for b in batches:
        run_variant(ctx, rows, f"eager {half} NCHW batch {b}", build_for(b, None), items=b, ref=ref,
                    flop_per_item=None, warmup=warmup, iters=iters, reference=True)  # fmt: skip
    for b in batches:
        run_variant(ctx, rows, f"channels_last + CUDA graph batch {b}", build_for(b, SpeedOptions(cuda_graphs=True)),
                    items=b, ref=ref, flop_per_item=None, warmup=warmup, iters=iters)  # fmt: skip
    run_variant(ctx, rows, f"compiled channels_last + CUDA graph batch {batches[-2]}",
                build_for(batches[-2], SpeedOptions(compile=True, cuda_graphs=True)), items=batches[-2], ref=ref,
                flop_per_item=None, warmup=warmup, iters=iters, compiled=True)  # fmt: skip
    for r in rows:
        if r.get("median_s"):
            r["ms_per_face"] = round(1000 * r["median_s"] / r["items_per_call"], 3)
    result["face_stage"] = _face_stage(ctx, base_ch)
    return result


def _face_stage(ctx: BenchContext, base_ch: int) -> dict[str, Any]:
    """The swapper inside the face stage: align crops (CPU), one batched net call, paste back."""
    from worker.models.align import paste_back, square_mask, warp_face
    from worker.models.detect_mtcnn import MtcnnDetector

    width, height = (96, 96) if ctx.smoke else (1920, 1080)
    frames = test_frames(ctx, 1 if ctx.smoke else 8, width, height)
    faces = MtcnnDetector(ctx.store, ctx.device).detect(frames)
    count = sum(len(f) for f in faces)
    if count == 0:
        return {"error": "no faces detected in the test frames"}
    net = accelerate_module(
        create_swapper_like(ctx.device, ctx.half, base_ch=base_ch),
        SpeedOptions(cuda_graphs=ctx.device.type == "cuda"),
    )
    mask = square_mask(128)

    def stage() -> None:
        crops, mats, owners = [], [], []
        for i, frame_faces in enumerate(faces):
            for face in frame_faces:
                crop, m = warp_face(frames[i], face.landmarks, 128, replicate_border=False)
                crops.append(crop)
                mats.append(m)
                owners.append(i)
        x = torch.from_numpy(np.stack(crops)).to(ctx.device).permute(0, 3, 1, 2).to(ctx.half).div_(255)
        out = (net(x).float().clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        result = [f.copy() for f in frames]
        for k, owner in enumerate(owners):
            result[owner], _ = paste_back(result[owner], out[k], mask, mats[k])

    stats = time_calls(stage, ctx.device, warmup=0 if ctx.smoke else 2, iters=1 if ctx.smoke else 5)
    return {
        "frames": len(frames),
        "faces": count,
        "frame_size": f"{width}x{height}",
        "median_s": round(stats["median_s"], 5),
        "ms_per_face": round(1000 * stats["median_s"] / count, 3),
        "note": "warp_face + one batched net call (channels_last + CUDA graph) + paste_back, per batch of frames",
    }


# ---- part 5: face-mesh landmarks ---------------------------------------------------------------------
def part_landmarks(ctx: BenchContext) -> dict[str, Any]:
    """MediaPipe face-mesh net throughput (faces/s) at batch 16, fp16: eager, compiled, CUDA graph."""
    try:
        from worker.models.mesh.landmarker import INPUT_PX, benchmark_landmarks, load_landmark_net
    except ImportError as exc:
        return {"skipped": f"worker.models.mesh.landmarker is not importable ({exc})"}
    batch = 1 if ctx.smoke else 16
    iterations = 1 if ctx.smoke else 50
    dtype = "float16" if ctx.device.type == "cuda" else "float32"
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {"batch": batch, "dtype": dtype, "variants": rows}
    for compiled in (False, True):
        if compiled and (not ctx.compile or ctx.left_s() < COMPILE_RESERVE_S):
            continue
        try:
            measured = benchmark_landmarks(
                str(ctx.device), batch, dtype, store=ctx.store, iterations=iterations, compile_net=compiled)  # fmt: skip
            rows.append(
                {
                    "variant": "compiled" if compiled else "eager",
                    **measured,
                    "fps": round(float(measured["faces_per_s"]), 1),
                }
            )
        except Exception as exc:
            rows.append(
                {
                    "variant": "compiled" if compiled else "eager",
                    "error": f"{type(exc).__name__}: {exc}"[:2000],
                }
            )
    x = torch.rand(batch, 3, INPUT_PX, INPUT_PX, device=ctx.device).to(getattr(torch, dtype))

    def graphed() -> Callable[[], Tensor]:
        net = accelerate_module(
            load_landmark_net(ctx.store, ctx.device, getattr(torch, dtype)), SpeedOptions(cuda_graphs=True)
        )
        return lambda: net(x)

    row = run_variant(ctx, rows, "channels_last + CUDA graph", graphed, items=batch, ref=None, flop_per_item=None,
                      warmup=0 if ctx.smoke else 3, iters=0 if ctx.smoke else iterations)  # fmt: skip
    if row and row.get("fps"):
        row["faces_per_s"] = row["fps"]
    return result


# ---- parts 3 and 6: the render pipeline -----------------------------------------------------------------
@contextmanager
def installed_session(session: Any) -> Iterator[None]:
    """Make ``render_chunk`` use ``session`` (a bench-only way to try a session variant)."""
    import worker.session as session_module

    with session_module._session_lock:
        previous = session_module._session
        session_module._session = session
    try:
        yield
    finally:
        with session_module._session_lock:
            session_module._session = previous


def accelerated_session(settings: Any, options: SpeedOptions) -> Any:
    """A RenderSession whose SR step runs ``accelerate_sr(model, options)``: the proposed wiring."""
    from worker.session import RenderSession

    class AcceleratedSession(RenderSession):
        def __init__(self) -> None:
            super().__init__(settings)
            self._fast: dict[tuple[str, int], SrModel] = {}

        def _placed_sr(self, name: str, net: nn.Module) -> SrModel:
            key = (name, id(net))
            if key not in self._fast:
                self._fast[key] = accelerate_sr(super()._placed_sr(name, net), options)
            return self._fast[key]

    return AcceleratedSession()


@dataclass
class PipelineCase:
    label: str
    upscale: int
    swapper: str = "classic"
    mode: str = "pipelined"  # pipelined | accelerated | unbudgeted | per_frame
    settings: dict[str, Any] | None = None  # Settings fields this case overrides (e.g. batch_frames)
    # cProfile the render (Python 3.12's cProfile sees every thread, not only the face stage; adds host
    # time: a row of its own)
    profile: bool = False
    # torch.profiler over the render (CPU and CUDA): the ops with the most self CUDA / CPU time
    torch_profile: bool = False
    # py-spy over every thread of the render, from outside (bench/sampling.py): running and GIL-holding
    py_spy: bool = False
    # which chunk of the clip: frames [chunk * N, (chunk + 1) * N). Chunk 1 after chunk 0 is a warm
    # process meeting new faces (new batch shapes), as a worker's next chunk does
    chunk: int = 0
    # sixth-session changes this case undoes, for an A/B in one call (names: ``REVERTS``)
    reverts: tuple[str, ...] = ()
    # EncoderSettings fields this case overrides (e.g. sliced_threads); they change the output's bytes
    encoder: dict[str, Any] | None = None


def _host_landmark_crops() -> tuple[Any, str, Any]:
    """``MeshSwapper`` cuts its landmark crops with cv2 on the host (two rounds, two syncs)."""
    from worker.models.mesh.swapper import MeshSwapper

    def host(self: Any, frames: Any, rois: Any, _on_device: Any) -> Any:
        return self.landmarker.landmarks_refined(frames, rois)[:2]

    return MeshSwapper, "_landmarks", host


def _copying_blend() -> tuple[Any, str, Any]:
    """The blend writes into a copy of the decoded batch, then into a new result array (two copies)."""
    from worker.models.engine import FaceEngine

    original = FaceEngine.plan_swap

    def copying(self: Any, frames: Any, detections: Any, output_mask: Any, *, in_place: bool = False) -> Any:
        return original(self, frames, detections, output_mask, in_place=False)

    return FaceEngine, "plan_swap", copying


def _whole_last_batch() -> tuple[Any, str, Any]:
    """The chunk's last batch blended, upscaled and encoded whole (not in two overlapping halves)."""
    from worker.models.engine import SwapWork

    def whole(self: Any, parts: int) -> Any:
        return [self]

    return SwapWork, "split", whole


def _pooled_pyramid() -> tuple[Any, str, Any]:
    """MTCNN's pyramid by adaptive pooling of a float NCHW copy of the batch (not the integral image)."""
    import torch.nn.functional as F

    from worker.models.detect_mtcnn import MtcnnDetector

    def pooled(self: Any, raw: Tensor, integral: Tensor | None) -> Any:
        imgs = raw.permute(0, 3, 1, 2).float()
        return functools.partial(F.interpolate, imgs.contiguous() if raw.is_cuda else imgs, mode="area")

    return MtcnnDetector, "_pyramid_levels", pooled


REVERTS = {
    "host_landmark_crops": _host_landmark_crops,
    "copying_blend": _copying_blend,
    "whole_last_batch": _whole_last_batch,
    "pooled_pyramid": _pooled_pyramid,
}


@contextlib.contextmanager
def reverted(names: tuple[str, ...]) -> Iterator[None]:
    """Each named change undone (a class attribute swapped) while the block runs."""
    undo = []
    try:
        for name in names:
            owner, attr, replacement = REVERTS[name]()
            undo.append((owner, attr, getattr(owner, attr)))
            setattr(owner, attr, replacement)
        yield
    finally:
        for owner, attr, original in reversed(undo):
            setattr(owner, attr, original)


def profile_table(profiler: cProfile.Profile, top: int = 30) -> list[str]:
    """The ``top`` functions by own time (blocking device syncs show up as ``cpu``/``item``/...)."""
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return [line for line in text.getvalue().splitlines() if line.strip()][-top - 1 :]


def torch_profiler(device: torch.device) -> Any:
    """A torch.profiler context over CPU ops (and CUDA kernels on CUDA), every thread."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=activities)


def torch_profile_tables(trace: Any, top: int = 25) -> dict[str, list[str]]:
    """The ``top`` ops by self device time and by self CPU time, as table lines."""
    averages = trace.key_averages()
    tables = {}
    for key in ("self_cuda_time_total", "self_cpu_time_total"):
        try:
            text = averages.table(sort_by=key, row_limit=top, max_name_column_width=60)
        except (AttributeError, KeyError, RuntimeError):  # no CUDA activity on a CPU run
            continue
        tables[key] = [line for line in text.splitlines() if line.strip()]
    return tables


def _pipeline_runs(ctx: BenchContext, device: torch.device, width: int, height: int, frames: int,
                   cases: list[PipelineCase]) -> dict[str, Any]:  # fmt: skip
    from bench.make_clip import write_clip
    from shared.schemas import ChunkSpec, EncoderSettings, JobOptions
    from shared.settings import Settings
    from worker.pipeline import render_chunk

    work = ctx.work / f"pipeline-{device.type}-{width}x{height}"
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    chunks = 1 + max((case.chunk for case in cases), default=0)
    gop = min(60, frames)
    if chunks > 1 and frames % gop:
        raise ValueError(f"--frames {frames} must be a multiple of {gop}: chunks start on keyframes")
    clip = write_clip(work / "clip.mp4", ctx.images, width=width, height=height, frames=frames * chunks, crf=18,
                      preset="veryfast", gop_frames=gop)  # fmt: skip
    face_path = work / "face.png"
    import cv2

    cv2.imwrite(str(face_path), cv2.cvtColor(ctx.images[SOURCE_FACE], cv2.COLOR_RGB2BGR))
    result: dict[str, Any] = {
        "clip": f"{clip.width}x{clip.height} {float(clip.fps):.0f} fps, {clip.frames} frames (made in {time.perf_counter() - started:.1f} s)",
        "encoder": f"libx264 crf 18 veryfast, {ctx.encoder_threads} threads",
        "device": str(device),
        "cpu_count": os.cpu_count(),
    }
    rows: list[dict[str, Any]] = []
    result["runs"] = rows
    # Settings' own defaults (what ships) but for paths and threads; cases override single fields.
    settings = Settings(device=str(device), model_store=str(ctx.store), model_cache_dir=ctx.work / "model-cache",
                        batch_frames=8, encoder_threads=ctx.encoder_threads)  # fmt: skip

    def start_pts(case: PipelineCase) -> int:  # the keyframe at the case's first frame
        return clip.first_pts + round(case.chunk * frames / (clip.fps * clip.time_base))

    def spec_for(case: PipelineCase, end_frame: int, name: str) -> ChunkSpec:
        encoder = EncoderSettings(
            codec="libx264", crf=18, preset="veryfast", width=clip.width * case.upscale, height=clip.height * case.upscale,
            time_base_num=clip.time_base.numerator, time_base_den=clip.time_base.denominator,
            fps_num=clip.fps.numerator, fps_den=clip.fps.denominator, threads=ctx.encoder_threads,
        )  # fmt: skip
        if case.encoder:
            encoder = encoder.model_copy(update=case.encoder)
        options = JobOptions.model_validate(
            {
                "swapper": case.swapper,
                "upscale": case.upscale,
                "sr_model": ANIME_MODEL,
                "crf": 18,
                "preset": "veryfast",
            }
        )
        first = case.chunk * frames
        return ChunkSpec(job_id="bench", index=case.chunk, start_frame=first, end_frame=first + end_frame,
                         warmup_frames=0, seek_pts=start_pts(case), seek_frame=first, source_uri=str(clip.path),
                         face_uri=str(face_path),
                         output_uri=str(work / name), options=options, encoder=encoder)  # fmt: skip

    def settings_for(case: PipelineCase) -> Settings:
        return settings.model_copy(update=case.settings) if case.settings else settings

    def session_for(case: PipelineCase) -> Any:
        if case.mode == "accelerated":
            return accelerated_session(
                settings_for(case), SpeedOptions(compile=ctx.compile and device.type == "cuda")
            )
        if case.mode == "unbudgeted":
            return baselines.unbudgeted_session(settings_for(case))
        from worker.session import RenderSession

        return RenderSession(settings_for(case))

    for case in cases:
        if ctx.left_s() < 20:
            rows.append({"run": case.label, "skipped": "out of time"})
            continue
        row: dict[str, Any] = {
            "run": case.label,
            "upscale": case.upscale,
            "swapper": case.swapper,
            "mode": case.mode,
            "settings": case.settings or {},
            "encoder": case.encoder or {},
            "chunk": case.chunk,
        }
        # cuDNN autotuning as each way really runs: the per-frame tools and today's session leave it off.
        row["cudnn_benchmark"] = case.mode == "accelerated"
        switch_interval = sys.getswitchinterval()
        try:
            free_memory(device)
            output = work / f"{case.mode}-{case.swapper}-x{case.upscale}.mp4"
            torch.backends.cudnn.benchmark = row["cudnn_benchmark"]
            if case.mode == "per_frame":
                sr = baselines.load_reference_sr(ANIME_MODEL, ctx.store, device) if case.upscale > 1 else None

                def run(n: int, out: Path, case: PipelineCase = case, sr: SrModel | None = sr) -> Any:
                    return baselines.run_per_frame_pipeline(
                        source=clip.path, frames=n, face_image=ctx.images[SOURCE_FACE],
                        store=ctx.store, device=device, sr_model=sr, upscale=case.upscale,
                        encoder=spec_for(case, n, out.name).encoder, output=out, swapper=case.swapper,
                        start_frame=case.chunk * frames, first_pts=start_pts(case),
                    )  # fmt: skip

                run(min(8, frames), work / "warmup.mp4")
                measured = run(frames, output)
                row.update(frames=measured.frames, wall_s=round(measured.wall_s, 3), cpu_s=round(measured.cpu_s, 3),
                           stage_seconds={k: round(v, 3) for k, v in measured.stage_seconds.items()})  # fmt: skip
            else:
                with installed_session(session_for(case)), reverted(case.reverts):
                    # the warm-up (models, allocator) always renders the clip's first frames
                    warm = render_chunk(spec_for(replace(case, chunk=0), min(16, frames), "warmup.mp4"), source=str(clip.path),
                                        face_path=face_path, output_path=work / "warmup.mp4", settings=settings_for(case),
                                        on_progress=lambda n: None, should_stop=lambda: False, log=lambda s: None)  # fmt: skip
                    row["warmup_frames"] = warm.frames
                    profiler = cProfile.Profile() if case.profile else None
                    traced = torch_profiler(device) if case.torch_profile else contextlib.nullcontext()
                    spied = sampled(work / "py-spy") if case.py_spy else contextlib.nullcontext({})
                    with spied as spy_files:
                        t0, c0 = time.perf_counter(), time.process_time()
                        if profiler is not None:
                            profiler.enable()
                        with traced as trace:
                            stats = render_chunk(spec_for(case, frames, output.name), source=str(clip.path),
                                                 face_path=face_path, output_path=output, settings=settings_for(case),
                                                 on_progress=lambda n: None, should_stop=lambda: False,
                                                 log=lambda s: None)  # fmt: skip
                        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                    if case.py_spy:
                        row["py_spy"] = {kind: summarise(path) for kind, path in spy_files.items()} or (
                            "py-spy missing or could not attach: unsampled"
                        )
                    if profiler is not None:
                        profiler.disable()
                        row["face_thread_profile"] = profile_table(profiler)
                    if trace is not None:
                        row["torch_profile"] = torch_profile_tables(trace)
                row.update(frames=stats.frames, faces=stats.faces, faces_by_path=stats.faces_by_path,
                           wall_s=round(wall, 3), cpu_s=round(cpu, 3),
                           stage_seconds=stats.stage_seconds)  # fmt: skip
            row["fps"] = round(row["frames"] / row["wall_s"], 3)
            row["cpu_cores_busy"] = round(row["cpu_s"] / row["wall_s"], 2)
            row["peak_gib"] = peak_gib(device)
            row["output_bytes"] = output.stat().st_size if output.exists() else None
            # x264's output is deterministic for the same frames, so equal digests mean equal pictures
            row["output_md5"] = hashlib.md5(output.read_bytes()).hexdigest() if output.exists() else None
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            row["traceback"] = traceback.format_exc()[-4000:]
        finally:
            sys.setswitchinterval(switch_interval)
        rows.append(row)
        summary = {k: row.get(k) for k in ("run", "fps", "wall_s", "stage_seconds", "error")}
        print(f"[row] {json.dumps(summary)}", flush=True)  # a killed call still shows finished rows
    for upscale, swapper, chunk in {(c.upscale, c.swapper, c.chunk) for c in cases}:
        same = [
            r
            for r in rows
            if (r.get("upscale"), r.get("swapper"), r.get("chunk")) == (upscale, swapper, chunk)
            and r.get("fps")
        ]
        # the mean of the group's per-frame rows (a case may run twice: the machine drifts between rows)
        bases = [r["fps"] for r in same if r.get("mode") == "per_frame"]
        # with --rounds, also against the baseline of the row's own round: a process's first render of
        # either kind is 20-35% slower, so round 1's mean-based ratio flatters the pipelined rows
        by_round = {_round_of(r["run"]): r["fps"] for r in same if r.get("mode") == "per_frame"}
        for r in same:
            if bases:
                r["x_per_frame"] = round(r["fps"] / statistics.mean(bases), 2)
                r["per_frame_fps"] = round(statistics.mean(bases), 3)
            base = by_round.get(_round_of(r["run"]))
            if base and _round_of(r["run"]) is not None:
                r["x_same_round"] = round(r["fps"] / base, 2)
    return result


def _round_of(label: str) -> int | None:
    """The round of a ``--rounds`` row (its label ends in `` #k``), else None."""
    head, sep, tail = label.rpartition(" #")
    return int(tail) if sep and tail.isdigit() else None


def _mesh_available() -> bool:
    try:
        from worker.models.mesh.swapper import MeshSwapper  # noqa: F401
    except ImportError:
        return False
    return True


def part_pipeline(ctx: BenchContext) -> dict[str, Any]:
    """1080p30 chunk -> 4K (animevideov3 x4, averaged to x2) and -> 1080p: pipelined vs per-frame."""
    width, height = (96, 96) if ctx.smoke else (1920, 1080)
    cases = [
        PipelineCase("per-frame synchronous x2 (4K out) [baseline]", 2, mode="per_frame"),
        PipelineCase("render_chunk pipelined x2 (4K out)", 2),
        PipelineCase("render_chunk + accelerate_sr x2 (wiring preview)", 2, mode="accelerated"),
        PipelineCase("render_chunk unbudgeted x2 (whole frame, batch 1)", 2, mode="unbudgeted"),
        PipelineCase("per-frame synchronous x1 (1080p out) [baseline]", 1, mode="per_frame"),
        PipelineCase("render_chunk pipelined x1 (1080p out)", 1),
    ]
    if _mesh_available():  # the default swapper: the headline row
        mesh = "mesh swapper"
        b16 = {"batch_frames": 16}
        cases += [
            PipelineCase(f"per-frame synchronous x2 (4K out), {mesh} [baseline]", 2, swapper="mesh", mode="per_frame"),
            PipelineCase(f"render_chunk pipelined x2, {mesh} (what ships, first chunk of the process)", 2,
                         swapper="mesh"),
            PipelineCase(f"per-frame synchronous x2 (4K out), {mesh}, next chunk [baseline]", 2, swapper="mesh",
                         mode="per_frame", chunk=1),
            PipelineCase(f"render_chunk pipelined x2, {mesh} (what ships, next chunk of the process)", 2,
                         swapper="mesh", chunk=1),
            PipelineCase(f"render_chunk pipelined x2, {mesh}, next chunk, SR batch 1", 2, swapper="mesh", chunk=1,
                         settings={"sr_max_batch": 1}),
            PipelineCase(f"render_chunk pipelined x2, {mesh}, next chunk, SR batch 8", 2, swapper="mesh", chunk=1,
                         settings={"sr_max_batch": 8}),
            PipelineCase(f"render_chunk pipelined x2, {mesh}, next chunk, GIL switch interval 5 ms (Python's)", 2,
                         swapper="mesh", chunk=1, settings={"gil_switch_interval_ms": 5.0}),
            PipelineCase(f"render_chunk pipelined x2, {mesh}, next chunk, GIL switch interval 0.5 ms", 2,
                         swapper="mesh", chunk=1, settings={"gil_switch_interval_ms": 0.5}),
            PipelineCase(f"render_chunk pipelined x2, {mesh}, next chunk, GIL switch interval 0.25 ms", 2,
                         swapper="mesh", chunk=1, settings={"gil_switch_interval_ms": 0.25}),
            PipelineCase(f"render_chunk pipelined x2, {mesh}, next chunk, detect in the face thread", 2,
                         swapper="mesh", chunk=1, settings={"detect_ahead": "off"}),
            PipelineCase(f"render_chunk pipelined x2, {mesh}, next chunk, SR batch 8, detect in the face thread, 5 ms"
                         " switch interval (session 3's settings)", 2, swapper="mesh", chunk=1,
                         settings={"sr_max_batch": 8, "detect_ahead": "off", "gil_switch_interval_ms": 5.0}),
            PipelineCase(f"render_chunk pipelined x2, {mesh}, next chunk, detect ahead in its own thread", 2,
                         swapper="mesh", chunk=1, settings={"detect_ahead": "on"}),
            PipelineCase(f"render_chunk pipelined x2, {mesh}, next chunk, detect ahead and 3 blend threads", 2,
                         swapper="mesh", chunk=1, settings={"detect_ahead": "on", "blend_threads": 3}),
            PipelineCase(f"render_chunk pipelined x2, {mesh}, next chunk, 16-frame batches", 2, swapper="mesh",
                         chunk=1, settings=b16),
            PipelineCase(f"render_chunk pipelined x2, {mesh}, next chunk, Triton SR", 2, swapper="mesh", chunk=1,
                         settings={"sr_kernels": "triton"}),
            PipelineCase(f"render_chunk pipelined x2, {mesh}, next chunk, blend in the face thread", 2, swapper="mesh",
                         chunk=1, settings={"blend_threads": 0}),
            PipelineCase(f"render_chunk pipelined x2, {mesh}, next chunk, 1 blend thread", 2, swapper="mesh",
                         chunk=1, settings={"blend_threads": 1}),
            PipelineCase(f"render_chunk pipelined x2, {mesh}, next chunk, 2 blend threads", 2, swapper="mesh",
                         chunk=1, settings={"blend_threads": 2}),
            PipelineCase(f"render_chunk pipelined x2, {mesh}, next chunk, 3 blend threads", 2, swapper="mesh",
                         chunk=1, settings={"blend_threads": 3}),
            PipelineCase(f"render_chunk pipelined x2, {mesh}, next chunk, 4 blend threads", 2, swapper="mesh",
                         chunk=1, settings={"blend_threads": 4}),
            PipelineCase(f"render_chunk pipelined x2, {mesh}, next chunk, Triton SR with TMA loads", 2,
                         swapper="mesh", chunk=1, settings={"sr_kernels": "triton-tma"}),
            PipelineCase(f"render_chunk pipelined x2, {mesh}, next chunk, cuDNN SR", 2, swapper="mesh", chunk=1,
                         settings={"sr_kernels": "cudnn"}),
            PipelineCase(f"render_chunk pipelined x2, {mesh}, next chunk, host landmark crops (before)", 2,
                         swapper="mesh", chunk=1, reverts=("host_landmark_crops",)),
            PipelineCase(f"render_chunk pipelined x2, {mesh}, next chunk, copying blend (before)", 2,
                         swapper="mesh", chunk=1, reverts=("copying_blend",)),
            PipelineCase(f"render_chunk pipelined x2, {mesh}, next chunk, last batch whole (before)", 2,
                         swapper="mesh", chunk=1, reverts=("whole_last_batch",)),
            PipelineCase(f"render_chunk pipelined x2, {mesh}, next chunk, pooled pyramid (before)", 2,
                         swapper="mesh", chunk=1, reverts=("pooled_pyramid",)),
            PipelineCase(f"render_chunk pipelined x2, {mesh}, next chunk, x264 sliced threads", 2,
                         swapper="mesh", chunk=1, encoder={"sliced_threads": True}),
            PipelineCase(f"render_chunk pipelined x2, {mesh}, next chunk, eager detection pyramid (before)", 2,
                         swapper="mesh", chunk=1, settings={"detect_cuda_graph": False}),
            PipelineCase(f"render_chunk pipelined x2, {mesh}, next chunk, session 5 face path (all before)", 2,
                         swapper="mesh", chunk=1,
                         reverts=("host_landmark_crops", "copying_blend", "whole_last_batch", "pooled_pyramid")),
            PipelineCase(f"render_chunk pipelined x2, {mesh}, next chunk, py-spy", 2, swapper="mesh", chunk=1,
                         py_spy=True),
            PipelineCase(f"render_chunk pipelined x2, {mesh}, next chunk, torch.profiler", 2, swapper="mesh",
                         chunk=1, torch_profile=True),
            PipelineCase(f"render_chunk pipelined x2, {mesh}, next chunk, per-face cv2 compositor", 2,
                         swapper="mesh", chunk=1, settings={"mesh_compositor": "cv2"}),
            # the first next-chunk row meets shapes (cuDNN plans, allocator sizes) that later rows find ready,
            # and the machine's speed drifts between rows: the headline rows run again at the end
            PipelineCase(f"render_chunk pipelined x2, {mesh} (what ships, next chunk, again after the others)", 2,
                         swapper="mesh", chunk=1),
            PipelineCase(f"per-frame synchronous x2 (4K out), {mesh}, next chunk, again [baseline]", 2,
                         swapper="mesh", mode="per_frame", chunk=1),
            PipelineCase(f"render_chunk pipelined x2, {mesh} (what ships, next chunk, third time)", 2,
                         swapper="mesh", chunk=1),
            PipelineCase(f"per-frame synchronous x1 (1080p out), {mesh} [baseline]", 1, swapper="mesh", mode="per_frame"),
            PipelineCase(f"render_chunk pipelined x1 (1080p out), {mesh}", 1, swapper="mesh"),
        ]  # fmt: skip
    if ctx.pipeline_cases:
        cases = select_cases(cases, ctx.pipeline_cases)
    if ctx.rounds > 1:  # interleaved repeats: the machine's speed drifts from row to row
        cases = [replace(c, label=f"{c.label} #{k + 1}") for k in range(ctx.rounds) for c in cases]
    return _pipeline_runs(ctx, ctx.device, width, height, ctx.frames, cases)


def select_cases(cases: list[PipelineCase], parts: tuple[str, ...]) -> list[PipelineCase]:
    """The cases whose label holds one of ``parts``, listed on stdout. An entry that matches nothing
    stops the run before any work (a device call was once spent on a typo)."""
    kept = []
    for part in parts:
        matched = [c for c in cases if part in c.label]
        if not matched:
            raise SystemExit(f"--pipeline-cases entry {part!r} matches no case of this part")
        kept += [c for c in matched if c not in kept]
    selected = [c for c in cases if c in kept]
    print(f"[bench] {len(selected)} pipeline cases: " + " | ".join(c.label for c in selected), flush=True)
    return selected


def part_cpu(ctx: BenchContext) -> dict[str, Any]:
    """The same pipeline on 96 px frames on the CPU: the 'no regression' row."""
    cases = [
        PipelineCase("per-frame synchronous x2 [baseline]", 2, mode="per_frame"),
        PipelineCase("render_chunk pipelined x2", 2),
    ]
    return _pipeline_runs(ctx, torch.device("cpu"), 96, 96, 4 if ctx.smoke else 48, cases)


def part_conv_sweep(ctx: BenchContext) -> dict[str, Any]:
    """Many more tile/warp/stage configs of the fused Triton conv than the autotuner tries (CUDA only)."""
    if ctx.device.type != "cuda":
        return {"skipped": "the Triton conv sweep needs CUDA"}
    from bench.conv_sweep import sweep

    return sweep(ctx.device, width=1920, height=1080, left_s=ctx.left_s)


def part_area_resize(ctx: BenchContext) -> dict[str, Any]:
    """MTCNN's pyramid resize of a 1080p batch of 8: ``F.interpolate(mode="area")`` on NHWC and NCHW memory,
    and ``area_resize_full`` from the integral image (what CUDA runs since the sixth session); the float
    copy and the integral image each such path needs are timed once, as ``setup``."""
    import torch.nn.functional as F

    from worker.models.detect_mtcnn import area_resize_full, pyramid_scales

    h, w = (24, 32) if ctx.smoke else (1080, 1920)
    frames = torch.from_numpy(test_frames(ctx, 8, w, h)).to(ctx.device)
    nhwc = frames.permute(0, 3, 1, 2).float()  # the float copy the pooling needs: channels_last strides
    nchw = nhwc.contiguous()

    def integral_of(raw: Tensor) -> Tensor:
        return F.pad(raw.permute(0, 3, 1, 2).long().cumsum(2).cumsum(3), (1, 0, 1, 0))

    integral = integral_of(frames)
    setup = {
        "float_nchw_ms": time_calls(lambda: frames.permute(0, 3, 1, 2).float().contiguous(), ctx.device,
                                    warmup=2, iters=10)["median_s"] * 1e3,
        "integral_ms": time_calls(lambda: integral_of(frames), ctx.device, warmup=2, iters=10)["median_s"] * 1e3,
    }  # fmt: skip
    rows = []
    for scale in pyramid_scales(h, w, 20.0):
        size = (int(h * scale + 1), int(w * scale + 1))
        row: dict[str, Any] = {"scale": round(scale, 4), "size": list(size)}
        calls = {
            "nhwc": lambda size=size: F.interpolate(nhwc, size=size, mode="area"),
            "nchw": lambda size=size: F.interpolate(nchw, size=size, mode="area"),
            "integral": lambda size=size: area_resize_full(integral, size),
        }
        for name, call in calls.items():
            row[f"{name}_ms"] = round(time_calls(call, ctx.device, warmup=2, iters=10)["median_s"] * 1e3, 3)
        reference = calls["nhwc"]()
        row["identical"] = {name: bool(torch.equal(call(), reference)) for name, call in calls.items()}
        rows.append(row)
    return {
        "input": f"8x3x{h}x{w}",
        "setup_ms": {k: round(v, 3) for k, v in setup.items()},
        "levels": rows,
        "total_ms": {k: round(sum(r[f"{k}_ms"] for r in rows), 3) for k in ("nhwc", "nchw", "integral")},
        "all_identical": {k: all(r["identical"][k] for r in rows) for k in ("nchw", "integral")},
    }


def part_x264_threads(ctx: BenchContext) -> dict[str, Any]:
    """libx264 on 4K frames (the clip's canvas, resized up), CRF 18 veryfast, all cores: frame threads
    (x264's default) against sliced threads. Per way: the writes' wall, the flush at the end (the frames
    the encoder still held), the bytes, and the decoded output's PSNR against the frames put in (so
    "equal quality" is measured, not assumed): YUV 4:2:0 planes against the encoder's own conversion."""
    import av
    import cv2

    from shared.schemas import EncoderSettings
    from worker.frames import open_encoder

    w, h, n = (320, 180, 6) if ctx.smoke else (3840, 2160, 90)
    canvas = build_canvas(ctx.images, 1920, 1080)
    frames = np.stack([cv2.resize(frame_at(canvas, i, 1920, 1080), (w, h), interpolation=cv2.INTER_CUBIC)
                       for i in range(n)])  # fmt: skip
    out: dict[str, Any] = {"frames": f"{n} x {w}x{h}", "threads": ctx.encoder_threads}
    for name, sliced in (("frame threads", False), ("sliced threads", True), ("frame threads, again", False)):
        settings = EncoderSettings(codec="libx264", crf=18, preset="veryfast", width=w, height=h, time_base_num=1,
                                   time_base_den=30, fps_num=30, fps_den=1, threads=ctx.encoder_threads,
                                   sliced_threads=sliced)  # fmt: skip
        path = ctx.work / f"x264-{'sliced' if sliced else 'frame'}.mp4"
        started = time.perf_counter()
        with open_encoder(path, settings) as encoder:
            for k in range(0, n, 8):
                encoder.write(frames[k : k + 8], list(range(k, min(n, k + 8))))
            written = time.perf_counter()
        total = time.perf_counter() - started
        errors = []
        # in YUV 4:2:0, against the encoder's own conversion of the input
        with av.open(str(path)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                want = encoder._to_yuv(frames[i]).to_ndarray().astype(np.float64)
                diff = frame.to_ndarray().astype(np.float64) - want
                errors.append(float(np.mean(diff * diff)))
        mse = float(np.mean(errors))
        out[name] = {
            "write_s": round(written - started, 3),
            "flush_s": round(encoder.flush_s, 3),
            "total_s": round(total, 3),
            "fps": round(n / total, 2),
            "bytes": path.stat().st_size,
            "psnr_db": round(10 * math.log10(255.0**2 / mse), 3) if mse > 0 else None,
        }
        print(f"[x264] {name}: {out[name]}", flush=True)
    return out


PART_FUNCTIONS: dict[str, Callable[[BenchContext], dict[str, Any]]] = {
    "sr": part_sr,
    "anime": part_anime,
    "swapper": part_swapper,
    "landmarks": part_landmarks,
    "pipeline": part_pipeline,
    "cpu": part_cpu,
    "conv_sweep": part_conv_sweep,
    "area_resize": part_area_resize,
    "x264_threads": part_x264_threads,
}


# ---- environment, output ------------------------------------------------------------------------------
def nvidia_smi_args() -> list[str]:
    return ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,temperature.gpu",
            "--format=csv,noheader"]  # fmt: skip


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "numpy": np.__version__,
    }
    try:
        import av

        env["av"] = av.__version__
    except ImportError:
        env["av"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            sm_count=props.multi_processor_count,
        )
        try:
            env["nvidia_smi"] = subprocess.run(
                nvidia_smi_args(), capture_output=True, text=True, timeout=20
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            env["nvidia_smi"] = f"unavailable: {exc}"
    return env


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The short table printed last: one line per timed row."""
    lines = [f"{'part':<10} {'variant':<72} {'fps':>9} {'x base':>7} {'PSNR':>6} {'GiB':>6}"]
    for part, data in report["parts"].items():
        if "error" in data:
            lines.append(f"{part:<10} ERROR {data['error'][:100]}")
            continue
        for row in data.get("variants", []) + data.get("runs", []):
            label = row.get("variant") or row.get("run") or "?"
            if "error" in row or "skipped" in row:
                lines.append(
                    f"{part:<10} {label[:72]:<72} {('ERROR ' + row['error'][:40]) if 'error' in row else 'skipped'}"
                )
                continue
            ratio = row.get("x_baseline", row.get("x_per_frame", ""))
            lines.append(f"{part:<10} {label[:72]:<72} {row.get('fps', ''):>9} {ratio!s:>7} "
                         f"{row.get('psnr_db', '')!s:>6} {row.get('peak_gib', '')!s:>6}")  # fmt: skip
        if data.get("face_stage", {}).get("ms_per_face") is not None:
            lines.append(
                f"{part:<10} face stage ms/face: {data['face_stage']['ms_per_face']} ({data['face_stage']['faces']} faces)"
            )
        if "params" in data:
            lines.append(f"{part:<10} params: {data['params']:,}")
    lines.append(f"total {report['total_s']:.0f} s")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for bench.json")
    parser.add_argument("--store", type=Path, default=Path("models-store"))
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}"
    )
    parser.add_argument("--images", type=Path, default=None, help="folder of make_clip.export_source_images")
    parser.add_argument(
        "--work", type=Path, default=None, help="scratch folder (default: --out/../bench-work)"
    )
    parser.add_argument("--frames", type=int, default=240, help="frames of the 1080p pipeline chunk")
    parser.add_argument("--budget-s", type=float, default=480.0, help="stop starting new variants after this")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile variants; auto = on for CUDA, off on the CPU (minutes there)")  # fmt: skip
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, tiny frames, 1-2 iterations (checks the script)"
    )
    parser.add_argument(
        "--device", default=None, help="default: cuda if available, else cpu (cpu with --smoke)"
    )
    parser.add_argument(
        "--pipeline-cases", default="", help="comma list of label substrings of the pipeline cases to run"
    )
    parser.add_argument(
        "--variants", default="", help="comma list of label substrings of the sr/anime variants to run"
    )
    parser.add_argument("--rounds", type=int, default=1, help="run the pipeline cases this many times, interleaved")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.monotonic()
    device = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or (args.out.resolve().parent / "bench-work")
    work.mkdir(parents=True, exist_ok=True)
    configure_compile_cache(work / "inductor-cache")
    if device.type == "cuda":
        enable_fast_kernels()
    ctx = BenchContext(
        device=device,
        store=args.store.resolve(),
        work=work,
        images=load_source_images(args.images),
        smoke=args.smoke,
        compile=args.compile == "on" or (args.compile == "auto" and device.type == "cuda"),
        frames=4 if args.smoke else args.frames,
        deadline=started + args.budget_s,
        encoder_threads=os.cpu_count() or 2,
        pipeline_cases=tuple(p.strip() for p in args.pipeline_cases.split(",") if p.strip()),
        variants=tuple(p.strip() for p in args.variants.split(",") if p.strip()),
        rounds=max(1, args.rounds),
    )
    report: dict[str, Any] = {
        "environment": environment(device),
        "args": vars(args) | {"out": str(args.out)},
        "parts": {},
    }
    report["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in report["args"].items()}
    report["baselines"] = {k: vars(v) for k, v in baselines.BASELINES.items()}
    report["ceilings"] = {
        "peak_flop_s": PEAK_FLOP_S,
        "peak_bytes_s": PEAK_BYTES_S,
        "source": "handbook GPU.md, one H100",
    }
    out_file = args.out / "bench.json"
    for part in parts:
        part_started = time.monotonic()
        print(f"[bench] {part} ...", flush=True)
        try:
            data = PART_FUNCTIONS[part](ctx)
        except Exception as exc:
            data = {
                "error": f"{type(exc).__name__}: {exc}"[:2000],
                "traceback": traceback.format_exc()[-6000:],
            }
        data["part_s"] = round(time.monotonic() - part_started, 1)
        report["parts"][part] = data
        report["total_s"] = time.monotonic() - started
        out_file.write_text(json.dumps(report, indent=1, default=str))
        print(f"[bench] {part} done in {data['part_s']} s", flush=True)
    report["total_s"] = time.monotonic() - started
    out_file.write_text(json.dumps(report, indent=1, default=str))
    print("\n".join(summary_lines(report)), flush=True)
    return report


if __name__ == "__main__":
    main()
