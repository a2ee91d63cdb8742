"""Super-resolution networks in plain torch, with basicsr's parameter names.

The key names match Real-ESRGAN's official ``.pth`` files and what :mod:`ncnn_convert` produces,
so shipped and user weights load into the same classes with ``strict=True``.
Inputs and outputs are RGB in [0, 1], NCHW; outputs are not clamped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The x4 upsampling tail holds three 64-channel tensors at 16x the input's pixels: run whole, it is
# most of RRDBNet's peak memory (x4plus fp16, 960x540: 4.55 GB allocated). Run in bands of input
# rows it needs a few hundred MB and gives the same output; the halo re-runs ~2 of 36 MFLOP a pixel.
UPSAMPLE_BAND_ROWS = 32
# The tail's receptive radius is 5 output rows (conv_up1 at x2, then three convs at x4); every conv
# also zero-pads a band's cut edge, spoiling one more row each: 2 input rows (8 at x4) cover both.
UPSAMPLE_HALO_ROWS = 2


def run_in_row_bands(
    fn: Callable[[Tensor], Tensor], feat: Tensor, *, scale: int, band_rows: int | None, halo_rows: int
) -> Tensor:
    """``fn(feat)`` for a row-local ``fn`` (output row r depends on input rows within ``halo_rows``
    of r / ``scale``), computed ``band_rows`` input rows at a time into one output tensor."""
    height = feat.shape[2]
    if band_rows is None or height <= band_rows:
        return fn(feat)
    out: Tensor | None = None
    for start in range(0, height, band_rows):
        stop = min(start + band_rows, height)
        lo, hi = max(start - halo_rows, 0), min(stop + halo_rows, height)
        y = fn(feat[:, :, lo:hi])
        if out is None:
            out = y.new_empty((y.shape[0], y.shape[1], height * scale, y.shape[3]))
        out[:, :, start * scale : stop * scale] = y[:, :, (start - lo) * scale : (stop - lo) * scale]
        del y
    assert out is not None
    return out


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs with dense connections; output = x + 0.2 * conv5(...)."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


class RRDB(nn.Module):
    """Three residual dense blocks with an outer scaled residual."""

    def __init__(self, num_feat: int, num_grow_ch: int = 32) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: Tensor) -> Tensor:
        out = self.rdb3(self.rdb2(self.rdb1(x)))
        return out * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN's generator (Real-ESRGAN x4plus: 23 blocks; x4plus-anime: 6 blocks).

    Scales 1 and 2 fold the input with pixel-unshuffle first, as basicsr does, so the official
    x2plus weights also fit.
    """

    def __init__(
        self,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        scale: int = 4,
        num_feat: int = 64,
        num_block: int = 23,
        num_grow_ch: int = 32,
    ) -> None:
        super().__init__()
        if scale not in (1, 2, 4):
            raise ValueError(f"RRDBNet scale must be 1, 2 or 4, got {scale}")
        self.scale = scale
        in_ch = num_in_ch * {4: 1, 2: 4, 1: 16}[scale]
        self.conv_first = nn.Conv2d(in_ch, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)
        self.upsample_band_rows: int | None = UPSAMPLE_BAND_ROWS  # None: the whole tail at once

    def forward(self, x: Tensor) -> Tensor:
        if self.scale == 2:
            feat = F.pixel_unshuffle(x, 2)
        elif self.scale == 1:
            feat = F.pixel_unshuffle(x, 4)
        else:
            feat = x
        feat = self.conv_first(feat)
        feat = feat + self.conv_body(self.body(feat))
        return run_in_row_bands(
            self.upsample, feat, scale=4, band_rows=self.upsample_band_rows, halo_rows=UPSAMPLE_HALO_ROWS
        )

    def upsample(self, feat: Tensor) -> Tensor:
        """Two nearest x2 upsamples with their convs, then the output convs (row-local)."""
        feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.conv_hr(feat)))


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact VGG-style net (realesr-animevideov3, realesr-general-x4v3).

    ``body`` alternates conv and PReLU; the last conv feeds a pixel shuffle, and the input,
    upsampled by ``residual_mode`` (nearest in the official model), is added back.
    """

    def __init__(
        self,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        num_feat: int = 64,
        num_conv: int = 16,
        upscale: int = 4,
        residual_mode: Literal["nearest", "bilinear"] = "nearest",
    ) -> None:
        super().__init__()
        self.upscale = upscale
        self.residual_mode = residual_mode
        layers: list[nn.Module] = [nn.Conv2d(num_in_ch, num_feat, 3, 1, 1), nn.PReLU(num_feat)]
        for _ in range(num_conv):
            layers += [nn.Conv2d(num_feat, num_feat, 3, 1, 1), nn.PReLU(num_feat)]
        layers.append(nn.Conv2d(num_feat, num_out_ch * upscale * upscale, 3, 1, 1))
        self.body = nn.Sequential(*layers)
        self.upsampler = nn.PixelShuffle(upscale)

    def forward(self, x: Tensor) -> Tensor:
        out = self.upsampler(self.body(x))
        if self.residual_mode == "bilinear":
            base = F.interpolate(x, scale_factor=self.upscale, mode="bilinear", align_corners=False)
        else:
            base = F.interpolate(x, scale_factor=self.upscale, mode="nearest")
        return out + base
