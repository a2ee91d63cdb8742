"""SRVGGNetCompact and RRDBNet forwards on the fused Triton 3x3 conv (same outputs as the eager nets).

Why: every 3x3 conv of the trunk runs as one kernel with its activation and residuals fused, so a
64-channel layer moves its bytes once instead of twice; the compact net's last conv stores straight
into the pixel-shuffled output with the upsampled input added; RRDB dense blocks grow their features
in one preallocated channels_last buffer (x in channels 0:64, each conv writes the next 32), so there
is no ``torch.cat``. RRDBNet's upsampling tail runs the net's own modules.

The wrappers keep the net as a submodule (``.to()`` and the model cache still move its weights) and
repack the weights whenever their device, dtype or storage changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Generic, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worker.models.sr_nets import UPSAMPLE_HALO_ROWS, RRDBNet, SRVGGNetCompact, run_in_row_bands
from worker.models.triton_conv import PackedConv3x3, conv3x3, pack_conv3x3, require_triton

RRDB_LEAKY_SLOPE = 0.2  # RRDBNet's leaky ReLU
RRDB_RESIDUAL_SCALE = 0.2  # x + 0.2 * conv5 in a dense block, x + 0.2 * rdb3 in an RRDB
PackKey = tuple[torch.device, torch.dtype, tuple[int, ...]]
RrdbLayers = tuple[PackedConv3x3, list[list[list[PackedConv3x3]]], PackedConv3x3]
Packed = TypeVar("Packed")


def create_triton_sr(net: nn.Module, *, tma: bool = False) -> nn.Module:
    """The Triton-backed twin of ``net`` (SRVGGNetCompact or RRDBNet); ValueError for other nets.
    ``tma``: every conv whose input allows it loads its tiles through tensor descriptors."""
    if isinstance(net, SRVGGNetCompact):
        return TritonSRVGG(net, tma=tma)
    if isinstance(net, RRDBNet):
        return TritonRRDB(net, tma=tma)
    raise ValueError(f"no Triton forward for {type(net).__name__}")


def output_format(x: Tensor) -> torch.memory_format:
    """The layout eager convs give for ``x``: channels_last only for channels_last-strided inputs."""
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return torch.contiguous_format
    return torch.channels_last


def _check_conv(conv: nn.Module) -> nn.Conv2d:
    if not (
        isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    ):
        raise ValueError(f"the Triton conv handles 3x3 / stride 1 / pad 1 convs only, got {conv}")
    return conv


def _pack(conv: nn.Module, dtype: torch.dtype, tma: bool, **act: object) -> PackedConv3x3:
    conv = _check_conv(conv)
    return pack_conv3x3(conv.weight, conv.bias, dtype=dtype, tma=tma, **act)  # type: ignore[arg-type]


class _PackedNet(nn.Module, ABC, Generic[Packed]):
    """Holds ``net`` and its packed layers, rebuilt when the weights move or change dtype."""

    def __init__(self, net: nn.Module, *, tma: bool = False) -> None:
        super().__init__()
        self.net = net
        self.tma = tma
        self._packed: tuple[PackKey, Packed] | None = None

    def packed_layers(self, x: Tensor) -> Packed:
        """The layers packed for ``x``'s device and dtype (cached; no host syncs)."""
        require_triton(x.device)
        key: PackKey = (x.device, x.dtype, tuple(p.data_ptr() for p in self.net.parameters()))
        if self._packed is None or self._packed[0] != key:
            self._packed = None  # free the old copy before packing a new one
            with torch.no_grad():
                self._packed = (key, self.pack(x.dtype))
        return self._packed[1]

    @abstractmethod
    def pack(self, dtype: torch.dtype) -> Packed:
        """The net's layers packed for the Triton kernel in ``dtype`` (each subclass knows its layout)."""


class TritonSRVGG(_PackedNet[list[PackedConv3x3]]):
    """SRVGGNetCompact's forward with every conv (and PReLU) on the Triton kernel.

    With the official ``nearest`` residual the last conv writes the pixel-shuffled output with the
    upsampled input already added; ``bilinear`` falls back to torch for that last step.
    """

    net: SRVGGNetCompact

    def __init__(self, net: SRVGGNetCompact, *, tma: bool = False) -> None:
        super().__init__(net, tma=tma)

    def pack(self, dtype: torch.dtype) -> list[PackedConv3x3]:
        layers: list[PackedConv3x3] = []
        mods = list(self.net.body)
        for i, mod in enumerate(mods):
            if isinstance(mod, nn.PReLU):
                continue
            nxt = mods[i + 1] if i + 1 < len(mods) else None
            if isinstance(nxt, nn.PReLU):
                layers.append(_pack(mod, dtype, self.tma, activation="prelu", prelu_weight=nxt.weight))
            else:
                layers.append(_pack(mod, dtype, self.tma))
        return layers

    def forward(self, x: Tensor) -> Tensor:
        layers = self.packed_layers(x)
        net = self.net
        fmt = output_format(x)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        feat = x_cl
        for layer in layers[:-1]:
            feat = conv3x3(feat, layer)
        last, r = layers[-1], net.upscale
        if net.residual_mode == "nearest":
            n, _, h, w = x.shape
            out = torch.empty(
                (n, last.c_out // (r * r), h * r, w * r), dtype=x.dtype, device=x.device, memory_format=fmt
            )
            return conv3x3(feat, last, out=out, residual=x_cl, pixel_shuffle=r)
        base = F.interpolate(x, scale_factor=r, mode="bilinear", align_corners=False)
        return (F.pixel_shuffle(conv3x3(feat, last), r) + base).contiguous(memory_format=fmt)


class TritonRRDB(_PackedNet[RrdbLayers]):
    """RRDBNet's forward with conv_first, the 23x3 dense blocks and conv_body on the Triton kernel.

    Each dense block works in a (N, 64 + 4*32, H, W) channels_last buffer; three such buffers rotate
    so a block's output (x + 0.2 * conv5) lands in channels 0:64 of the next one, and an RRDB's outer
    residual (0.2 * rdb3 + x) is folded into rdb3's conv5 epilogue. The tail (two x2 upsamples and
    the output convs, in row bands) is ``net.upsample`` itself.
    """

    net: RRDBNet

    def __init__(self, net: RRDBNet, *, tma: bool = False) -> None:
        super().__init__(net, tma=tma)

    def pack(self, dtype: torch.dtype) -> RrdbLayers:
        net = self.net
        leaky = {"activation": "leaky_relu", "negative_slope": RRDB_LEAKY_SLOPE}
        blocks = []
        for rrdb in net.body:
            rdbs = []
            for rdb in (getattr(rrdb, f"rdb{i}") for i in (1, 2, 3)):
                convs = [getattr(rdb, f"conv{i}") for i in (1, 2, 3, 4, 5)]
                rdbs.append(
                    [
                        *(_pack(c, dtype, self.tma, **leaky) for c in convs[:4]),
                        _pack(convs[4], dtype, self.tma),
                    ]
                )
            blocks.append(rdbs)
        return _pack(net.conv_first, dtype, self.tma), blocks, _pack(net.conv_body, dtype, self.tma)

    def forward(self, x: Tensor) -> Tensor:
        first, blocks, body_conv = self.packed_layers(x)
        net = self.net
        fmt = output_format(x)
        if net.scale == 2:
            x = F.pixel_unshuffle(x, 2)
        elif net.scale == 1:
            x = F.pixel_unshuffle(x, 4)
        feat = conv3x3(x.contiguous(memory_format=torch.channels_last), first)
        body = run_rrdb_trunk(feat, blocks) if blocks else feat
        feat = conv3x3(body, body_conv, residual=feat)
        del body
        feat = feat.contiguous(memory_format=fmt)  # the tail then runs (and returns) as eager would
        return run_in_row_bands(
            net.upsample, feat, scale=4, band_rows=net.upsample_band_rows, halo_rows=UPSAMPLE_HALO_ROWS
        )


def run_rrdb_trunk(feat: Tensor, blocks: Sequence[Sequence[Sequence[PackedConv3x3]]]) -> Tensor:
    """The RRDB stack on ``feat`` (N, nf, H, W): returns a channel slice of a work buffer."""
    n, nf, h, w = feat.shape
    growth = blocks[0][0][0].c_out
    total = nf + 4 * growth
    bufs = [
        torch.empty((n, total, h, w), dtype=feat.dtype, device=feat.device, memory_format=torch.channels_last)
        for _ in range(3)
    ]
    bufs[0][:, :nf].copy_(feat)
    start = 0  # the buffer holding the current RRDB's input in channels 0:nf
    for rdbs in blocks:
        src = start
        for r, convs in enumerate(rdbs):
            buf = bufs[src]
            for c in range(4):
                lo = nf + c * growth
                conv3x3(buf[:, :lo], convs[c], out=buf[:, lo : lo + growth])
            # next buffer: neither this block's input nor the RRDB input (read by rdb3's epilogue)
            dst = (start + 1) % 3 if r != 1 else (start + 2) % 3
            if r < 2:
                conv3x3(buf, convs[4], out=bufs[dst][:, :nf], scale=RRDB_RESIDUAL_SCALE, residual=buf[:, :nf])
            else:  # rrdb_out = 0.2 * (x3 + 0.2 * conv5) + x0
                conv3x3(
                    buf,
                    convs[4],
                    out=bufs[dst][:, :nf],
                    scale=RRDB_RESIDUAL_SCALE * RRDB_RESIDUAL_SCALE,
                    residual=buf[:, :nf],
                    residual_scale=RRDB_RESIDUAL_SCALE,
                    residual2=bufs[start][:, :nf],
                )
            src = dst
        start = src
    return bufs[start][:, :nf]
