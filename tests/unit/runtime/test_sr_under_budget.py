"""The runtime wired to the real pipeline pieces: real x4plus weights, the model cache, the tile
planner, the padded-crop executor (through ``upscale_frames``) and the OOM safety net, on a 96x96
crop of a real face photo (CPU).

Measured on this crop (x4plus fp32, 32-px cores, PSNR against the untiled run): pad 8 px 40.8 dB,
12 px 43.9 dB, 16 px 47.1 dB, 24 px 53.8 dB; ``SR_PAD_PX`` is the smallest pad with a margin over
45 dB.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import Tensor, nn

from shared.schemas import JobOptions
from shared.settings import Settings
from worker.models.registry import get_descriptor
from worker.models.super_res import SrModel, load_sr_model, upscale_frames
from worker.models.tiling import SR_PAD_PX
from worker.runtime.budget import (
    MemoryBudget,
    TilePlan,
    activation_bytes,
    calibrate_bytes_per_pixel,
    plan_sr_tiles,
    tile_plan,
    weights_bytes,
)
from worker.runtime.model_cache import ModelCache
from worker.runtime.oom import OomCounter, OomInjector, run_with_oom_retry
from worker.session import RenderSession

CPU = torch.device("cpu")
NAME = "realesrgan-x4plus"
CROP = 96
FP32_BYTES = 4


def face_photo() -> np.ndarray:
    """insightface's bundled 112x112 aligned face (RGB)."""
    import insightface

    path = Path(insightface.__file__).parent / "data" / "images" / "Tom_Hanks_54745.png"
    image = cv2.imread(str(path))
    assert image is not None, path
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def x4plus(model_store: Path) -> SrModel:
    return load_sr_model(NAME, model_store, device=CPU, dtype=torch.float32)


@pytest.fixture(scope="module")
def crop() -> np.ndarray:
    return np.ascontiguousarray(face_photo()[8 : 8 + CROP, 8 : 8 + CROP])[None]


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2) / 255.0**2
    return 10 * float(np.log10(1.0 / mse))


def cpu_bytes_per_pixel() -> float:
    """The descriptor declares fp16 bytes; the CPU runs fp32, twice as many."""
    declared_fp16 = get_descriptor(NAME).bytes_per_pixel
    return calibrate_bytes_per_pixel(lambda px: None, 64, device=CPU, declared=2 * declared_fp16)


class OomAtCalls(nn.Module):
    """The real net behind an ``OomInjector``: a simulated CUDA OOM on the chosen forward calls."""

    def __init__(self, net: nn.Module, injector: OomInjector) -> None:
        super().__init__()
        self.net = net
        self.injector = injector
        self.window_shapes: list[tuple[int, ...]] = []

    def forward(self, x: Tensor) -> Tensor:
        self.injector.check()
        self.window_shapes.append(tuple(x.shape))
        return self.net(x)


def test_a_budget_forcing_32px_cores_survives_an_oom_at_the_first_tile_at_45_db(
    x4plus: SrModel, crop: np.ndarray
) -> None:
    bpp = cpu_bytes_per_pixel()
    smallest = tile_plan(
        CROP,
        CROP,
        core_h=32,
        core_w=32,
        pad_px=SR_PAD_PX,
        batch=1,
        bytes_per_pixel=bpp,
        scale=4,
        value_bytes=FP32_BYTES,
    )
    weights = weights_bytes([*x4plus.net.parameters(), *x4plus.net.buffers()])
    budget = MemoryBudget(weights + smallest.bytes_needed)  # room for one 32-px core's window, no more
    cache = ModelCache(budget, CPU, lambda name: x4plus.net)
    injector = OomInjector(fail_on_calls=1)
    counter = OomCounter()
    tried: list[TilePlan] = []
    with cache.acquire(NAME) as net:
        assert budget.reserved_bytes == weights
        free = activation_bytes(budget, CPU)
        plans = plan_sr_tiles(
            CROP,
            CROP,
            bytes_per_pixel=bpp,
            scale=4,
            value_bytes=FP32_BYTES,
            free_bytes=free,
            pad_px=SR_PAD_PX,
            max_batch=4,
        )
        injected = OomAtCalls(net, injector)
        model = SrModel(name=NAME, net=injected, scale=4, device=CPU, dtype=torch.float32)

        def step(plan: TilePlan) -> np.ndarray:
            tried.append(plan)
            return upscale_frames(
                model,
                crop,
                upscale=4,
                core_px=(plan.core_h, plan.core_w),
                pad_px=plan.pad_px,
                batch=plan.batch,
            )

        out = run_with_oom_retry(step, plans, counter=counter, budget_bytes=budget.budget_bytes)
    assert plans == [smallest] and all(p.bytes_needed <= free for p in plans)
    assert (smallest.core_h, smallest.core_w, smallest.tiles, smallest.window_h) == (
        32,
        32,
        9,
        32 + 2 * SR_PAD_PX,
    )
    assert tried == [smallest, smallest]  # the OOM flushed the cache and the smallest plan ran again
    assert (counter.recoveries, counter.failures, injector.raised) == (1, 0, 1)
    assert injected.window_shapes == [(1, 3, 64, 64)] * 9
    untiled = upscale_frames(x4plus, crop, upscale=4)
    assert out.shape == untiled.shape == (1, 4 * CROP, 4 * CROP, 3)
    assert psnr_db(out, untiled) >= 45.0


def test_a_pinned_core_runs_padded_tiles_through_the_session(
    model_store: Path, crop: np.ndarray, tmp_path: Path
) -> None:
    settings = Settings(
        device="cpu", model_store=str(model_store), gpu_budget="1GiB", model_cache_dir=tmp_path
    )
    session = RenderSession(settings)
    options = JobOptions(upscale=4, sr_model="realesr-animevideov3")
    frames = np.concatenate([crop, crop[:, ::-1]])
    whole = session.super_resolver(options)(frames)
    session.tile_override_px = 40
    tiled = session.super_resolver(options)(frames)
    assert tiled.shape == whole.shape == (2, 4 * CROP, 4 * CROP, 3)
    assert not np.array_equal(tiled, whole)  # the pin took effect: 9 windows, not the whole frame
    assert psnr_db(tiled, whole) >= 45.0


def test_the_session_keeps_the_configured_batch_on_the_cpu(model_store: Path, tmp_path: Path) -> None:
    from shared.schemas import JobOptions

    settings = Settings(device="cpu", model_store=str(model_store), batch_frames=5, model_cache_dir=tmp_path)
    options = JobOptions.model_validate({"upscale": 2, "face_enhancer": "gfpgan"})
    assert RenderSession(settings).batch_frames(options) == 5


def test_sr_plans_are_computed_once_per_frame_size_and_budget(model_store: Path, tmp_path, monkeypatch) -> None:
    """Planning walks thousands of tile shapes; a worker plans each frame size once, and a new size
    or the configured SR batch gets its own plan."""
    import worker.session as session_module

    calls: list[tuple[int, int, int]] = []
    real = session_module.plan_sr_tiles

    def counting(height: int, width: int, **kw: object) -> list:
        calls.append((height, width, int(kw["max_batch"])))  # type: ignore[call-overload]
        return real(height, width, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(session_module, "plan_sr_tiles", counting)
    settings = Settings(
        device="cpu", model_store=str(model_store), gpu_budget="1GiB", model_cache_dir=tmp_path, sr_max_batch=3
    )
    session = RenderSession(settings)
    options = JobOptions(upscale=2, sr_model="realesr-animevideov3")
    step = session.super_resolver(options)
    frames = np.zeros((4, 24, 32, 3), np.uint8)
    first = step(frames)
    assert np.array_equal(step(frames), first)
    step(np.zeros((2, 16, 16, 3), np.uint8))
    assert calls == [(24, 32, 3), (16, 16, 3)]
