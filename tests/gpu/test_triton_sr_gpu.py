"""The fused Triton SR kernels on CUDA (compiled for the card, autotuned) give the eager nets' output.

The CPU suite checks the same kernels under Triton's interpreter; this runs the real compiled kernels
on the shipped animevideov3 weights and on a random-initialised RRDBNet, against eager fp32.
"""

from __future__ import annotations

import math

import pytest
import torch

from worker.models.accelerate import SpeedOptions, accelerate_sr
from worker.models.sr_nets import RRDBNet
from worker.models.super_res import SrModel, load_sr_model

pytestmark = pytest.mark.gpu
pytest.importorskip("triton", reason="the GPU image ships triton with PyTorch")


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(torch.mean((a.double().clamp(0, 1) - b.double().clamp(0, 1)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def _frames(cuda: torch.device) -> torch.Tensor:
    """Two smooth-plus-detail frames with odd sizes (borders, partial tiles)."""
    gen = torch.Generator(device="cpu").manual_seed(5)
    low = torch.nn.functional.interpolate(
        torch.rand(2, 3, 9, 13, generator=gen), size=(71, 133), mode="bicubic"
    )
    return (low + 0.05 * torch.rand(2, 3, 71, 133, generator=gen)).clamp(0, 1).to(cuda)


@pytest.mark.parametrize("kernels", ["triton", "triton-tma"])
def test_triton_animevideov3_matches_eager_fp32(cuda, gpu_store, kernels):
    x = _frames(cuda)
    ref = load_sr_model("realesr-animevideov3", gpu_store, device=cuda, dtype=torch.float32)
    with torch.inference_mode():
        want = ref.net(x)
    model = load_sr_model("realesr-animevideov3", gpu_store, device=cuda, dtype=torch.float16)
    fast = accelerate_sr(model, SpeedOptions(kernels=kernels))
    with torch.inference_mode():
        got = fast.run(x.half())
    assert got.shape == want.shape
    assert _psnr(got.float(), want) > 55.0


@pytest.mark.parametrize("kernels", ["triton", "triton-tma"])
def test_triton_rrdbnet_matches_eager_fp32(cuda, kernels):
    torch.manual_seed(0)
    net = (
        RRDBNet(num_in_ch=3, num_out_ch=3, num_feat=64, num_block=2, num_grow_ch=32, scale=4).to(cuda).eval()
    )
    x = _frames(cuda)[:1, :, :40, :56]
    with torch.inference_mode():
        want = net(x)
    half = SrModel(name="rrdb-test", net=net.half(), scale=4, device=cuda, dtype=torch.float16)
    fast = accelerate_sr(half, SpeedOptions(kernels=kernels))
    with torch.inference_mode():
        got = fast.run(x.half())
    assert got.shape == want.shape
    assert _psnr(got.float(), want) > 45.0
