"""On a real GPU: the session's SR step stays inside its budget and the runtime telemetry
(heartbeat dict and Prometheus gauges) moves while it works. OOM recovery on the GPU is measured
by bench/runtime_bench.py (sr_budget safety net, over-limit MPS client)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from shared.schemas import JobOptions
from shared.settings import Settings
from worker.runtime.telemetry import RuntimeMetrics
from worker.session import RenderSession

pytestmark = pytest.mark.gpu


def frames(n: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, h * w * 3).reshape(h, w, 3)
    return np.stack([(base + rng.integers(0, 40, base.shape)) % 256 for _ in range(n)]).astype(np.uint8)


def test_sr_step_on_cuda_stays_in_budget_and_metrics_move(
    cuda: torch.device, gpu_store: Path, tmp_path
) -> None:
    settings = Settings(
        device="cuda", model_store=str(gpu_store), gpu_budget="1GiB", model_cache_dir=tmp_path
    )
    session = RenderSession(settings)
    registry = CollectorRegistry()
    metrics = RuntimeMetrics(registry, worker="gpu-test")
    metrics.update(session.stats())
    before = registry.get_sample_value("facefarm_runtime_peak_reserved_bytes", {"worker": "gpu-test"})
    torch.cuda.init()
    torch.cuda.reset_peak_memory_stats(cuda)
    step = session.super_resolver(JobOptions(upscale=4, sr_model="realesr-animevideov3"))
    out = step(frames(4, 360, 640))
    assert out.shape == (4, 1440, 2560, 3) and out.dtype == np.uint8
    stats = session.stats()
    metrics.update(stats)
    assert stats["budget_bytes"] == 1024**3
    assert 0 < stats["peak_reserved_bytes"] <= stats["budget_bytes"] + 64 * 1024**2
    after = registry.get_sample_value("facefarm_runtime_peak_reserved_bytes", {"worker": "gpu-test"})
    assert after is not None and after > (before or 0)
    assert registry.get_sample_value("facefarm_runtime_bytes_paged_in", {"worker": "gpu-test"}) > 0


def test_x4plus_banded_tail_matches_the_whole_tail_on_cuda_in_a_fraction_of_the_memory(
    cuda: torch.device,
) -> None:
    from worker.models.sr_nets import RRDBNet

    torch.manual_seed(0)
    net = RRDBNet(scale=4).to(cuda, torch.float16).eval()
    x = torch.rand(1, 3, 270, 480, device=cuda, dtype=torch.float16)
    peaks, outs = [], []
    with torch.inference_mode():
        for bands in (None, 32):
            net.upsample_band_rows = bands
            torch.cuda.synchronize(cuda)
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(cuda)
            torch.cuda.reset_peak_memory_stats(cuda)
            outs.append(net(x).float())
            torch.cuda.synchronize(cuda)
            peaks.append(torch.cuda.max_memory_allocated(cuda) - base)
    mse = torch.mean((outs[0] - outs[1]) ** 2).item()
    assert mse == 0.0 or 10 * np.log10(float(outs[0].abs().max().item()) ** 2 / mse) > 50
    assert peaks[1] < 0.5 * peaks[0], peaks


def test_a_job_whose_weights_must_page_gets_16_frame_decode_batches(
    cuda: torch.device, gpu_store: Path, tmp_path
) -> None:
    options = JobOptions(upscale=4, sr_model="realesrgan-x4plus")
    tight = Settings(device="cuda", model_store=str(gpu_store), gpu_budget="16MiB", model_cache_dir=tmp_path)
    roomy = Settings(device="cuda", model_store=str(gpu_store), gpu_budget="8GiB", model_cache_dir=tmp_path)
    assert RenderSession(tight).batch_frames(options) == 16  # x4plus (33 MB fp16) > 16 MiB
    assert RenderSession(roomy).batch_frames(options) == roomy.batch_frames == 8
