"""GFPGAN v1 "clean" (v1.3/v1.4) in plain torch, with the public checkpoint's parameter names.

A U-Net encoder reads the degraded face, produces per-layer latents (``different_w``) and
spatial scale/shift conditions that modulate a StyleGAN2 decoder (SFT). Names follow
``gfpganv1_clean_arch.py`` so a user's ``GFPGANv1.4.pth`` (``params_ema``) loads strictly.
Input and output are RGB in [-1, 1], NCHW. Noise comes from the stored ``noises`` buffers,
not fresh random draws, so a frame gives the same face every time (no flicker in video).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LRELU = 0.2


def stylegan_channels(channel_multiplier: int, narrow: float) -> dict[int, int]:
    """StyleGAN2's channel count per resolution."""
    wide = {4: 512, 8: 512, 16: 512, 32: 512}
    by_mult = {64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}
    out = {res: int(ch * narrow) for res, ch in wide.items()}
    out.update({res: int(ch * channel_multiplier * narrow) for res, ch in by_mult.items()})
    return out


class NormStyleCode(nn.Module):
    """Pixel norm of the style code (first entry of the style MLP)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(torch.mean(x**2, dim=1, keepdim=True) + 1e-8)


class ModulatedConv2d(nn.Module):
    """StyleGAN2's weight-modulated (and optionally demodulated) conv, grouped per sample."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        num_style_feat: int,
        *,
        demodulate: bool = True,
        upsample: bool = False,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.demodulate = demodulate
        self.upsample = upsample
        self.eps = eps
        self.modulation = nn.Linear(num_style_feat, in_channels, bias=True)
        nn.init.ones_(self.modulation.bias)
        self.weight = nn.Parameter(
            torch.randn(1, out_channels, in_channels, kernel_size, kernel_size)
            / math.sqrt(in_channels * kernel_size**2)
        )

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        b, c = x.shape[:2]
        weight = self.weight * self.modulation(style).view(b, 1, c, 1, 1)
        if self.demodulate:
            demod = torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + self.eps)
            weight = weight * demod.view(b, self.out_channels, 1, 1, 1)
        weight = weight.view(b * self.out_channels, c, self.kernel_size, self.kernel_size)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        h, w = x.shape[2:]
        out = F.conv2d(x.reshape(1, b * c, h, w), weight, padding=self.kernel_size // 2, groups=b)
        return out.view(b, self.out_channels, h, w)


class StyleConv(nn.Module):
    """Modulated 3x3 conv + scaled noise + bias + leaky ReLU."""

    def __init__(self, in_channels: int, out_channels: int, num_style_feat: int, *, upsample: bool) -> None:
        super().__init__()
        self.modulated_conv = ModulatedConv2d(in_channels, out_channels, 3, num_style_feat, upsample=upsample)
        self.weight = nn.Parameter(torch.zeros(1))  # noise strength
        self.bias = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def forward(self, x: Tensor, style: Tensor, noise: Tensor) -> Tensor:
        out = self.modulated_conv(x, style) * math.sqrt(2)
        out = out + self.weight * noise + self.bias
        return F.leaky_relu(out, _LRELU)


class ToRGB(nn.Module):
    """Modulated 1x1 conv to RGB, added to the (upsampled) running image."""

    def __init__(self, in_channels: int, num_style_feat: int, *, upsample: bool) -> None:
        super().__init__()
        self.upsample = upsample
        self.modulated_conv = ModulatedConv2d(in_channels, 3, 1, num_style_feat, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: Tensor, style: Tensor, skip: Tensor | None = None) -> Tensor:
        out = self.modulated_conv(x, style) + self.bias
        if skip is not None:
            if self.upsample:
                skip = F.interpolate(skip, scale_factor=2, mode="bilinear", align_corners=False)
            out = out + skip
        return out


class ConstantInput(nn.Module):
    """The learned 4x4 start of the StyleGAN2 decoder."""

    def __init__(self, num_channel: int, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, num_channel, size, size))

    def forward(self, batch: int) -> Tensor:
        return self.weight.expand(batch, -1, -1, -1)


class StyleGAN2GeneratorCSFT(nn.Module):
    """StyleGAN2 decoder whose features are modulated by spatial conditions (SFT)."""

    def __init__(
        self,
        out_size: int,
        *,
        num_style_feat: int = 512,
        num_mlp: int = 8,
        channel_multiplier: int = 2,
        narrow: float = 1.0,
        sft_half: bool = False,
    ) -> None:
        super().__init__()
        self.sft_half = sft_half
        mlp: list[nn.Module] = [NormStyleCode()]
        for _ in range(num_mlp):
            mlp += [nn.Linear(num_style_feat, num_style_feat), nn.LeakyReLU(_LRELU, True)]
        self.style_mlp = nn.Sequential(*mlp)  # kept for strict loading; latents come in ready
        channels = stylegan_channels(channel_multiplier, narrow)
        self.constant_input = ConstantInput(channels[4], size=4)
        self.style_conv1 = StyleConv(channels[4], channels[4], num_style_feat, upsample=False)
        self.to_rgb1 = ToRGB(channels[4], num_style_feat, upsample=False)
        self.log_size = int(math.log2(out_size))
        self.num_layers = (self.log_size - 2) * 2 + 1
        self.noises = nn.Module()
        for idx in range(self.num_layers):
            res = 2 ** ((idx + 5) // 2)
            self.noises.register_buffer(f"noise{idx}", torch.randn(1, 1, res, res))
        self.style_convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        in_ch = channels[4]
        for i in range(3, self.log_size + 1):
            out_ch = channels[2**i]
            self.style_convs.append(StyleConv(in_ch, out_ch, num_style_feat, upsample=True))
            self.style_convs.append(StyleConv(out_ch, out_ch, num_style_feat, upsample=False))
            self.to_rgbs.append(ToRGB(out_ch, num_style_feat, upsample=True))
            in_ch = out_ch

    def forward(self, latent: Tensor, conditions: list[Tensor]) -> Tensor:
        """``latent`` is (B, num_latent, num_style_feat); conditions alternate scale, shift."""
        noise = [getattr(self.noises, f"noise{i}") for i in range(self.num_layers)]
        out = self.style_conv1(self.constant_input(latent.shape[0]), latent[:, 0], noise[0])
        skip = self.to_rgb1(out, latent[:, 1])
        i = 1
        for level, to_rgb in enumerate(self.to_rgbs):
            conv1, conv2 = self.style_convs[2 * level], self.style_convs[2 * level + 1]
            out = conv1(out, latent[:, i], noise[i])
            if i < len(conditions):
                scale, shift = conditions[i - 1], conditions[i]
                if self.sft_half:
                    same, sft = torch.split(out, out.size(1) // 2, dim=1)
                    out = torch.cat([same, sft * scale + shift], dim=1)
                else:
                    out = out * scale + shift
            out = conv2(out, latent[:, i + 1], noise[i + 1])
            skip = to_rgb(out, latent[:, i + 2], skip)
            i += 2
        return skip


class ResBlock(nn.Module):
    """Residual block that resamples by 2 (bilinear) between its convs and on the skip."""

    def __init__(self, in_channels: int, out_channels: int, *, mode: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.scale_factor = 0.5 if mode == "down" else 2.0

    def forward(self, x: Tensor) -> Tensor:
        out = F.leaky_relu(self.conv1(x), _LRELU)
        out = F.interpolate(out, scale_factor=self.scale_factor, mode="bilinear", align_corners=False)
        out = F.leaky_relu(self.conv2(out), _LRELU)
        x = F.interpolate(x, scale_factor=self.scale_factor, mode="bilinear", align_corners=False)
        return out + self.skip(x)


def _condition_branch(channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, 1, 1),
        nn.LeakyReLU(_LRELU, True),
        nn.Conv2d(channels, out_channels, 3, 1, 1),
    )


class GFPGANv1Clean(nn.Module):
    """U-Net encoder + SFT-modulated StyleGAN2 decoder (GFPGAN v1.3 / v1.4 settings default)."""

    def __init__(
        self,
        out_size: int = 512,
        *,
        num_style_feat: int = 512,
        channel_multiplier: int = 2,
        num_mlp: int = 8,
        different_w: bool = True,
        narrow: float = 1.0,
        sft_half: bool = True,
    ) -> None:
        super().__init__()
        self.out_size = out_size
        self.different_w = different_w
        self.num_style_feat = num_style_feat
        self.log_size = int(math.log2(out_size))
        ch = stylegan_channels(channel_multiplier, narrow * 0.5)
        self.conv_body_first = nn.Conv2d(3, ch[out_size], 1)
        self.conv_body_down = nn.ModuleList()
        in_ch = ch[out_size]
        for i in range(self.log_size, 2, -1):
            self.conv_body_down.append(ResBlock(in_ch, ch[2 ** (i - 1)], mode="down"))
            in_ch = ch[2 ** (i - 1)]
        self.final_conv = nn.Conv2d(in_ch, ch[4], 3, 1, 1)
        self.conv_body_up = nn.ModuleList()
        self.toRGB = nn.ModuleList()  # noqa: N815 - checkpoint key name
        self.condition_scale = nn.ModuleList()
        self.condition_shift = nn.ModuleList()
        in_ch = ch[4]
        for i in range(3, self.log_size + 1):
            out_ch = ch[2**i]
            self.conv_body_up.append(ResBlock(in_ch, out_ch, mode="up"))
            self.toRGB.append(nn.Conv2d(out_ch, 3, 1))
            sft_ch = out_ch if sft_half else out_ch * 2
            self.condition_scale.append(_condition_branch(out_ch, sft_ch))
            self.condition_shift.append(_condition_branch(out_ch, sft_ch))
            in_ch = out_ch
        self.num_latent = self.log_size * 2 - 2
        linear_out = self.num_latent * num_style_feat if different_w else num_style_feat
        self.final_linear = nn.Linear(ch[4] * 4 * 4, linear_out)
        self.stylegan_decoder = StyleGAN2GeneratorCSFT(
            out_size,
            num_style_feat=num_style_feat,
            num_mlp=num_mlp,
            channel_multiplier=channel_multiplier,
            narrow=narrow,
            sft_half=sft_half,
        )

    def forward(self, x: Tensor) -> Tensor:
        """Restore faces: RGB [-1,1] (B,3,S,S) -> RGB about [-1,1] (B,3,S,S)."""
        feat = F.leaky_relu(self.conv_body_first(x), _LRELU)
        skips: list[Tensor] = []
        for block in self.conv_body_down:
            feat = block(feat)
            skips.insert(0, feat)
        feat = F.leaky_relu(self.final_conv(feat), _LRELU)
        style = self.final_linear(feat.flatten(1))
        if self.different_w:
            latent = style.view(style.size(0), -1, self.num_style_feat)
        else:
            latent = style.unsqueeze(1).expand(-1, self.num_latent, -1)
        conditions: list[Tensor] = []
        for i, up in enumerate(self.conv_body_up):
            feat = up(feat + skips[i])
            conditions.append(self.condition_scale[i](feat))
            conditions.append(self.condition_shift[i](feat))
        return self.stylegan_decoder(latent, conditions)
