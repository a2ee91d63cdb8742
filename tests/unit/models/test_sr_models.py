"""Super-resolution: the ncnn->torch conversion equals ncnn itself; user weights and frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from shared.errors import BadInputError, ModelStoreError, UnknownModelError
from shared.model_store import require_file
from worker.models.ncnn_convert import convert_ncnn
from worker.models.sr_nets import RRDBNet, SRVGGNetCompact
from worker.models.super_res import (
    estimate_cpu_seconds,
    load_sr_model,
    load_user_sr_model,
    upscale_frames,
)

SR_NCNN = {
    "realesrgan-x4plus": "realesrgan-x4plus",
    "realesrgan-x4plus-anime": "realesrgan-x4plus-anime",
    "realesr-animevideov3": "realesr-animevideov3-x4",
}


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 1.0) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


def run_ncnn(param: Path, weights: Path, rgb01_chw: np.ndarray) -> np.ndarray:
    """The reference: ncnn's own CPU inference in fp32."""
    import ncnn

    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.use_fp16_storage = False
    net.opt.use_fp16_packed = False
    net.opt.use_fp16_arithmetic = False
    net.opt.num_threads = 1  # OpenMP spin-waits stall badly when the CPU is shared
    net.load_param(str(param))
    net.load_model(str(weights))
    arr = np.ascontiguousarray(rgb01_chw, dtype=np.float32)
    mat = ncnn.Mat(arr).clone()  # ncnn keeps a view: clone so the input stays alive
    ex = net.create_extractor()
    ex.input("data", mat)
    _, out = ex.extract("output")
    return np.array(out).copy()


@pytest.mark.parametrize("name", list(SR_NCNN))
def test_converted_sr_network_matches_ncnn_on_a_real_face(
    name: str, model_store: Path, astronaut_rgb: np.ndarray
) -> None:
    crop = astronaut_rgb[104:136, 200:232].astype(np.float32) / 255.0  # 32x32: eyes and nose
    chw = crop.transpose(2, 0, 1)
    stem = SR_NCNN[name]
    reference = run_ncnn(
        require_file(model_store, f"{stem}.param"), require_file(model_store, f"{stem}.bin"), chw
    )
    model = load_sr_model(name, model_store, device="cpu")
    with torch.inference_mode():
        ours = model.net(torch.from_numpy(chw.copy())[None])[0].numpy()
    assert ours.shape == reference.shape == (3, 128, 128)
    assert psnr(np.clip(ours, 0, 1), np.clip(reference, 0, 1)) >= 60.0
    assert np.abs(ours - reference).max() < 1e-3


def test_converter_reads_every_weight_into_basicsr_keys(model_store: Path) -> None:
    converted = convert_ncnn(
        require_file(model_store, "realesrgan-x4plus.param"),
        require_file(model_store, "realesrgan-x4plus.bin"),
    )
    assert converted.arch == "RRDBNet" and converted.arch_kwargs["num_block"] == 23
    assert sum(t.numel() for t in converted.state_dict.values()) == 16_697_987
    assert "body.22.rdb3.conv5.weight" in converted.state_dict
    assert set(converted.state_dict) == set(RRDBNet(num_block=23).state_dict())
    vgg = convert_ncnn(
        require_file(model_store, "realesr-animevideov3-x4.param"),
        require_file(model_store, "realesr-animevideov3-x4.bin"),
    )
    assert vgg.arch == "SRVGGNetCompact"
    assert sum(t.numel() for t in vgg.state_dict.values()) == 621_424


def test_converter_rejects_a_truncated_bin(model_store: Path, tmp_path: Path) -> None:
    bad = tmp_path / "x.bin"
    bad.write_bytes(require_file(model_store, "realesr-animevideov3-x4.bin").read_bytes()[:-8])
    with pytest.raises(ModelStoreError, match="truncated"):
        convert_ncnn(require_file(model_store, "realesr-animevideov3-x4.param"), bad)


def test_anime_x4plus_upscales_frames(model_store: Path, astronaut_rgb: np.ndarray) -> None:
    model = load_sr_model("realesrgan-x4plus-anime", model_store)
    frames = np.stack([astronaut_rgb[104:128, 200:224]] * 2)
    out = upscale_frames(model, frames, upscale=4, batch=2)
    assert out.shape == (2, 96, 96, 3) and out.dtype == np.uint8
    assert np.array_equal(out[0], out[1])
    # GAN output resembles the input: compare with a box-downscaled version.
    down = out[0].reshape(24, 4, 24, 4, 3).mean(axis=(1, 3))
    assert psnr(down, frames[0], peak=255.0) > 22.0


def test_upscale_2_is_x4_then_area_downscale(model_store: Path, astronaut_rgb: np.ndarray) -> None:
    model = load_sr_model("realesr-animevideov3", model_store)
    frames = astronaut_rgb[None, 100:140, 190:230].copy()
    x4 = upscale_frames(model, frames, upscale=4).astype(np.float64)
    x2 = upscale_frames(model, frames, upscale=2)
    assert x2.shape == (1, 80, 80, 3)
    expected = x4.reshape(1, 80, 2, 80, 2, 3).mean(axis=(2, 4))
    assert np.abs(x2.astype(np.float64) - expected).max() <= 1.0
    assert np.array_equal(upscale_frames(model, frames, upscale=1), frames)
    with pytest.raises(BadInputError):
        upscale_frames(model, frames, upscale=3)


def test_user_rrdbnet_pth_loads_by_its_keys_and_runs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = RRDBNet(num_feat=16, num_block=2, num_grow_ch=8)
    path = tmp_path / "my_sr.pth"
    torch.save({"params_ema": net.state_dict()}, path)
    model = load_user_sr_model(path)
    assert isinstance(model.net, RRDBNet) and model.scale == 4
    frames = (np.random.default_rng(0).random((1, 12, 16, 3)) * 255).astype(np.uint8)
    out = upscale_frames(model, frames, upscale=4)
    assert out.shape == (1, 48, 64, 3)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    with torch.inference_mode():
        expected = net.eval()(x).clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy()
    assert np.array_equal(out, expected)


def test_user_srvgg_safetensors_and_x2_rrdbnet_load(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    vgg = SRVGGNetCompact(num_feat=8, num_conv=3, upscale=4)
    save_file(vgg.state_dict(), str(tmp_path / "vgg.safetensors"))
    model = load_user_sr_model(tmp_path / "vgg.safetensors")
    assert isinstance(model.net, SRVGGNetCompact) and model.scale == 4
    x2 = RRDBNet(scale=2, num_feat=8, num_block=1, num_grow_ch=4)
    torch.save(x2.state_dict(), tmp_path / "x2.pth")
    assert load_user_sr_model(tmp_path / "x2.pth").scale == 2


def test_user_pth_with_foreign_keys_is_refused(tmp_path: Path) -> None:
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "odd.pth")
    with pytest.raises(ModelStoreError, match="odd.pth"):
        load_user_sr_model(tmp_path / "odd.pth")


def test_unknown_sr_name_and_cpu_estimate() -> None:
    with pytest.raises(UnknownModelError, match="realesrgan-x4plus"):
        estimate_cpu_seconds("esrgan-x8", 1920, 1080, 1)
    minutes = estimate_cpu_seconds("realesrgan-x4plus", 1920, 1080, 1) / 60
    assert 5 < minutes < 20  # ~10 min per 1080p frame on the 2-core CPU
    assert estimate_cpu_seconds("realesr-animevideov3", 1920, 1080, 1) < minutes * 60 / 10


@pytest.mark.parametrize("height", [7, 32, 33, 70, 97])
def test_the_upsampling_tail_in_row_bands_equals_the_whole_tail(height: int) -> None:
    """Bands of 32 input rows with a 2-row halo reproduce the unbanded network, at every cut."""
    torch.manual_seed(0)
    net = RRDBNet(num_feat=16, num_block=1, num_grow_ch=8).eval()
    x = torch.rand(1, 3, height, 41)
    with torch.inference_mode():
        banded = net(x)
        net.upsample_band_rows = None
        whole = net(x)
    assert banded.shape == whole.shape == (1, 3, 4 * height, 4 * 41)
    assert torch.allclose(banded, whole, atol=1e-5, rtol=0), (banded - whole).abs().max()


def test_a_smaller_halo_would_show_at_the_cuts() -> None:
    """The halo is needed: with none, rows at the band cuts differ (so the test above can fail)."""
    from worker.models.sr_nets import run_in_row_bands

    torch.manual_seed(0)
    net = RRDBNet(num_feat=16, num_block=1, num_grow_ch=8).eval()
    feat = torch.rand(1, 16, 70, 20)
    with torch.inference_mode():
        no_halo = run_in_row_bands(net.upsample, feat, scale=4, band_rows=32, halo_rows=0)
        whole = net.upsample(feat)
    assert (no_halo - whole).abs().max() > 1e-3
