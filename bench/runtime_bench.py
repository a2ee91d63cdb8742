"""GPU runtime benchmark (one NVIDIA GPU): budgeted SR, weight paging, MPS clients, unified memory.

Run on the device machine from the repository root (the model store carried along):

    python bench/runtime_bench.py --store models-store --out "$OUT/runtime.json"

Parts, each recorded (figures or its error) in the JSON as soon as it ends, never asserted
(BENCHMARKS.md §5):
  mps            1, 2 and 4 MPS clients with hard limits on a fixed SR workload (aggregate
                 throughput), and one client pushed past its limit recovering through the safety net.
                 Runs first, before this process touches CUDA; the daemon is private and always stopped.
  sr_budget      realesrgan-x4plus 960x540 -> 3840x2160 under a 2 GiB budget vs whole-frame unbudgeted:
                 max_memory_reserved vs budget, NVML's figure, throughput ratio, PSNR vs unbudgeted;
                 then a whole-frame plan forced under the cap, recovered by the safety net.
  paging         stand-ins of the pipeline's models (~300 M params fp16) under a 512 MiB budget, with
                 and without prefetch, vs all resident.
  unified_memory the managed-memory pool: allocate, advise, prefetch; output identical to the normal
                 pool; cost when everything fits.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repo root

import torch  # noqa: E402
from torch import nn  # noqa: E402

from worker.models.sr_nets import RRDBNet, SRVGGNetCompact  # noqa: E402
from worker.models.tiling import SR_PAD_PX, run_tiled  # noqa: E402
from worker.runtime.budget import (  # noqa: E402
    MemoryBudget,
    TilePlan,
    activation_bytes,
    apply_budget_cap,
    calibrate_bytes_per_pixel,
    plan_sr_tiles,
    tile_plan,
    weights_bytes,
)
from worker.runtime.model_cache import ModelCache  # noqa: E402
from worker.runtime.oom import OomCounter, run_with_oom_retry  # noqa: E402
from worker.runtime.sizes import GIB, MIB, parse_mps_limit  # noqa: E402

X4PLUS_BYTES_PER_PIXEL_FP16 = 8_200  # the registry's declared figure, used before calibration
PAGING_STAND_INS = {  # name -> parameters (the registry's sizes; the user models are random stand-ins)
    "mtcnn": 496_000,
    "face-mesh": 605_000,
    "arcface-w600k-r50": 43_600_000,
    "inswapper": 138_600_000,
    "gfpgan": 80_000_000,
    "realesrgan-x4plus": 16_700_000,
    "realesr-animevideov3": 621_000,
}


# ---- helpers ---------------------------------------------------------------------------------------
def median_time_s(fn: Callable[[], Any], runs: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a.float().cpu().clamp(0, 1) - b.float().cpu().clamp(0, 1)) ** 2).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def nvml_process_bytes(pid: int) -> int | None:
    """This process's memory as NVML attributes it (None without NVML or without a record)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            uuid = str(torch.cuda.get_device_properties(0).uuid)
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
            used = [
                p.usedGpuMemory
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                if p.pid == pid and p.usedGpuMemory is not None
            ]
            return int(sum(used)) if used else None
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None


def nvml_total_bytes(index: int = 0) -> int | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).total)
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None


def test_frame(height: int, width: int, device: torch.device) -> torch.Tensor:
    """A real photo resized when skimage is there, else smooth random structure plus grain (never zeros)."""
    try:
        from skimage import data

        img = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 255
    except Exception:
        gen = torch.Generator().manual_seed(0)
        img = torch.rand(1, 3, height // 8, width // 8, generator=gen)
    img = torch.nn.functional.interpolate(img, size=(height, width), mode="bilinear", align_corners=False)
    grain = torch.rand(img.shape, generator=torch.Generator().manual_seed(1)) * 0.04
    return (img + grain).clamp(0, 1).to(device, torch.float16)


def load_x4plus(store: Path | None, device: torch.device) -> tuple[nn.Module, str]:
    """Real Real-ESRGAN x4plus weights from the store when present, else a random-init RRDBNet."""
    param = next(iter(sorted(store.rglob("realesrgan-x4plus.param"))), None) if store else None
    if param is not None:
        from worker.models.ncnn_convert import build_network, convert_ncnn

        net = build_network(convert_ncnn(param, param.with_suffix(".bin")))
        source = f"real ({param})"
    else:
        torch.manual_seed(0)
        net = RRDBNet(scale=4)
        source = "random-init RRDBNet (no model store given)"
    net = net.to(device, torch.float16).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, source


def write(results: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))


def run_part(results: dict[str, Any], out: Path, name: str, fn: Callable[[], dict[str, Any]]) -> None:
    started = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as exc:  # one part failing must not lose the others
        results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    results[name]["wall_s"] = round(time.perf_counter() - started, 2)
    write(results, out)
    print(f"[{name}] done in {results[name]['wall_s']} s", flush=True)


def whole_frame_plan(bytes_per_pixel: float) -> TilePlan:
    """The 960x540 frame as one window (what an unbudgeted run does), costed at ``bytes_per_pixel``."""
    return tile_plan(
        540, 960, core_h=540, core_w=960, pad_px=SR_PAD_PX, batch=1,
        bytes_per_pixel=bytes_per_pixel, scale=4, value_bytes=2,
    )  # fmt: skip


# ---- (a) SR under a budget -------------------------------------------------------------------------
def part_sr_budget(store: Path | None, budget_bytes: int) -> dict[str, Any]:
    device = torch.device("cuda", 0)
    net, source = load_x4plus(store, device)
    x = test_frame(540, 960, device)

    def model_fn(t: torch.Tensor) -> torch.Tensor:
        return net(t).clamp_(0, 1)

    res: dict[str, Any] = {"weights": source, "input_hw": [540, 960], "output_hw": [2160, 3840]}
    res["floor"] = "x4plus ~36 MFLOP/input px -> ~18.7 TFLOP per frame; ~24 ms at 790 TFLOP/s"
    with torch.inference_mode():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        reference = model_fn(x).float().cpu()
        t_whole = median_time_s(lambda: model_fn(x), runs=3)
        res["unbudgeted"] = {
            "plan": "whole frame",
            "upsample_band_rows": getattr(net, "upsample_band_rows", None),
            "s_per_frame": t_whole,
            "fps": 1 / t_whole,
            "max_memory_reserved": torch.cuda.max_memory_reserved(),
            "max_memory_allocated": torch.cuda.max_memory_allocated(),
        }
        bands = getattr(net, "upsample_band_rows", None)
        if bands is not None:  # for the record: the same frame with the upsampling tail run whole
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            net.upsample_band_rows = None
            t_unbanded = median_time_s(lambda: model_fn(x), runs=3)
            res["unbudgeted_whole_tail"] = {
                "s_per_frame": t_unbanded,
                "fps": 1 / t_unbanded,
                "max_memory_allocated": torch.cuda.max_memory_allocated(),
                "psnr_db_vs_banded": psnr_db(model_fn(x).float().cpu(), reference),
            }
            net.upsample_band_rows = bands

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        apply_budget_cap(budget_bytes, device)
        try:
            budget = MemoryBudget(budget_bytes)
            budget.reserve("weights:realesrgan-x4plus", weights_bytes(list(net.parameters())))
            bpp = calibrate_bytes_per_pixel(
                lambda px: model_fn(x[..., :px, :px]),
                128,
                device=device,
                declared=X4PLUS_BYTES_PER_PIXEL_FP16,
            )
            free = activation_bytes(budget, device)
            plans = plan_sr_tiles(
                540,
                960,
                bytes_per_pixel=bpp,
                scale=4,
                value_bytes=2,
                free_bytes=free,
                pad_px=SR_PAD_PX,
                max_batch=8,
            )
            used: list[TilePlan] = []

            def step(plan: TilePlan) -> torch.Tensor:
                used.append(plan)
                return run_tiled(
                    model_fn,
                    x,
                    scale=4,
                    core_h=plan.core_h,
                    core_w=plan.core_w,
                    pad_px=plan.pad_px,
                    batch=plan.batch,
                )

            counter = OomCounter()
            out = run_with_oom_retry(step, plans, counter=counter, budget_bytes=budget_bytes)
            chosen = used[-1]
            t_budget = median_time_s(lambda: step(chosen), runs=3, warmup=0)
            peak_reserved = torch.cuda.max_memory_reserved()
            res["budgeted"] = {
                "budget_bytes": budget_bytes,
                "calibrated_bytes_per_pixel": bpp,
                "free_for_tiles_bytes": free,
                "plans": [str(p) for p in plans],
                "plan": str(chosen),
                "computed_px_vs_frame": chosen.computed_px / (540 * 960),
                "oom_recoveries": counter.recoveries,
                "s_per_frame": t_budget,
                "fps": 1 / t_budget,
                "max_memory_reserved": peak_reserved,
                "max_memory_allocated": torch.cuda.max_memory_allocated(),
                "reserved_within_budget": peak_reserved <= budget_bytes,
                "nvml_process_bytes": nvml_process_bytes(os.getpid()),
                "nvml_note": "NVML counts the CUDA context and other pools too; the budget covers the allocator",
            }
            res["throughput_ratio_budgeted_vs_unbudgeted"] = t_whole / t_budget
            res["psnr_db_vs_unbudgeted"] = psnr_db(out, reference)
            res["psnr_at_least_45db"] = res["psnr_db_vs_unbudgeted"] >= 45.0
            del out

            # the safety net, live: a whole-frame plan first (it cannot fit the cap), then the planned tiles
            torch.cuda.empty_cache()
            # (with the whole upsampling tail, ~4.6 GB: the banded tail would simply fit)
            forced = [whole_frame_plan(bpp), *plans]
            live = OomCounter()
            used.clear()
            bands = getattr(net, "upsample_band_rows", None)
            net.upsample_band_rows = None
            try:
                out = run_with_oom_retry(step, forced, counter=live, budget_bytes=budget_bytes)
            finally:
                net.upsample_band_rows = bands
            res["safety_net"] = {
                "plans_tried": [str(p) for p in used],
                "oom_recoveries": live.recoveries,
                "psnr_db_vs_unbudgeted": psnr_db(out, reference),
                "max_memory_reserved": torch.cuda.max_memory_reserved(),
            }
            del out
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
            torch.cuda.empty_cache()
    return res


# ---- (b) weight paging ------------------------------------------------------------------------------
def stand_in(n_params: int) -> nn.Sequential:
    """Bias-free square linear layers holding about ``n_params`` (compute scales with the weights)."""
    width = 2048 if n_params >= 16_000_000 else 512 if n_params >= 1_000_000 else 256
    layers = max(1, round(n_params / (width * width)))
    torch.manual_seed(n_params % 1000)
    return nn.Sequential(*(nn.Linear(width, width, bias=False) for _ in range(layers))).half()


def first_linear(model: nn.Sequential) -> nn.Linear:
    layer = model[0]
    assert isinstance(layer, nn.Linear)
    return layer


def part_paging(budget_bytes: int, tokens: int, frames: int, batch_frames: int) -> dict[str, Any]:
    """Each stage runs over a whole decode batch (``batch_frames`` frames, ``tokens`` each) while its
    weights are resident, as ``render_chunk`` does: weights page once per batch, not once per frame.
    ``batch_frames=1`` is the per-frame schedule (every stage's weights move for every frame)."""
    device = torch.device("cuda", 0)
    names = list(PAGING_STAND_INS)
    models = {name: stand_in(n) for name, n in PAGING_STAND_INS.items()}
    inputs = {
        name: torch.randn(tokens, first_linear(m).in_features, device=device, dtype=torch.float16)
        for name, m in models.items()
    }
    total_weights = sum(weights_bytes(list(m.parameters())) for m in models.values())
    # The stage inputs are test data, not the pipeline's: they sit in the capped allocator too.
    inputs_bytes = sum(weights_bytes([t]) for t in inputs.values())
    # plus a quarter of the budget for the caching allocator's rounding and fragmentation
    activation_reserve = 3 * tokens * 2048 * 2 + 32 * MIB + inputs_bytes + budget_bytes // 4
    res: dict[str, Any] = {
        "stand_ins_params": {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()},
        "weights_total_bytes": total_weights,
        "tokens_per_stage": tokens,
        "batch_frames": batch_frames,
        "budget_bytes": budget_bytes,
        "activation_reserve_bytes": activation_reserve,
        "floor": (
            f"copying all weights once per batch of {batch_frames} at 53.7 GB/s = "
            f"{total_weights / 53.7e9 * 1e3 / batch_frames:.2f} ms a frame"
        ),
    }

    def run(weights_budget: int, prefetch: bool, cap: int | None) -> dict[str, Any]:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        if cap is not None:
            apply_budget_cap(cap, device)
        cache = ModelCache(MemoryBudget(weights_budget), device, lambda name: models[name])
        oom_retries = 0
        try:

            def one_batch() -> None:
                nonlocal oom_retries
                for i, name in enumerate(names):
                    for attempt in range(2):
                        try:
                            with cache.acquire(name) as module:
                                if prefetch:
                                    cache.prefetch(names[(i + 1) % len(names)])
                                for _ in range(batch_frames):
                                    module(inputs[name])
                            break
                        except torch.OutOfMemoryError:
                            if attempt:
                                raise
                            oom_retries += 1
                            torch.cuda.synchronize()
                            cache.evict_idle(cache.budget.budget_bytes)
                            torch.cuda.empty_cache()

            with torch.inference_mode():
                for _ in range(2):
                    one_batch()
                paged_before = cache.stats.bytes_paged_in
                t = median_time_s(one_batch, runs=frames, warmup=0) / batch_frames
            return {
                "s_per_frame": t,
                "fps": 1 / t,
                "bytes_paged_per_frame": (cache.stats.bytes_paged_in - paged_before) / frames / batch_frames,
                "prefetch_hits": cache.stats.prefetch_hits,
                "evictions": cache.stats.evictions,
                "oom_retries": oom_retries,
                "max_memory_reserved": torch.cuda.max_memory_reserved(),
                "completed": True,
            }
        finally:
            cache.close()
            if cap is not None:
                torch.cuda.set_per_process_memory_fraction(1.0, device)

    res["all_resident"] = run(total_weights + 64 * MIB, prefetch=False, cap=None)
    res["paged_prefetch"] = run(budget_bytes - activation_reserve, prefetch=True, cap=budget_bytes)
    res["paged_no_prefetch"] = run(budget_bytes - activation_reserve, prefetch=False, cap=budget_bytes)
    res["throughput_ratio_paged_vs_resident"] = (
        res["all_resident"]["s_per_frame"] / res["paged_prefetch"]["s_per_frame"]
    )
    res["prefetch_gain"] = res["paged_no_prefetch"]["s_per_frame"] / res["paged_prefetch"]["s_per_frame"]
    res["reserved_within_budget"] = res["paged_prefetch"]["max_memory_reserved"] <= budget_bytes
    return res


# ---- (c) MPS clients --------------------------------------------------------------------------------
def mps_settings(root: Path, gpu_budget: str) -> Any:
    """Settings for the MPS helpers (plain fields if pydantic-settings is not on this machine)."""
    fields: dict[str, Any] = {
        "gpu_budget": gpu_budget,
        "budget_free_fraction": 0.9,
        "mps_pipe_dir": root / "pipe",
        "mps_log_dir": root / "log",
        "log_level": "INFO",
    }
    try:
        from shared.settings import Settings

        return Settings(**fields)
    except Exception:
        return SimpleNamespace(mps_mem_limit=None, **fields)


def spawn_clients(
    clients: list[Any],
    work: str,
    root: Path,
    duration_s: float,
    extra_args: list[list[str]] | None = None,
    ready_timeout_s: float = 180.0,
) -> list[dict[str, Any]]:
    """Start one client process per entry, release them together once all are ready, collect results.

    Each result carries ``started``/``finished`` (``time.time()``) so the caller can compute the
    aggregate over the common wall-clock window.
    """
    go = root / f"go-{work}-{len(clients)}"
    procs = []
    for n, c in enumerate(clients):
        tag = f"{work}-{len(clients)}-{c.slot}"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--mps-client",
            work,
            "--duration-s",
            str(duration_s),
            "--ready",
            str(root / f"ready-{tag}"),
            "--go",
            str(go),
            "--result",
            str(root / f"result-{tag}.json"),
            *(extra_args[n] if extra_args else []),
        ]
        procs.append((tag, subprocess.Popen(cmd, env={**os.environ, **c.env})))
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline and not all((root / f"ready-{t}").exists() for t, _ in procs):
        if any(p.poll() is not None for _, p in procs):
            break
        time.sleep(0.2)
    go.touch()
    out = []
    for tag, proc in procs:
        try:
            proc.wait(timeout=duration_s + ready_timeout_s + 120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        result = root / f"result-{tag}.json"
        out.append(
            json.loads(result.read_text()) if result.exists() else {"error": f"exit {proc.returncode}"}
        )
    return out


def part_mps(duration_s: float) -> dict[str, Any]:
    from worker.runtime.mps import MpsDaemon, build_client_envs, is_mps_daemon_running

    root = Path(tempfile.mkdtemp(prefix="ff-mps-bench-"))
    settings = mps_settings(root, "auto")
    total = nvml_total_bytes(0) or 80 * GIB
    res: dict[str, Any] = {"pipe_dir": str(settings.mps_pipe_dir), "gpu_total_bytes": total}
    daemon = MpsDaemon(settings, dict(os.environ))
    daemon.start()
    res["daemon_started_by_us"] = daemon.started_by_us
    try:
        for k in (1, 2, 4):
            clients = build_client_envs(
                [0], k, "managed", settings, mps_daemon_running=True, total_bytes_by_gpu={0: total}
            )
            per_client = spawn_clients(clients, "throughput", root, duration_s)
            res[f"clients_{k}"] = {
                "env_example": {key: v for key, v in clients[0].env.items() if key.startswith("CUDA_")},
                "per_client": per_client,
                "aggregate_items_per_s": sum(c.get("items_per_s", 0.0) for c in per_client),
            }
        base = res["clients_1"]["aggregate_items_per_s"] or float("nan")
        for k in (2, 4):
            res[f"aggregate_ratio_{k}_vs_1"] = res[f"clients_{k}"]["aggregate_items_per_s"] / base
        tight = mps_settings(root, "2GiB")
        clients = build_client_envs(
            [0], 1, "managed", tight, mps_daemon_running=True, total_bytes_by_gpu={0: total}
        )
        res["over_limit_client"] = {
            "env": {key: v for key, v in clients[0].env.items() if key.startswith("CUDA_MPS_PINNED")},
            **spawn_clients(clients, "overlimit", root, duration_s)[0],
        }
    finally:
        daemon.stop()
        res["daemon_stopped"] = not is_mps_daemon_running(settings.mps_pipe_dir)
    return res


RENDER_CHUNK_FRAMES = 60  # = the clip's GOP: every chunk starts on a keyframe


def part_mps_render(
    store: Path | None, images: Path | None, *, frames: int, upscale: int, cpu_threads: int
) -> dict[str, Any]:
    """1, 2 and 4 MPS clients with hard limits running ``render_chunk`` on pre-planned chunks.

    One 1080p30 clip is split into ``RENDER_CHUNK_FRAMES``-frame chunks (the same plan for every
    client count); client i renders chunks i, i+k, i+2k, ... Each client warms up (models, cuDNN)
    before the common start; the aggregate is all frames over the wall time from the start to the
    last client's end. Encoder threads are split evenly (``cpu_threads // k`` each).
    """
    from bench.make_clip import SOURCE_FACE, load_source_images, write_clip
    from worker.runtime.mps import MpsDaemon, build_client_envs, is_mps_daemon_running

    if store is None:
        raise RuntimeError("--store is required for mps_render (the render path loads MTCNN and SR weights)")
    root = Path(tempfile.mkdtemp(prefix="ff-mps-render-"))
    srcs = load_source_images(images)
    clip = write_clip(
        root / "clip.mp4", srcs, width=1920, height=1080, frames=frames, gop_frames=RENDER_CHUNK_FRAMES
    )
    import cv2

    face = root / "face.png"
    cv2.imwrite(str(face), cv2.cvtColor(srcs[SOURCE_FACE], cv2.COLOR_RGB2BGR))
    chunks = [
        (a, min(a + RENDER_CHUNK_FRAMES, clip.frames)) for a in range(0, clip.frames, RENDER_CHUNK_FRAMES)
    ]
    settings = mps_settings(root, "auto")
    total = nvml_total_bytes(0) or 80 * GIB
    res: dict[str, Any] = {
        "clip": f"{clip.width}x{clip.height} {float(clip.fps):.0f} fps, {clip.frames} frames",
        "chunks": chunks,
        "options": f"classic swapper, x{upscale} realesr-animevideov3, libx264 crf 18 veryfast",
        "cpu_threads": cpu_threads,
    }
    daemon = MpsDaemon(settings, dict(os.environ))
    daemon.start()
    res["daemon_started_by_us"] = daemon.started_by_us
    try:
        for k in (1, 2, 4):
            clients = build_client_envs(
                [0], k, "managed", settings, mps_daemon_running=True, total_bytes_by_gpu={0: total}
            )
            plans = []
            for slot in range(k):
                plan = root / f"plan-{k}-{slot}.json"
                plan.write_text(json.dumps({
                    "clip": str(clip.path), "face": str(face), "store": str(store),
                    "work": str(root / f"out-{k}-{slot}"), "chunks": chunks[slot::k], "upscale": upscale,
                    "fps": [clip.fps.numerator, clip.fps.denominator],
                    "time_base": [clip.time_base.numerator, clip.time_base.denominator],
                    "first_pts": clip.first_pts, "width": clip.width, "height": clip.height,
                    "threads": max(1, cpu_threads // k),
                }))  # fmt: skip
                plans.append(["--plan", str(plan)])
            per_client = spawn_clients(clients, "render", root, 0.0, plans, ready_timeout_s=300.0)
            starts = [c["started"] for c in per_client if "started" in c]
            ends = [c["finished"] for c in per_client if "finished" in c]
            done = sum(c.get("frames", 0) for c in per_client)
            wall = (max(ends) - min(starts)) if starts and ends else float("nan")
            res[f"clients_{k}"] = {
                "env_example": {key: v for key, v in clients[0].env.items() if key.startswith("CUDA_")},
                "per_client": per_client,
                "frames": done,
                "wall_s": wall,
                "aggregate_fps": done / wall if wall == wall and wall > 0 else None,
                "complete": done == clip.frames,
            }
        base = res["clients_1"]["aggregate_fps"] or float("nan")
        for k in (2, 4):
            fps = res[f"clients_{k}"]["aggregate_fps"]
            res[f"aggregate_ratio_{k}_vs_1"] = fps / base if fps else None
    finally:
        daemon.stop()
        res["daemon_stopped"] = not is_mps_daemon_running(settings.mps_pipe_dir)
    return res


def render_client(plan_path: Path, ready: Path, go: Path, result: Path) -> None:
    """One MPS client: warm up on 16 frames, then render its pre-planned chunks with ``render_chunk``."""
    from fractions import Fraction

    out: dict[str, Any] = {
        "pid": os.getpid(),
        "limit_env": os.environ.get("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"),
    }
    try:
        from shared.schemas import ChunkSpec, EncoderSettings, JobOptions
        from shared.settings import Settings
        from worker.pipeline import render_chunk

        plan = json.loads(plan_path.read_text())
        work = Path(plan["work"])
        work.mkdir(parents=True, exist_ok=True)
        fps, time_base = Fraction(*plan["fps"]), Fraction(*plan["time_base"])
        ticks_per_frame = int(1 / (fps * time_base))
        upscale = plan["upscale"]
        device = plan.get("device", "cuda")
        settings = Settings(device=device, model_store=plan["store"], model_cache_dir=work / "model-cache",
                            batch_frames=8, encoder_threads=plan["threads"], gpu_budget="auto")  # fmt: skip
        encoder = EncoderSettings(
            codec="libx264", crf=18, preset="veryfast", width=plan["width"] * upscale, height=plan["height"] * upscale,
            time_base_num=time_base.numerator, time_base_den=time_base.denominator,
            fps_num=fps.numerator, fps_den=fps.denominator, threads=plan["threads"],
        )  # fmt: skip
        options = JobOptions.model_validate(
            {"swapper": "classic", "upscale": upscale, "sr_model": "realesr-animevideov3", "crf": 18,
             "preset": "veryfast"}
        )  # fmt: skip

        def render(start: int, end: int, name: str) -> Any:
            spec = ChunkSpec(job_id="bench", index=start // RENDER_CHUNK_FRAMES, start_frame=start, end_frame=end,
                             warmup_frames=0, seek_pts=plan["first_pts"] + start * ticks_per_frame, seek_frame=start,
                             source_uri=plan["clip"], face_uri=plan["face"], output_uri=str(work / name),
                             options=options, encoder=encoder)  # fmt: skip
            return render_chunk(spec, source=plan["clip"], face_path=Path(plan["face"]), output_path=work / name,
                                settings=settings, on_progress=lambda n: None, should_stop=lambda: False,
                                log=lambda s: None)  # fmt: skip

        render(0, 16, "warmup.mp4")
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        ready.touch()
        while not go.exists():
            time.sleep(0.01)
        out["started"] = time.time()
        frames, oom = 0, 0
        for start, end in plan["chunks"]:
            stats = render(start, end, f"chunk-{start:05d}.mp4")
            frames += stats.frames
        out["finished"] = time.time()
        from worker.session import get_session

        session_stats = get_session(settings).stats()
        oom = session_stats.get("oom_recoveries", 0)
        out.update(
            frames=frames,
            seconds=out["finished"] - out["started"],
            fps=frames / (out["finished"] - out["started"]),
            oom_recoveries=oom,
            budget_bytes=session_stats.get("budget_bytes"),
            max_memory_reserved=torch.cuda.max_memory_reserved() if device.startswith("cuda") else None,
            chunks=plan["chunks"],
        )
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()
        ready.touch()
    result.write_text(json.dumps(out, default=str))


def mps_client(work: str, duration_s: float, ready: Path, go: Path, result: Path) -> None:
    """One MPS client process: a fixed SR workload, or the safety net under its hard limit."""
    out: dict[str, Any] = {
        "pid": os.getpid(),
        "limit_env": os.environ.get("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"),
    }
    try:
        device = torch.device("cuda", 0)
        torch.cuda.init()
        free, total = torch.cuda.mem_get_info(device)
        out.update(
            free_bytes_at_start=free,
            total_bytes=total,
            sm_count=torch.cuda.get_device_properties(0).multi_processor_count,
        )
        if work == "throughput":
            torch.manual_seed(0)
            net = SRVGGNetCompact(num_feat=64, num_conv=16, upscale=4).to(device, torch.float16).eval()
            x = torch.rand(1, 3, 256, 256, device=device, dtype=torch.float16)
            with torch.inference_mode():
                for _ in range(5):
                    net(x)
                torch.cuda.synchronize()
                ready.touch()
                while not go.exists():
                    time.sleep(0.01)
                items, start = 0, time.perf_counter()
                while time.perf_counter() - start < duration_s:
                    net(x)
                    torch.cuda.synchronize()
                    items += 1
                elapsed = time.perf_counter() - start
            out.update(
                workload="SRVGGNetCompact fp16 256x256 -> 1024x1024, batch 1", items=items, seconds=elapsed
            )
            out["items_per_s"] = items / elapsed
        else:
            ready.touch()
            big = RRDBNet(scale=4).to(device, torch.float16).eval()
            big.upsample_band_rows = None  # the whole x4 tail: a 960x540 frame then needs ~4.6 GB
            x = torch.rand(1, 3, 540, 960, device=device, dtype=torch.float16)
            limit = parse_mps_limit(out["limit_env"] or "") or total
            budget = MemoryBudget(int(min(limit, free) * 0.9))
            budget.reserve("weights", weights_bytes(list(big.parameters())))
            bpp = X4PLUS_BYTES_PER_PIXEL_FP16
            plans = [whole_frame_plan(bpp)] + plan_sr_tiles(
                540, 960, bytes_per_pixel=bpp, scale=4, value_bytes=2,
                free_bytes=activation_bytes(budget, device), pad_px=SR_PAD_PX, max_batch=4,
            )  # fmt: skip
            tried: list[str] = []
            counter = OomCounter()

            def step(plan: TilePlan) -> torch.Tensor:
                tried.append(str(plan))
                return run_tiled(
                    lambda t: big(t).clamp_(0, 1),
                    x,
                    scale=4,
                    core_h=plan.core_h,
                    core_w=plan.core_w,
                    pad_px=plan.pad_px,
                    batch=plan.batch,
                )

            with torch.inference_mode():
                y = run_with_oom_retry(step, plans, counter=counter, budget_bytes=budget.budget_bytes)
                torch.cuda.synchronize()
            out.update(
                workload="random-init x4plus, 960x540 whole frame first (needs ~4.5 GB), then planned tiles",
                plans_tried=tried,
                oom_recoveries=counter.recoveries,
                output_shape=list(y.shape),
                max_memory_reserved=torch.cuda.max_memory_reserved(),
                recovered=counter.recoveries >= 1,
            )
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()
        ready.touch()
    result.write_text(json.dumps(out, default=str))


# ---- (d) unified memory ------------------------------------------------------------------------------
def part_unified_memory() -> dict[str, Any]:
    from worker.runtime.um import create_unified_memory

    device = torch.device("cuda", 0)
    free = torch.cuda.mem_get_info(device)[0]
    limit = int(min(4 * GIB, free // 4))
    started = time.perf_counter()
    um = create_unified_memory(device, limit_bytes=limit, mps_limit=None, cache_dir=Path(tempfile.mkdtemp()))
    res: dict[str, Any] = {
        "limit_bytes": limit,
        "free_bytes_before": free,
        "runtime_version": um.runtime_version,
        "setup_s": time.perf_counter() - started,
    }
    torch.manual_seed(0)
    net_normal = SRVGGNetCompact(num_feat=64, num_conv=16, upscale=4).half().eval()
    state = {k: v.clone() for k, v in net_normal.state_dict().items()}
    net_normal = net_normal.to(device)
    x = test_frame(540, 960, device)
    with torch.inference_mode():
        y_normal = net_normal(x)
        t_normal = median_time_s(lambda: net_normal(x), runs=5)
        with um.activate():
            net_um = SRVGGNetCompact(num_feat=64, num_conv=16, upscale=4).half().eval()
            net_um.load_state_dict(state)
            net_um = net_um.to(device)
            x_um = x.clone()
            res["outstanding_managed_bytes_after_alloc"] = um.outstanding_bytes
            stream = torch.cuda.current_stream(device)
            for p in net_um.parameters():
                um.advise_read_mostly(p)
                um.prefetch_to_device(p, stream)
            um.prefetch_to_device(x_um, stream)
            first = time.perf_counter()
            y_um = net_um(x_um)
            torch.cuda.synchronize()
            res["first_run_s"] = time.perf_counter() - first
            t_um = median_time_s(lambda: net_um(x_um), runs=5)
            res["outstanding_managed_bytes_peak"] = um.outstanding_bytes
        res["identical_to_normal_pool"] = bool(torch.equal(y_um, y_normal))
        res["max_abs_diff"] = float((y_um.float() - y_normal.float()).abs().max())
    res["normal_s_per_frame"] = t_normal
    res["managed_s_per_frame"] = t_um
    res["managed_cost_ratio"] = t_um / t_normal
    res["managed_within_limit"] = res["outstanding_managed_bytes_peak"] <= limit
    torch.cuda.synchronize()
    return res  # the pool (in ``um``) is dropped with its tensors when this frame ends


# ---- main ---------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: $OUT/runtime.json)")
    parser.add_argument(
        "--store", type=Path, default=None, help="model store with realesrgan-x4plus.{param,bin}"
    )
    parser.add_argument("--parts", default="mps,sr_budget,paging,unified_memory")
    parser.add_argument("--sr-budget", default="2GiB")
    parser.add_argument("--paging-budget", default="512MiB")
    parser.add_argument("--paging-tokens", type=int, default=8192)
    parser.add_argument("--paging-frames", type=int, default=10)
    parser.add_argument("--duration-s", type=float, default=12.0)
    parser.add_argument("--mps-client", choices=["throughput", "overlimit", "render"], default=None)
    parser.add_argument("--plan", type=Path, help="(render client) its pre-planned chunks, JSON")
    parser.add_argument("--images", type=Path, default=None, help="folder of make_clip.export_source_images")
    parser.add_argument("--render-frames", type=int, default=240)
    parser.add_argument("--render-upscale", type=int, default=2)
    parser.add_argument("--cpu-threads", type=int, default=os.cpu_count() or 16)
    parser.add_argument("--paging-batch-frames", type=int, default=8)
    parser.add_argument("--ready", type=Path)
    parser.add_argument("--go", type=Path)
    parser.add_argument("--result", type=Path)
    args = parser.parse_args()
    if args.mps_client == "render":
        render_client(args.plan, args.ready, args.go, args.result)
        return 0
    if args.mps_client:
        mps_client(args.mps_client, args.duration_s, args.ready, args.go, args.result)
        return 0

    from worker.runtime.sizes import parse_bytes

    out = args.out or Path(os.environ.get("OUT", ".")) / "runtime.json"
    store = args.store if args.store and args.store.exists() else None
    results: dict[str, Any] = {
        "meta": {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "argv": sys.argv,
        }
    }
    parts = {
        "mps": lambda: part_mps(args.duration_s),
        "sr_budget": lambda: part_sr_budget(store, parse_bytes(args.sr_budget)),
        "paging": lambda: part_paging(
            parse_bytes(args.paging_budget), args.paging_tokens, args.paging_frames, args.paging_batch_frames
        ),
        "paging_per_frame": lambda: part_paging(
            parse_bytes(args.paging_budget), args.paging_tokens, args.paging_frames, 1
        ),
        "mps_render": lambda: part_mps_render(
            store,
            args.images,
            frames=args.render_frames,
            upscale=args.render_upscale,
            cpu_threads=args.cpu_threads,
        ),
        "unified_memory": part_unified_memory,
    }
    for name in [p.strip() for p in args.parts.split(",") if p.strip()]:
        # this process touches CUDA only after the MPS part (its clients are separate processes)
        if (
            name not in ("mps", "mps_render")
            and "device" not in results["meta"]
            and torch.cuda.is_available()
        ):
            results["meta"]["device"] = torch.cuda.get_device_name(0)
        run_part(results, out, name, parts[name])
    results["meta"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write(results, out)
    print(
        json.dumps(
            {k: v.get("error", "ok") if isinstance(v, dict) else v for k, v in results.items()}, default=str
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
