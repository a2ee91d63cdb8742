"""Face enhancement with a user-supplied GFPGAN v1.3/v1.4 checkpoint (never shipped).

The checkpoint's shapes decide the configuration (output size, width, SFT layout), so the
official files and smaller re-trainings load through the same strict path.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from shared.errors import BadInputError, ModelStoreError
from worker.models.gfpgan_net import GFPGANv1Clean
from worker.models.loading import load_state_dict_file


@dataclass
class FaceEnhancer:
    """A loaded GFPGAN network and where it runs; crops must be ``size_px`` square."""

    net: GFPGANv1Clean
    size_px: int
    device: torch.device
    dtype: torch.dtype


@dataclass(frozen=True)
class GfpganConfig:
    """GFPGANv1Clean's constructor arguments."""

    out_size: int
    num_style_feat: int
    channel_multiplier: int
    num_mlp: int
    different_w: bool
    narrow: float
    sft_half: bool


def gfpgan_config_from_state(state: dict[str, Tensor], *, source: str) -> GfpganConfig:
    """The GFPGANv1Clean keyword arguments that match a checkpoint's tensor shapes."""
    try:
        num_up = len({k.split(".")[1] for k in state if k.startswith("conv_body_up.")})
        const = state["stylegan_decoder.constant_input.weight"]
        num_style_feat = int(state["stylegan_decoder.style_conv1.modulated_conv.modulation.weight"].shape[1])
        narrow = const.shape[1] / 512
        out_size = 2 ** (num_up + 2)
        channel_multiplier = 2
        if out_size >= 64:
            level = 64
            conv = state[f"stylegan_decoder.style_convs.{2 * (int(math.log2(level)) - 3)}.bias"]
            channel_multiplier = round(conv.shape[1] / (256 * narrow))
        scale_out = state["condition_scale.0.2.weight"].shape[0]
        scale_in = state["condition_scale.0.0.weight"].shape[0]
        linear_out = state["final_linear.weight"].shape[0]
        num_mlp = len({k.split(".")[2] for k in state if k.startswith("stylegan_decoder.style_mlp.")})
    except (KeyError, IndexError) as exc:
        raise ModelStoreError(
            f"{source} is not a GFPGAN v1 clean checkpoint (missing {exc}); use GFPGANv1.3/1.4"
        ) from exc
    return GfpganConfig(
        out_size=out_size,
        num_style_feat=num_style_feat,
        channel_multiplier=channel_multiplier,
        num_mlp=num_mlp,
        different_w=linear_out != num_style_feat,
        narrow=narrow,
        sft_half=scale_out == scale_in,
    )


def load_face_enhancer(
    path: Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> FaceEnhancer:
    """Load a GFPGAN ``.pth``/``.safetensors`` strictly (tensors only) onto ``device``."""
    state = load_state_dict_file(path)
    config = gfpgan_config_from_state(state, source=str(path))
    net = GFPGANv1Clean(**asdict(config))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelStoreError(
            f"{path}: weights do not fit GFPGANv1Clean ({str(exc).splitlines()[0]})"
        ) from exc
    dev = torch.device(device)
    dt = dtype if dtype is not None else (torch.float16 if dev.type == "cuda" else torch.float32)
    net = net.to(device=dev, dtype=dt).eval()
    for param in net.parameters():
        param.requires_grad_(False)
    return FaceEnhancer(net=net, size_px=config.out_size, device=dev, dtype=dt)


def enhance_faces(model: FaceEnhancer, crops: np.ndarray, *, batch: int = 4) -> np.ndarray:
    """Restore aligned face crops: (N,S,S,3) uint8 RGB -> (N,S,S,3) uint8 RGB, S = size_px."""
    s = model.size_px
    if crops.ndim != 4 or crops.shape[1:] != (s, s, 3) or crops.dtype != np.uint8:
        raise BadInputError(f"face crops must be (N,{s},{s},3) uint8, got {crops.shape} {crops.dtype}")
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(crops), batch):
            x = torch.from_numpy(crops[start : start + batch]).to(model.device)
            x = x.permute(0, 3, 1, 2).to(model.dtype).div(127.5).sub(1.0)
            y = model.net(x).float().clamp(-1.0, 1.0).add(1.0).mul(127.5).round()
            outputs.append(y.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    if not outputs:
        return crops.copy()
    return np.concatenate(outputs)
