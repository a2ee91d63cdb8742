"""Super-resolution: load the shipped Real-ESRGAN nets (or a user ``.pth``) and upscale frames.

The shipped weights live in the store as ncnn files and are converted to torch on load (about
0.4 s for x4plus). Frames are RGB uint8; fp16 on CUDA, fp32 on CPU by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.errors import BadInputError, ModelStoreError, UnknownModelError
from shared.model_store import require_file
from worker.models.loading import load_state_dict_file
from worker.models.ncnn_convert import build_network, convert_ncnn
from worker.models.sr_nets import RRDBNet, SRVGGNetCompact
from worker.models.tiling import SR_PAD_PX, run_tiled

# Canonical SR model name -> ncnn file stem in the store.
SHIPPED_SR_FILES = {
    "realesrgan-x4plus": "realesrgan-x4plus",
    "realesrgan-x4plus-anime": "realesrgan-x4plus-anime",
    "realesr-animevideov3": "realesr-animevideov3-x4",
}

# CPU seconds per input pixel, torch fp32 on 2 cores (probe of 2026-11-25: 128x128 input took
# x4plus ~5.0 s, x4plus-anime ~2.1 s, animevideov3 ~0.29 s; re-timed on 48x48 crops within 20%).
# x4plus at 1080p: 2,073,600 px * 3.0e-4 s = ~10 min per frame.
CPU_SECONDS_PER_PIXEL = {
    "realesrgan-x4plus": 3.0e-4,
    "realesrgan-x4plus-anime": 1.3e-4,
    "realesr-animevideov3": 1.8e-5,
}


@dataclass
class SrModel:
    """A loaded SR network, where it lives, and its fixed upscale factor."""

    name: str
    net: nn.Module
    scale: int
    device: torch.device
    dtype: torch.dtype

    def run(self, x: Tensor) -> Tensor:
        """RGB [0,1] NCHW (any dtype) -> upscaled RGB [0,1], clamped, in ``self.dtype``."""
        return self.net(x.to(self.device, self.dtype)).clamp_(0.0, 1.0)


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 where it is fast (CUDA), fp32 elsewhere (CPU convs in fp16 are slow or missing)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def _place(
    name: str, net: nn.Module, scale: int, device: torch.device | str, dtype: torch.dtype | None
) -> SrModel:
    dev = torch.device(device)
    dt = dtype if dtype is not None else default_dtype(dev)
    net = net.to(device=dev, dtype=dt).eval()
    for param in net.parameters():
        param.requires_grad_(False)
    return SrModel(name=name, net=net, scale=scale, device=dev, dtype=dt)


def load_sr_model(
    name: str,
    store: Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> SrModel:
    """Load a shipped SR model by canonical name from the (verified) model store."""
    stem = SHIPPED_SR_FILES.get(name)
    if stem is None:
        raise UnknownModelError(
            f"unknown super-resolution model {name!r}; known: {', '.join(SHIPPED_SR_FILES)}"
        )
    param_path = require_file(store, f"{stem}.param")
    bin_path = require_file(store, f"{stem}.bin")
    converted = convert_ncnn(param_path, bin_path)
    return _place(name, build_network(converted), converted.scale, device, dtype)


def build_sr_network_from_state(state: dict[str, Tensor], *, source: str) -> tuple[nn.Module, int]:
    """Recognise RRDBNet or SRVGGNetCompact from basicsr key names and load strictly."""
    net: nn.Module
    if "conv_first.weight" in state:
        first = state["conv_first.weight"]
        blocks = {k.split(".")[1] for k in state if k.startswith("body.")}
        num_out_ch = int(state["conv_last.weight"].shape[0])
        scale = {num_out_ch: 4, num_out_ch * 4: 2, num_out_ch * 16: 1}.get(int(first.shape[1]))
        if scale is None:
            raise ModelStoreError(f"{source}: RRDBNet input width {first.shape[1]} is unknown")
        net = RRDBNet(
            num_in_ch=num_out_ch,
            num_out_ch=num_out_ch,
            scale=scale,
            num_feat=int(first.shape[0]),
            num_block=len(blocks),
            num_grow_ch=int(state["body.0.rdb1.conv1.weight"].shape[0]),
        )
    elif "body.0.weight" in state and "body.1.weight" in state:
        indices = sorted({int(k.split(".")[1]) for k in state if k.startswith("body.")})
        first = state["body.0.weight"]
        num_in_ch = int(first.shape[1])
        last_out = int(state[f"body.{indices[-1]}.weight"].shape[0])
        upscale = math.isqrt(last_out // num_in_ch)
        if upscale * upscale * num_in_ch != last_out or state["body.1.weight"].ndim != 1:
            raise ModelStoreError(f"{source}: not a PReLU SRVGGNetCompact state dict")
        scale = upscale
        net = SRVGGNetCompact(
            num_in_ch=num_in_ch,
            num_out_ch=num_in_ch,
            num_feat=int(first.shape[0]),
            num_conv=(indices[-1] - 2) // 2,
            upscale=upscale,
        )
    else:
        raise ModelStoreError(
            f"{source}: not an RRDBNet or SRVGGNetCompact state dict (basicsr key names expected)"
        )
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first_line = str(exc).splitlines()[0]
        raise ModelStoreError(f"{source}: weights do not fit the network ({first_line})") from exc
    return net, scale


def load_user_sr_model(
    path: Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    name: str | None = None,
) -> SrModel:
    """Load a user's RRDBNet/SRVGGNetCompact ``.pth`` or ``.safetensors`` (tensors only)."""
    state = load_state_dict_file(path)
    net, scale = build_sr_network_from_state({k: v.float() for k, v in state.items()}, source=str(path))
    return _place(name or path.stem, net, scale, device, dtype)


UINT8_BAND_OUT_ROWS = 256  # output rows converted to uint8 at a time (budget.CONVERT_BAND_OUT_ROWS)


def _to_uint8_nhwc(y: Tensor, down: int) -> Tensor:
    """NCHW [0,1] in any dtype -> NHWC uint8, averaged down by ``down``; rounded in fp32 like the
    whole-frame path, but one band of rows at a time, so a 4K output needs no fp32 copy.

    The work follows ``y``'s memory layout, so the full-size fp32 bands are never transposed: those
    strided copies took about 1.6 of the 5 GPU-seconds of a 1080p -> 4K chunk on an H200
    (bench/RESULTS.md). A channels_last ``y`` is converted in NHWC order throughout; an NCHW one
    band by band in NCHW order, then transposed once as uint8 after the averaging (1/16 of the bytes).
    Values are the same either way. An fp32 ``y`` at ``down`` 1 is scaled in place (the caller drops it).
    """
    n, c, height, width = y.shape
    out = torch.empty(n, height // down, width // down, c, dtype=torch.uint8, device=y.device)
    band = max(down, UINT8_BAND_OUT_ROWS // down * down)
    nhwc = y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    source = y.permute(0, 2, 3, 1) if nhwc else y  # NHWC view of channels_last memory, or NCHW
    planes = (
        out if nhwc else torch.empty(n, c, height // down, width // down, dtype=torch.uint8, device=y.device)
    )
    rows = 1 if nhwc else 2  # the dimension that holds the rows
    for top in range(0, height, band):
        part = source.narrow(rows, top, min(band, height - top)).float()
        if down > 1:  # avg_pool2d takes NCHW order (it runs on the memory as it lies)
            part = F.avg_pool2d(part.permute(0, 3, 1, 2) if nhwc else part, kernel_size=down)
            part = part.permute(0, 2, 3, 1) if nhwc else part
        planes.narrow(rows, top // down, part.shape[rows]).copy_(part.mul_(255.0).round_().clamp_(0, 255))
    if not nhwc:
        out.copy_(planes.permute(0, 2, 3, 1))
    return out


def upscale_frames(
    model: SrModel,
    frames: np.ndarray,
    *,
    upscale: int,
    core_px: tuple[int, int] | None = None,
    pad_px: int = SR_PAD_PX,
    batch: int = 1,
) -> np.ndarray:
    """Upscale (N,H,W,3) uint8 RGB frames by 1, 2 or 4; returns (N,H*u,W*u,3) uint8.

    ``upscale`` below the model's scale runs the model and averages down (x4 then 2x2 area for
    2). ``core_px`` None (or a core covering the frame) runs whole frames, ``batch`` at a time;
    otherwise each frame is cut into padded-crop tiles of at most ``core_px`` (height, width) cores
    with ``pad_px`` of context (see ``tiling``), ``batch`` windows at a time.
    """
    if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8:
        raise BadInputError(f"frames must be (N,H,W,3) uint8, got {frames.shape} {frames.dtype}")
    if upscale == 1:
        return frames.copy()
    if upscale not in (2, 4) or model.scale % upscale:
        raise BadInputError(
            f"--upscale {upscale} is not possible with {model.name} (a x{model.scale} model); "
            "use 1, 2 or 4 with a x4 model"
        )
    down = model.scale // upscale
    height, width = frames.shape[1:3]
    whole = core_px is None or (core_px[0] >= height and core_px[1] >= width)
    per_call = batch if whole else 1
    outputs = []
    # On CUDA the frames come down into one pinned buffer: pinned memory takes the DMA path at full
    # link speed, while a copy into pageable memory goes through the driver's staging buffers (on an
    # H200 that cost ~1.1 GPU-seconds and ~3.5 CPU-seconds per 1080p -> 4K chunk of 120 frames).
    host = (
        torch.empty((len(frames), height * upscale, width * upscale, 3), dtype=torch.uint8, pin_memory=True)
        if torch.device(model.device).type == "cuda"
        else None
    )
    with torch.inference_mode():
        for start in range(0, len(frames), per_call):
            x = torch.from_numpy(frames[start : start + per_call])
            # on CUDA pinned and queued, like the download
            x = x.pin_memory().to(model.device, non_blocking=True) if host is not None else x.to(model.device)
            x = x.permute(0, 3, 1, 2).to(model.dtype).div_(255.0)
            if whole:
                y = model.run(x)
            else:
                assert core_px is not None
                y = run_tiled(
                    model.run,
                    x,
                    scale=model.scale,
                    core_h=core_px[0],
                    core_w=core_px[1],
                    pad_px=pad_px,
                    batch=batch,
                )
            del x
            out = _to_uint8_nhwc(y, down)
            del y  # free the model-dtype output before the next frame's windows run
            if host is not None:
                # queued on this stream: whatever reuses ``out``'s block later runs after the copy
                host[start : start + len(out)].copy_(out, non_blocking=True)
            else:
                outputs.append(out.numpy())
            del out
        if host is not None:
            torch.cuda.current_stream(model.device).synchronize()
            return host.numpy()  # the array holds the pinned block until the encoder drops it
    return np.concatenate(outputs)


def estimate_cpu_seconds(name: str, width: int, height: int, frames: int) -> float:
    """Rough CPU time of a shipped SR model over a clip, for the CLI's 'this will be slow'."""
    rate = CPU_SECONDS_PER_PIXEL.get(name)
    if rate is None:
        raise UnknownModelError(
            f"no CPU timing for SR model {name!r}; known: {', '.join(CPU_SECONDS_PER_PIXEL)}"
        )
    return rate * width * height * frames
