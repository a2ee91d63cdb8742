"""The render worker's per-process session: device, memory budget, model cache and the SR step.

This is where ``runtime`` (how much memory, which device, what to do on OOM) meets ``models``
(what to run): one object per worker process, created lazily on the first task in the child
(never before Celery forks), reused by every chunk that process renders.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shared.model_store import require_file, resolve_store
from shared.schemas import JobOptions
from shared.settings import Settings
from worker.models.accelerate import SpeedOptions, accelerate_sr, configure_compile_cache, sr_kernels
from worker.models.enhancer import FaceEnhancer, enhance_faces, load_face_enhancer
from worker.models.registry import get_descriptor
from worker.models.super_res import SrModel, estimate_cpu_seconds, load_sr_model, upscale_frames
from worker.models.tiling import MIN_CORE_PX, SR_PAD_PX
from worker.runtime.budget import (
    BytesPerPixelCache,
    MemoryBudget,
    TilePlan,
    activation_bytes,
    plan_sr_tiles,
    resolve_budget,
    stage_batch_frames,
    tile_plan,
)
from worker.runtime.device import LazyDevice
from worker.runtime.model_cache import ModelCache
from worker.runtime.oom import OomCounter, run_with_oom_retry
from worker.runtime.telemetry import collect_runtime_stats

log = logging.getLogger(__name__)

_CALIBRATION_TILE_PX = 128
# free memory (above 1 GiB) is rounded down to this before planning, so a worker plans each frame size once
# (planning walks a few thousand tile shapes: ~10-30 ms of Python that holds the GIL)
_PLAN_FREE_QUANTUM = 64 << 20

SrStep = Callable[[np.ndarray], np.ndarray]


class RenderSession:
    """Everything a render process keeps between chunks; created once, lazily, in the child."""

    def __init__(self, settings: Settings, *, mps_limit: str | None = None) -> None:
        self.settings = settings
        self._device = LazyDevice(settings.device)
        self._mps_limit = mps_limit
        self._store: Path | None = None
        self._budget: MemoryBudget | None = None
        self._cache: ModelCache | None = None
        self._sr_models: dict[str, SrModel] = {}
        self._enhancer: FaceEnhancer | None = None
        self._fast_sr: dict[tuple[str, int], SrModel] = {}
        self._sr_stream: torch.cuda.Stream | None = None
        self._face_streams: dict[str, torch.cuda.Stream] = {}
        self._bytes_per_pixel = BytesPerPixelCache()
        self._plans: dict[tuple[Any, ...], list[TilePlan]] = {}
        self.oom = OomCounter()
        self.tile_override_px: int | None = None  # tests and benchmarks pin a square core (standard pad)

    # ---- resources -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device.get()

    @property
    def detect_ahead(self) -> bool:
        """Whether face detection runs one batch ahead in its own thread (``Settings.detect_ahead``;
        "auto": with CUDA and no blend pool)."""
        mode = self.settings.detect_ahead
        return mode == "on" or (mode == "auto" and self.device.type == "cuda" and self.blend_threads == 0)

    @property
    def blend_threads(self) -> int:
        """How many threads blend planned batches (``Settings.blend_threads``; 0: the face thread)."""
        threads = self.settings.blend_threads
        if threads == "auto":
            return 2 if self.device.type == "cuda" else 0
        return threads

    @property
    def sr_max_batch(self) -> int:
        """Most frames per SR call (``Settings.sr_max_batch``; "auto": 8 with a blend pool, else 2)."""
        configured = self.settings.sr_max_batch
        if configured == "auto":
            return 8 if self.blend_threads else 2
        return configured

    @property
    def gil_switch_interval_s(self) -> float:
        """The render process's GIL switch interval (``Settings.gil_switch_interval_ms``; "auto": 5 ms
        with a blend pool, else 1 ms)."""
        configured = self.settings.gil_switch_interval_ms
        if configured == "auto":
            return 0.005 if self.blend_threads else 0.001
        return configured / 1000.0

    @property
    def store(self) -> Path:
        """The local model store (an ``s3://`` store is synced to a local cache first)."""
        if self._store is None:
            cache_dir = Path(self.settings.model_cache_dir)
            self._store = resolve_store(
                self.settings.model_store, settings=self.settings, cache_dir=cache_dir
            )
        return self._store

    @property
    def budget(self) -> MemoryBudget:
        if self._budget is None:
            self._budget = MemoryBudget(resolve_budget(self.settings, self.device, mps_limit=self._mps_limit))
            log.info("render session on %s with budget %s", self.device, self._budget)
        return self._budget

    @property
    def cache(self) -> ModelCache:
        """Weights tier for the large per-frame models (SR, enhancer)."""
        if self._cache is None:
            self._cache = ModelCache(self.budget, self.device, self._load_module)
        return self._cache

    def _load_module(self, name: str) -> nn.Module:
        if name.startswith("sr:"):
            model = load_sr_model(name[3:], self.store, device="cpu", dtype=self._dtype)
            if self.device.type == "cuda":  # host copies in NHWC, so page-ins keep the fast layout
                model.net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            self._sr_models[name[3:]] = model
            return model.net
        if name == "enhancer:gfpgan":
            enhancer = load_face_enhancer(require_file(self.store, "GFPGANv1.4.pth"), "cpu", self._dtype)
            self._enhancer = enhancer
            return enhancer.net
        raise KeyError(name)

    @property
    def _dtype(self) -> torch.dtype:
        return torch.float16 if self.device.type == "cuda" else torch.float32

    # ---- super-resolution --------------------------------------------------------------------
    def super_resolver(self, options: JobOptions) -> SrStep:
        """``frames -> upscaled frames`` for this job, tiled to the budget, surviving OOM."""
        name = options.sr_model
        key = f"sr:{name}"

        def step(frames: np.ndarray) -> np.ndarray:
            # Its own CUDA stream: SR runs beside the face stage's small kernels, not in front of them.
            with self._sr_stream_context(), self.cache.acquire(key) as net:
                eager = self._placed_sr(name, net)
                plans = self._sr_plans(eager, frames.shape[1], frames.shape[2])
                model = self._accelerated(eager, net)
                return run_with_oom_retry(
                    lambda plan: self._run_sr(model, frames, options.upscale, plan),
                    plans,
                    counter=self.oom,
                    budget_bytes=self.budget.budget_bytes,
                )

        return step

    def _placed_sr(self, name: str, net: nn.Module) -> SrModel:
        base = self._sr_models[name]
        return SrModel(name=name, net=net, scale=base.scale, device=self.device, dtype=self._dtype)

    def face_stream_context(self, role: str = "swap") -> AbstractContextManager[Any]:
        """The face stage's CUDA stream for ``role`` ("detect", "swap"), at the highest priority: its many
        small kernels (MTCNN's pyramid, landmarks, the compositor) then run between the SR step's long
        kernels instead of queueing behind them, and the two roles, each in its own thread, overlap.
        Joins the default stream first (weights were placed there)."""
        if self.device.type != "cuda":
            return nullcontext()
        stream = self._face_streams.get(role)
        if stream is None:
            low, high = torch.cuda.Stream.priority_range()
            stream = self._face_streams[role] = torch.cuda.Stream(self.device, priority=min(low, high))
        stream.wait_stream(torch.cuda.default_stream(self.device))
        return torch.cuda.stream(stream)

    def _sr_stream_context(self) -> AbstractContextManager[Any]:
        if self.device.type != "cuda":
            return nullcontext()
        if self._sr_stream is None:
            self._sr_stream = torch.cuda.Stream(self.device)
        return torch.cuda.stream(self._sr_stream)

    def _accelerated(self, eager: SrModel, net: nn.Module) -> SrModel:
        """On CUDA: channels_last kernels (and ``torch.compile`` when settings ask for it),
        built once per resident copy of the weights."""
        if self.device.type != "cuda":
            return eager
        key = (eager.name, id(net))
        if key not in self._fast_sr:
            kernels = sr_kernels(self.settings.sr_kernels)
            compile_net = self.settings.sr_compile and kernels == "cudnn"
            if compile_net:
                configure_compile_cache(Path(self.settings.model_cache_dir) / "inductor")
            self._fast_sr[key] = accelerate_sr(
                eager, SpeedOptions(channels_last=True, compile=compile_net, kernels=kernels)
            )
            log.info("super-resolution %s on %s: %s kernels%s", eager.name, self.device, kernels,
                     ", compiled" if compile_net else "")  # fmt: skip
        return self._fast_sr[key]

    def _run_sr(self, model: SrModel, frames: np.ndarray, upscale: int, plan: TilePlan) -> np.ndarray:
        return upscale_frames(
            model,
            frames,
            upscale=upscale,
            core_px=None if plan.tiles == 1 else (plan.core_h, plan.core_w),
            pad_px=plan.pad_px,
            batch=plan.batch,
        )

    def _sr_plans(self, model: SrModel, height: int, width: int) -> list[TilePlan]:
        descriptor = get_descriptor(model.name)
        value_bytes = torch.empty((), dtype=model.dtype).element_size()
        if self.tile_override_px is not None:
            core = self.tile_override_px
            pinned = tile_plan(
                height,
                width,
                core_h=core,
                core_w=core,
                pad_px=SR_PAD_PX,
                batch=1,
                bytes_per_pixel=float(descriptor.bytes_per_pixel),
                scale=model.scale,
                value_bytes=value_bytes,
            )
            return [pinned]
        bpp = self._bytes_per_pixel.get(
            (model.name, str(model.dtype)),
            lambda px: model.run(torch.rand(1, 3, px, px, device=model.device, dtype=model.dtype)),
            _CALIBRATION_TILE_PX,
            device=model.device,
            declared=float(descriptor.bytes_per_pixel),
        )
        free = activation_bytes(self.budget, self.device)
        if free > 16 * _PLAN_FREE_QUANTUM:  # small budgets plan with the exact figure
            free = free // _PLAN_FREE_QUANTUM * _PLAN_FREE_QUANTUM
        key = (height, width, bpp, model.scale, value_bytes, free)
        if key not in self._plans:
            if len(self._plans) >= 256:
                self._plans.clear()
            self._plans[key] = plan_sr_tiles(
                height,
                width,
                bytes_per_pixel=bpp,
                scale=model.scale,
                value_bytes=value_bytes,
                free_bytes=free,
                pad_px=SR_PAD_PX,
                max_batch=self.sr_max_batch,
                min_core_px=MIN_CORE_PX,
            )
        return list(self._plans[key])

    def batch_frames(self, options: JobOptions) -> int:
        """The decode batch for this job: larger when its paged weights cannot all stay resident."""
        configured = self.settings.batch_frames
        if self.device.type != "cuda":
            return configured
        names = [options.sr_model] if options.upscale > 1 else []
        if options.face_enhancer != "none":
            names.append("gfpgan")
        weights = sum(get_descriptor(name).weights_bytes for name in names)
        return stage_batch_frames(configured, weights, self.budget.budget_bytes)

    def describe_super_resolution(self, options: JobOptions, out_width: int, out_height: int) -> str:
        """A log line; on the CPU it warns how long the SR step will take."""
        if self.device.type == "cuda":
            return f"super-resolution {options.sr_model} x{options.upscale} on {self.device}"
        in_w, in_h = out_width // options.upscale, out_height // options.upscale
        per_frame_s = estimate_cpu_seconds(options.sr_model, in_w, in_h, 1)
        return (
            f"warning: super-resolution {options.sr_model} on the CPU takes about {per_frame_s:.0f} s per "
            f"{in_w}x{in_h} frame; use a GPU worker"
            + ("" if options.sr_model == "realesr-animevideov3" else " or --sr-model realesr-animevideov3")
            + " for speed"
        )

    # ---- face enhancer -------------------------------------------------------------------------
    def face_enhancer(self, options: JobOptions) -> Callable[[np.ndarray], np.ndarray] | None:
        """The enhancer step for swapped face crops, or None when the job asks for none."""
        if options.face_enhancer == "none":
            return None

        def enhance(crops: np.ndarray) -> np.ndarray:
            with self.cache.acquire("enhancer:gfpgan") as net:
                base = self._enhancer
                assert base is not None  # set by the cache's loader
                placed = FaceEnhancer(net=net, size_px=base.size_px, device=self.device, dtype=self._dtype)  # type: ignore[arg-type]
                return enhance_faces(placed, crops)

        require_file(self.store, "GFPGANv1.4.pth")  # fail the chunk now, with the fix in the message
        return enhance

    # ---- telemetry -----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Budget, memory and OOM counters for the worker heartbeat (cheap; no CUDA init)."""
        if not self._device.resolved or self._budget is None:
            return {"device": self.settings.device, "oom_recoveries": self.oom.recoveries}
        return collect_runtime_stats(self.device, budget=self.budget, oom=self.oom, cache=self._cache)


_session: RenderSession | None = None
_session_lock = threading.Lock()


def get_session(settings: Settings) -> RenderSession:
    """The process's session (created on first use, in the process that renders)."""
    global _session
    with _session_lock:
        if _session is None or _session.settings != settings:
            _session = RenderSession(settings)
        return _session
